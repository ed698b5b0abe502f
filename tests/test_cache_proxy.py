"""The disk cache as a user of the proxy sees it: origin request counters prove hits and misses,
bytes on the wire prove what is served, files on disk prove what is stored."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.support import RawClient, curl, header
from tests.support import proxy_get as get
from tests.support import run_webproxy as run_cli


@pytest.fixture
def cproxy(make_proxy):
    """A proxy with the cache on (and active refresh off, so origin counters only see clients)."""
    return make_proxy({"refresh": {"enabled": False}})


def last_log(proxy, n=1):
    return proxy.access_lines(wait_for=n)[-1]


def wait_log(proxy, needle, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = proxy.access_lines()
        if any(needle in line for line in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never logged: {proxy.access_lines()[-5:]}")


def test_second_request_is_served_from_cache_without_the_origin(cproxy, origin):
    url = origin.put("fresh1", b"cached body", Cache_Control="max-age=3600", Content_Type="text/plain")
    s1, h1, b1 = get(cproxy, url)
    s2, h2, b2 = get(cproxy, url)
    assert (s1, b1) == (200, b"cached body") and (s2, b2) == (200, b"cached body")
    assert origin.full["fresh1"] == 1
    assert h1["x-cache"] == "MISS from webproxy" and h2["x-cache"] == "HIT from webproxy"
    assert "age" in h2 and int(h2["age"]) >= 0
    lines = cproxy.access_lines(wait_for=2)
    assert "TCP_MISS/200" in lines[-2] and "TCP_MEM_HIT/200" in lines[-1]
    assert "HIER_NONE/-" in lines[-1]


def test_stale_entry_is_revalidated_with_etag(cproxy, origin):
    url = origin.put("etag1", b"v1 body", Cache_Control="max-age=0", ETag='"v1"')
    get(cproxy, url)
    status, fields, body = get(cproxy, url)
    assert (status, body) == (200, b"v1 body")
    assert origin.full["etag1"] == 1 and origin.conditional["etag1"] == 1
    sent = [r for r in origin.requests if r["path_qs"] == "/obj/etag1"][-1]["headers"]
    assert (b"If-None-Match", b'"v1"') in sent
    assert "TCP_REFRESH_UNMODIFIED/200" in last_log(cproxy, 2)


def test_stale_entry_is_revalidated_with_last_modified(cproxy, origin):
    lm = "Sun, 01 Nov 2026 10:00:00 GMT"
    url = origin.put("lm1", b"lm body", Cache_Control="max-age=0", Last_Modified=lm)
    get(cproxy, url)
    assert get(cproxy, url)[2] == b"lm body"
    sent = [r for r in origin.requests if r["path_qs"] == "/obj/lm1"][-1]["headers"]
    assert (b"If-Modified-Since", lm.encode()) in sent
    assert origin.full["lm1"] == 1


def test_changed_object_replaces_the_entry(cproxy, origin):
    url = origin.put("chg", b"old", Cache_Control="max-age=0", ETag='"a"')
    get(cproxy, url)
    origin.put("chg", b"new!", Cache_Control="max-age=0", ETag='"b"')
    assert get(cproxy, url)[2] == b"new!"
    assert "TCP_REFRESH_MODIFIED/200" in last_log(cproxy, 2)
    assert get(cproxy, url)[2] == b"new!"  # the stored copy is the new one (revalidated with "b")
    assert origin.full["chg"] == 2


def test_stale_entry_is_served_when_origin_fails_and_stale_if_error_allows(cproxy, origin):
    url = origin.put("sie", b"keep me", Cache_Control="max-age=0, stale-if-error=600", ETag='"s"')
    get(cproxy, url)
    origin.put("sie", b"oops", status=500, Cache_Control="no-store")
    status, _, body = get(cproxy, url)
    assert (status, body) == (200, b"keep me")
    assert "TCP_REFRESH_FAIL_OLD/200" in last_log(cproxy, 2)


def test_origin_error_without_stale_if_error_is_passed_on(cproxy, origin):
    url = origin.put("nosie", b"x", Cache_Control="max-age=0", ETag='"n"')
    get(cproxy, url)
    origin.put("nosie", b"broken", status=503)
    assert get(cproxy, url)[0] == 503


@pytest.mark.parametrize("fields", [{"Cache_Control": "no-store"}, {"Cache_Control": "private, max-age=600"}])
def test_uncacheable_responses_are_not_stored(cproxy, origin, fields):
    name = "nc" + str(abs(hash(str(fields))))
    url = origin.put(name, b"secret", **fields)
    get(cproxy, url)
    get(cproxy, url)
    assert origin.full[name] == 2


def test_request_with_authorization_is_not_served_to_others(cproxy, origin):
    url = origin.put("authz", b"alice's page", Cache_Control="max-age=600")
    get(cproxy, url, "Authorization: Basic YWxpY2U6eA==")
    get(cproxy, url)
    assert origin.full["authz"] == 2


def test_set_cookie_response_is_not_shared(cproxy, origin):
    url = origin.put("cookie", b"for one user", Cache_Control="max-age=600", Set_Cookie="session=abc")
    get(cproxy, url)
    _, fields, _ = get(cproxy, url)
    assert origin.full["cookie"] == 2
    assert fields["set-cookie"] == "session=abc"  # each user still gets their own cookie


def test_public_response_with_set_cookie_is_shared_without_the_cookie(cproxy, origin):
    url = origin.put("pubcookie", b"same for all", Cache_Control="public, max-age=600", Set_Cookie="session=abc")
    _, first, _ = get(cproxy, url)
    _, second, body = get(cproxy, url)
    assert origin.full["pubcookie"] == 1 and body == b"same for all"
    assert first["set-cookie"] == "session=abc" and "set-cookie" not in second


def test_large_object_is_served_byte_exact_from_its_file(cproxy, origin):
    body = os.urandom(3 * 1024 * 1024 + 5)
    url = origin.put("big", body, Cache_Control="max-age=600")
    s1, _, b1 = get(cproxy, url)
    s2, h2, b2 = get(cproxy, url)
    assert hashlib.sha256(b1).digest() == hashlib.sha256(b2).digest() == hashlib.sha256(body).digest()
    assert origin.full["big"] == 1
    assert "TCP_HIT/200" in last_log(cproxy, 2)
    assert h2["content-length"] == str(len(body))


def test_range_request_on_a_cached_object_is_answered_206_from_the_cache(cproxy, origin):
    body = bytes(range(256)) * 400
    url = origin.put("rng", body, Cache_Control="max-age=600")
    get(cproxy, url)
    status, fields, part = get(cproxy, url, "Range: bytes=1000-1999")
    assert status == 206 and part == body[1000:2000]
    assert fields["content-range"] == f"bytes 1000-1999/{len(body)}"
    status, fields, _ = get(cproxy, url, "Range: bytes=999999-")
    assert status == 416
    assert origin.full["rng"] == 1


def test_head_is_answered_from_the_stored_get(cproxy, origin):
    url = origin.put("headme", b"0123456789", Cache_Control="max-age=600")
    get(cproxy, url)
    c = RawClient(cproxy.port)
    c.send(f"HEAD {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp, body = c.response(b"HEAD")
    assert resp.status_code == 200 and body == b""
    assert header(resp, "content-length") == "10"
    assert origin.full["headme"] == 1


def test_client_conditional_request_gets_304_from_a_fresh_entry(cproxy, origin):
    url = origin.put("cond", b"body", Cache_Control="max-age=600", ETag='"c1"')
    get(cproxy, url)
    status, fields, body = get(cproxy, url, 'If-None-Match: "c1"')
    assert status == 304 and body == b""
    assert origin.full["cond"] == 1 and origin.conditional["cond"] == 0
    assert "TCP_IMS_HIT/304" in last_log(cproxy, 2)


def test_vary_keeps_one_variant_per_request_header_value(cproxy, origin):
    url = origin.put("vary", b"variant", Cache_Control="max-age=600", Vary="Accept-Language")
    for lang in ("en", "fr", "en", "fr"):
        get(cproxy, url, f"Accept-Language: {lang}")
    assert origin.full["vary"] == 2


def test_post_invalidates_the_cached_url(cproxy, origin):
    origin.put("inv-get", b"x", Cache_Control="max-age=600")
    cached = origin.url("/obj/inv-get")
    get(cproxy, cached)
    curl("-x", cproxy.url, "-X", "POST", "--data", "change", cached)
    get(cproxy, cached)
    assert origin.full["inv-get"] == 2


def test_only_if_cached_miss_is_504(cproxy, origin):
    url = origin.put("oic", b"x", Cache_Control="max-age=600")
    assert get(cproxy, url, "Cache-Control: only-if-cached")[0] == 504
    assert origin.full["oic"] == 0
    get(cproxy, url)
    assert get(cproxy, url, "Cache-Control: only-if-cached")[0] == 200


def test_purge_method_removes_a_url_for_admin_clients(cproxy, origin):
    url = origin.put("purge-m", b"x", Cache_Control="max-age=600")
    get(cproxy, url)
    r = curl("-x", cproxy.url, "-X", "PURGE", "-i", url)
    assert r.stdout.startswith(b"HTTP/1.1 200")
    get(cproxy, url)
    assert origin.full["purge-m"] == 2
    r = curl("-x", cproxy.url, "-X", "PURGE", "-i", origin.url("/obj/never-cached"))
    assert r.stdout.startswith(b"HTTP/1.1 404")


def test_purge_method_is_refused_to_non_admin_clients(make_proxy, origin):
    p = make_proxy({"access": {"admin_clients": ["10.0.0.0/8"]}})
    url = origin.put("purge-d", b"x", Cache_Control="max-age=600")
    get(p, url)
    assert curl("-x", p.url, "-X", "PURGE", "-i", url).stdout.startswith(b"HTTP/1.1 403")
    get(p, url)
    assert origin.full["purge-d"] == 1


def test_webproxy_purge_command_works_while_the_proxy_runs(cproxy, origin):
    url = origin.put("purge-cli", b"x" * 100, Cache_Control="max-age=600")
    get(cproxy, url)
    get(cproxy, url)
    r = run_cli("purge", "-c", str(cproxy.config_path), url)
    assert r.returncode == 0, r.stderr
    assert url in r.stdout
    deadline = time.monotonic() + 5
    while origin.full["purge-cli"] < 2 and time.monotonic() < deadline:
        get(cproxy, url)
        time.sleep(0.2)
    assert origin.full["purge-cli"] == 2
    assert run_cli("purge", "-c", str(cproxy.config_path), origin.url("/obj/not-there")).returncode == 1


def test_cache_stats_command_reports_the_running_proxys_hits(cproxy, origin):
    url = origin.put("stats", b"y" * 1000, Cache_Control="max-age=600")
    for _ in range(4):
        get(cproxy, url)
    deadline = time.monotonic() + 10
    out = ""
    while time.monotonic() < deadline:
        out = run_cli("cache", "stats", "-c", str(cproxy.config_path)).stdout
        if any(line.split()[:2] == ["hits", "3"] for line in out.splitlines()):
            break
        time.sleep(0.5)
    assert "entries" in out and "hit ratio" in out.lower()
    hits_line = [line for line in out.splitlines() if line.lower().startswith("hits")][0]
    assert hits_line.split()[1] == "3"


def test_cache_survives_a_restart(cproxy, origin):
    url = origin.put("persist", b"still here", Cache_Control="max-age=600")
    get(cproxy, url)
    cproxy.stop()
    cproxy.start()
    assert get(cproxy, url)[2] == b"still here"
    assert origin.full["persist"] == 1


def test_kill_9_during_a_large_fill_leaves_nothing_truncated(cproxy, make_origin):
    o = make_origin()
    total = 64 * 1024 * 1024
    state = {"serving": threading.Event(), "slow": True}

    async def slow(request):
        from aiohttp import web
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=600", "Content-Length": str(total)})
        await resp.prepare(request)
        block = b"z" * 65536
        for i in range(total // 65536):
            await resp.write(block)
            if i == 100 and state["slow"]:
                state["serving"].set()
                while state["slow"]:  # stalled until the proxy has been killed (then the origin stops at once)
                    await __import__("asyncio").sleep(0.05)
        return resp

    o.route("GET", "/huge", slow)
    o.start()
    url = o.url("/huge")
    client = subprocess.Popen(["curl", "-s", "-x", cproxy.url, url, "-o", "/dev/null"])
    assert state["serving"].wait(20)
    time.sleep(0.3)
    cproxy.proc.send_signal(signal.SIGKILL)
    cproxy.proc.wait()
    client.kill()
    client.wait()
    state["slow"] = False
    cproxy.start()
    r = subprocess.run(["curl", "-s", "-x", cproxy.url, url, "-o", "/dev/null", "-w", "%{size_download}"],
                       capture_output=True, timeout=120)
    assert r.stdout == str(total).encode()
    assert o.hits["/huge"] == 2
    assert "TCP_MISS/200" in last_log(cproxy, 1)


def test_origin_dying_mid_body_stores_nothing(cproxy):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    served = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            served.append(1)
            conn.sendall(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{port}/short"
    for _ in range(2):
        r = subprocess.run(["curl", "-s", "-x", cproxy.url, url, "-o", "/dev/null", "-w", "%{size_download}"],
                           capture_output=True, timeout=30)
        assert r.stdout != b"100000"
    assert len(served) == 2
    srv.close()


def test_concurrent_misses_are_collapsed_into_one_origin_fetch(cproxy, origin):
    url = origin.put("collapse", b"c" * 5000, delay=1.0, Cache_Control="max-age=600")
    results = []

    def fetch() -> None:
        results.append(get(cproxy, url)[2])

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [b"c" * 5000] * 6
    assert origin.full["collapse"] == 1


def test_heuristic_freshness_from_last_modified(cproxy, origin):
    url = origin.put("heur", b"h", Last_Modified="Sun, 01 Nov 2026 00:00:00 GMT")
    get(cproxy, url)
    get(cproxy, url)
    assert origin.full["heur"] == 1 and origin.conditional["heur"] == 0
