"""/metrics and the status page as a scraper and an admin see them: the Prometheus text format
parsed by prometheus_client's own parser, counters moving by exactly the requests made (and
agreeing across two worker processes), admin-only access, and a status page in human units."""

from __future__ import annotations

import http.client
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import curl
from webproxy import metrics, statuspage

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    status, ctype, body = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_by(samples: Samples) -> dict[tuple[str, str, str], float]:
    return {(dict(k)["method"], dict(k)["status_class"], dict(k)["cache_result"]): v
            for (name, k), v in samples.items() if name == "webproxy_requests_total"}


def test_counters_move_by_exactly_the_requests_made(make_proxy, origin):
    p = make_proxy({"access": {"connect_ports": [origin.port], "deny_domains": ["denied.example"]}})
    url = origin.put("metered", b"m" * 1000, Cache_Control="max-age=600")
    echoed = 0
    for i in range(3):
        r = curl("-x", p.url, "-d", f"body{i}", origin.url("/echo"))
        assert r.returncode == 0
        echoed += len(r.stdout)
    assert curl("-x", p.url, url).stdout == b"m" * 1000
    assert curl("-x", p.url, url).stdout == b"m" * 1000
    assert curl("-p", "-x", p.url, origin.url("/text/tunnelled")).stdout == b"hello tunnelled\n"
    assert b"403" in curl("-o", "/dev/null", "-w", "%{http_code}", "-x", p.url, "http://denied.example/").stdout
    lines = p.access_lines(wait_for=7)
    assert [line.split()[3] for line in lines] == ["TCP_MISS/200"] * 4 + ["TCP_MEM_HIT/200", "TCP_TUNNEL/200",
                                                                        "TCP_DENIED/403"]
    s = scrape(p.port)
    assert requests_by(s) == {("POST", "2xx", "miss"): 3, ("GET", "2xx", "miss"): 1,
                              ("GET", "2xx", "memory_hit"): 1, ("CONNECT", "2xx", "tunnel"): 1,
                              ("GET", "4xx", "denied"): 1}
    assert value(s, "webproxy_client_sent_bytes_total") == sum(int(line.split()[4]) for line in lines)
    assert value(s, "webproxy_origin_received_bytes_total") == echoed + 1000
    assert value(s, "webproxy_upstream_response_seconds_count") == 4  # 3 POSTs and one miss
    assert value(s, "webproxy_upstream_response_seconds_bucket", le="+Inf") == 4
    assert value(s, "webproxy_tunnels") == 0
    assert value(s, "webproxy_client_connections") == 1  # this scrape's own
    assert value(s, "webproxy_cache_entries") == 1
    assert value(s, "webproxy_cache_bytes") > 1000
    assert value(s, "webproxy_cache_capacity_bytes") == 1 << 30
    assert value(s, "webproxy_cache_evictions_total") == 0
    # A second scrape counts the first one (a page about the proxy: cache_result "none"), nothing else.
    s2 = scrape(p.port)
    assert requests_by(s2) == {**requests_by(s), ("GET", "2xx", "none"): 1}


def test_two_workers_report_one_consistent_set(make_proxy, origin):
    p = make_proxy({"server": {"workers": 2}, "cache": {"enabled": False}})
    n = 30
    for i in range(n):  # one connection each: SO_REUSEPORT spreads them over both workers
        with socket.create_connection(("127.0.0.1", p.port), 10) as sock:
            sock.sendall(f"GET {origin.url(f'/text/w{i}')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            assert data.endswith(f"hello w{i}\n".encode())
    deadline = time.monotonic() + 10
    while requests_by(scrape(p.port)).get(("GET", "2xx", "miss")) != n:
        assert time.monotonic() < deadline, "the workers' counts did not add up to the requests made"
        time.sleep(0.2)
    time.sleep(1.5)  # both workers have published their scrapes too
    for _ in range(6):  # each scrape is a new connection, answered by either worker
        s = scrape(p.port)
        assert requests_by(s)[("GET", "2xx", "miss")] == n
        workers = {dict(k)["pid"]: v for (name, k), v in s.items() if name == "webproxy_worker_requests"}
        assert len(workers) == 2 and all(v > 0 for v in workers.values())
        assert sum(workers.values()) == sum(requests_by(s).values())


def test_metrics_and_status_page_refused_to_non_admin_clients(make_proxy):
    p = make_proxy({"access": {"allow_clients": ["127.0.0.0/8"], "admin_clients": ["127.0.0.2/32"]}})
    for path in ("/metrics", "/", "/status"):
        status, _, body = get(p.port, path)
        assert status == 403
        assert body == f"access denied: {path} is only for access.admin_clients (your address: 127.0.0.1)\n".encode()
        status, _, body = get(p.port, path, source="127.0.0.2")
        assert status == 200 and b"webproxy" in body
    status, ctype, _ = get(p.port, "/proxy.pac")  # the PAC file is for every client
    assert status == 200 and ctype == "application/x-ns-proxy-autoconfig"
    status, _, body = get(p.port, "/health")  # a load balancer's check (conf/haproxy-fleet.cfg): every client
    assert (status, body) == (200, b"ok\n")
    assert "TCP_DENIED/403" in p.access_lines(wait_for=1)[0]


def test_status_page_reads_in_human_units(make_proxy, origin):
    p = make_proxy({"server": {"name": "gateway-7"}})
    url = origin.put("statusbig", b"s" * 500_000, Cache_Control="max-age=600")
    for _ in range(3):
        assert len(curl("-x", p.url, url).stdout) == 500_000
    status, ctype, body = get(p.port, "/")
    assert status == 200 and ctype == "text/html; charset=utf-8"
    page = body.decode()
    assert "<title>gateway-7: webproxy status</title>" in page
    assert "requests served" in page
    assert "hit ratio, last minute" in page and "66.7 %" in page  # 2 hits of 3 lookups
    assert "MiB" in page  # 1.5 MB sent, in human units
    assert f"<td class=\"n\">{p.proc.pid}</td>" not in page and f"<td>{p.proc.pid}</td>" in page  # worker row
    assert "<td>127.0.0.1</td>" in page  # top hosts
    assert 'href="/metrics"' in page and 'href="/proxy.pac"' in page
    assert get(p.port, "/status")[0] == 200
    # Through the proxy too (an absolute URL naming the proxy itself).
    assert b"requests served" in curl("-x", p.url, p.url + "/status").stdout


@pytest.mark.parametrize("code, result", [
    ("TCP_HIT", "hit"), ("TCP_IMS_HIT", "hit"), ("TCP_MEM_HIT", "memory_hit"), ("TCP_MISS", "miss"),
    ("TCP_MISS_ABORTED", "miss"), ("TCP_REFRESH_UNMODIFIED", "refresh"), ("TCP_REFRESH_FAIL_OLD", "refresh"),
    ("TCP_DENIED", "denied"), ("TCP_TUNNEL", "tunnel"), ("TCP_TUNNEL_ABORTED", "tunnel"), ("TAG_NONE", "none"),
    ("NONE_NONE", "none"),
])
def test_squid_codes_map_to_cache_results(code, result):
    assert metrics.cache_result(code) == result


@pytest.mark.parametrize("url, host", [
    ("http://Example.COM/x", "example.com"), ("http://u:p@h.example:8080/a/b", "h.example"),
    ("h.example:443", "h.example"), ("ftp://[2001:db8::1]:21/f", "[2001:db8::1]"), ("-", "-"),
])
def test_host_of_access_log_urls(url, host):
    assert metrics.host_of(url) == host


def test_hit_ratio_window_over_minute_and_hour():
    w = statuspage.RatioWindow()
    assert w.ratio(1000, 60, 0, 0) is None
    w.add(1000, 0, 0)
    w.add(3000, 50, 100)  # 50 % over the first 2000 s
    w.add(4540, 50, 100)
    # The last minute: since the sample at 4540 (the newest one at least 60 s old at 4600).
    assert w.ratio(4600, 60, 59, 110) == pytest.approx(9 / 10)
    # The last hour: no sample is that old yet, so since start.
    assert w.ratio(4600, 3600, 59, 110) == pytest.approx(59 / 110)
    assert w.ratio(3100, 3600, 55, 101) == pytest.approx(55 / 101)
    w.add(8000, 60, 120)  # samples older than an hour are dropped
    assert w.times == [4540, 8000]


def test_status_page_escapes_host_names():
    snap = statuspage.Snapshot(name="<n>", version="1", now=100.0, started=0.0, proxy_address="p:1",
                               top_by_requests=[("<script>", 1, 2)], top_by_bytes=[("<script>", 1, 2)])
    page = statuspage.render(snap)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;n&gt;" in page
    assert "1 min 40 s" in page
