"""Explicit forward proxying: every method, bodies both ways, keep-alive and pipelining,
with real clients (curl, urllib) and raw sockets read by h11."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import urllib.request

import pytest

from tests.support import MethodEchoOrigin, PeakRss, RawClient, curl, header


def test_curl_get_through_proxy(proxy, origin):
    r = curl("-x", proxy.url, origin.url("/text/curl"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello curl\n"


def test_urllib_with_proxy_handler(proxy, origin):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
    with opener.open(origin.url("/text/urllib"), timeout=10) as resp:
        assert resp.status == 200
        assert resp.read() == b"hello urllib\n"
        assert "webproxy" in resp.headers["Via"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "PROPFIND"])
def test_every_method_is_forwarded(proxy, origin, method):
    r = curl("-x", proxy.url, "-X", method, origin.url("/echo/m"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{method} /echo/m HTTP/1.1\n".encode())


@pytest.mark.parametrize("method", ["BREW", "X-CUSTOM-METHOD"])
def test_unknown_extension_method_is_forwarded(proxy, method):
    o = MethodEchoOrigin()
    r = curl("-x", proxy.url, "-X", method, f"http://127.0.0.1:{o.port}/pot?x=1")
    assert r.stdout == f"{method} /pot?x=1 HTTP/1.1".encode()
    o.sock.close()


def test_pipelined_extension_method_after_a_get(proxy, origin):
    o = MethodEchoOrigin()
    c = RawClient(proxy.port)
    c.send(f"GET http://127.0.0.1:{o.port}/one HTTP/1.1\r\nHost: x\r\n\r\n"
           f"BREW http://127.0.0.1:{o.port}/two HTTP/1.1\r\nHost: x\r\n\r\n"
           f"GET http://127.0.0.1:{o.port}/three HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert [c.response()[1] for _ in range(3)] == [b"GET /one HTTP/1.1", b"BREW /two HTTP/1.1", b"GET /three HTTP/1.1"]
    o.sock.close()


def test_head_response_has_headers_and_no_body(proxy, origin):
    c = RawClient(proxy.port)
    c.send(f"HEAD {origin.url('/stream/1000?length=1')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp, body = c.response(b"HEAD")
    assert resp.status_code == 200, proxy.stderr()
    assert header(resp, "content-length") == "1000"
    assert body == b""
    # the connection is still in step: a second request on it works
    c.send(f"GET {origin.url('/text/after-head')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp, body = c.response()
    assert body == b"hello after-head\n"


@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body(proxy, origin, code):
    c = RawClient(proxy.port)
    c.send(f"GET {origin.url(f'/status/{code}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp, body = c.response()
    assert resp.status_code == code
    assert body == b""
    c.send(f"GET {origin.url('/text/next')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert c.response()[1] == b"hello next\n"


def test_request_target_is_passed_byte_for_byte(proxy, origin):
    path = "/echo/a%20b/%2F%7e/x?q=%41&r=a+b&&s"
    c = RawClient(proxy.port)
    c.send(f"GET http://127.0.0.1:{origin.port}{path} HTTP/1.1\r\nHost: ignored.example\r\n\r\n".encode())
    resp, body = c.response()
    assert body.split(b"\n")[0] == f"GET {path} HTTP/1.1".encode()


def test_absolute_uri_authority_wins_over_host_header(proxy, origin):
    c = RawClient(proxy.port)
    c.send(f"GET {origin.url('/echo/h')} HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
    _, body = c.response()
    lines = body.decode().split("\n")
    assert f"Host: 127.0.0.1:{origin.port}" in lines
    assert "evil.example" not in body.decode()


def test_hop_by_hop_headers_are_stripped_and_via_added(proxy, origin):
    c = RawClient(proxy.port)
    c.send(
        f"GET {origin.url('/echo/hop')} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret-Hop\r\n"
        "X-Secret-Hop: 1\r\nProxy-Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\nUpgrade: websocket\r\nX-End-To-End: yes\r\n\r\n".encode()
    )
    resp, body = c.response()
    received = body.decode().lower()
    for name in ("x-secret-hop", "proxy-connection", "keep-alive", "te:", "proxy-authorization", "upgrade"):
        assert name not in received, name
    assert "x-end-to-end: yes" in received
    assert "via: 1.1 webproxy" in received
    assert "webproxy" in header(resp, "via")


def test_upstream_client_adds_no_headers_of_its_own(proxy, origin):
    c = RawClient(proxy.port)
    c.send(f"GET {origin.url('/echo/bare')} HTTP/1.1\r\nHost: x\r\nX-Only: this\r\n\r\n".encode())
    _, body = c.response()
    names = sorted(line.split(":")[0].lower() for line in body.decode().split("\n\n")[0].split("\n")[1:])
    assert names == ["host", "via", "x-only"]  # no User-Agent, Accept, Accept-Encoding, Cookie...


def test_x_forwarded_for_when_enabled(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "server": {"x_forwarded_for": True}})
    r = curl("-x", p.url, "-H", "X-Forwarded-For: 10.9.9.9", origin.url("/echo/xff"))
    assert b"X-Forwarded-For: 10.9.9.9, 127.0.0.1" in r.stdout


def test_max_forwards_zero_trace_is_answered_by_the_proxy(proxy, origin):
    before = origin.hits["/echo/trace"]
    r = curl("-x", proxy.url, "-X", "TRACE", "-H", "Max-Forwards: 0", "-H", "Authorization: secret",
             origin.url("/echo/trace"), "-i")
    assert b"200 OK" in r.stdout.split(b"\r\n")[0]
    assert b"message/http" in r.stdout
    assert b"TRACE " in r.stdout and b"secret" not in r.stdout
    assert origin.hits["/echo/trace"] == before


def test_max_forwards_is_decremented(proxy, origin):
    r = curl("-x", proxy.url, "-X", "OPTIONS", "-H", "Max-Forwards: 3", origin.url("/echo/mf"))
    assert b"Max-Forwards: 2" in r.stdout


def test_content_length_upload_is_streamed_and_keeps_its_length(proxy, origin, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    r = curl("-x", proxy.url, "--data-binary", f"@{f}", "-H", "Content-Type: application/x-test", origin.url("/upload"))
    got = json.loads(r.stdout)
    assert got["length"] == len(data)
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    assert got["cl"] == str(len(data)) and got["te"] is None


def test_chunked_upload_is_forwarded(proxy, origin):
    c = RawClient(proxy.port)
    c.send(f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".encode())
    resp, body = c.response()
    got = json.loads(body)
    assert got["length"] == 11
    assert got["sha256"] == hashlib.sha256(b"hello world").hexdigest()


def test_expect_100_continue(proxy, origin):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
              "Expect: 100-continue\r\n\r\n".encode())
    first = s.recv(100)
    assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.sendall(b"abcde")
    rest = first[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    while b'"length"' not in rest:
        rest += s.recv(4096)
    assert b'"length": 5' in rest
    s.close()


def test_curl_expect_100_continue_large_upload(proxy, origin, tmp_path):
    data = os.urandom(2_000_000)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    r = curl("-x", proxy.url, "-H", "Expect: 100-continue", "-T", str(f), origin.url("/upload"))
    assert json.loads(r.stdout)["length"] == len(data)


def test_large_download_streams_with_bounded_memory(proxy, origin):
    size = 512 * 1024 * 1024
    with PeakRss(proxy.proc.pid) as rss:
        r = subprocess.run(["curl", "-sS", "-x", proxy.url, origin.url(f"/stream/{size}"), "-o", "/dev/null",
                            "-w", "%{size_download}", "--limit-rate", "400M"], capture_output=True, timeout=120)
    assert r.stdout == str(size).encode()
    assert rss.growth_kb < 30 * 1024, f"RSS grew by {rss.growth_kb // 1024} MiB"


def test_large_upload_streams_with_bounded_memory(proxy, origin):
    size = 256 * 1024 * 1024
    with PeakRss(proxy.proc.pid) as rss:
        gen = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        r = subprocess.run(["curl", "-sS", "-x", proxy.url, "-H", f"Content-Length: {size}", "--data-binary", "@-",
                            origin.url("/upload")], stdin=gen.stdout, capture_output=True, timeout=120)
        gen.wait()
    assert json.loads(r.stdout)["length"] == size
    assert rss.growth_kb < 30 * 1024, f"RSS grew by {rss.growth_kb // 1024} MiB"


def test_response_without_length_is_chunked_for_http11(proxy, origin):
    c = RawClient(proxy.port)
    c.send(f"GET {origin.url('/stream/200000')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp, body = c.response()
    assert header(resp, "transfer-encoding") == "chunked"
    assert len(body) == 200000
    c.send(f"GET {origin.url('/text/again')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert c.response()[1] == b"hello again\n"


def test_response_without_length_to_http10_client_is_close_delimited(proxy, origin):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(f"GET {origin.url('/stream/100000')} HTTP/1.0\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    assert b"connection: close" in head.lower()
    assert len(body) == 100000


def test_keep_alive_reuses_client_and_origin_connections(proxy, make_origin):
    o = make_origin()

    async def hello(request):
        from aiohttp import web
        return web.Response(text="ok")

    o.route("GET", "/ka", hello)
    o.start()
    c = RawClient(proxy.port)
    for _ in range(10):
        c.send(f"GET {o.url('/ka')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp, body = c.response()
        assert body == b"ok"
    assert o.hits["/ka"] == 10
    assert o.connections == 1


def test_http10_keep_alive_with_proxy_connection_header(proxy, origin):
    c = RawClient(proxy.port)
    c.conn = __import__("h11").Connection(__import__("h11").CLIENT)
    for i in range(3):
        c.sock.sendall(f"GET {origin.url(f'/text/ka{i}')} HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n".encode())
        data = b""
        while not data.endswith(f"hello ka{i}\n".encode()):
            chunk = c.sock.recv(4096)
            assert chunk, "proxy closed an HTTP/1.0 keep-alive connection"
            data += chunk
        assert b"connection: keep-alive" in data.lower()


def test_pipelined_requests_are_answered_in_order(proxy, origin):
    c = RawClient(proxy.port)
    names = [f"p{i}" for i in range(20)]
    c.send(b"".join(f"GET {origin.url('/text/' + n)} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in names))
    for n in names:
        resp, body = c.response()
        assert body == f"hello {n}\n".encode()


def test_max_requests_per_connection_closes_after_limit(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "server": {"max_requests_per_connection": 2}})
    c = RawClient(p.port)
    c.send(f"GET {origin.url('/text/a')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    r1, _ = c.response()
    assert header(r1, "connection") is None
    c.send(f"GET {origin.url('/text/b')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    r2, _ = c.response()
    assert header(r2, "connection") == "close"
    assert c.closed_by_peer()


def test_idle_client_connection_is_closed_after_idle_timeout(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "server": {"idle_timeout": 0.5}})
    c = RawClient(p.port)
    c.send(f"GET {origin.url('/text/idle')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    c.response()
    assert c.closed_by_peer(wait=10)


def test_access_log_is_in_squid_native_format(proxy, origin):
    curl("-x", proxy.url, origin.url("/text/logme"))
    lines = proxy.access_lines(wait_for=1)
    fields = lines[-1].split()
    assert len(fields) == 10
    ts, elapsed, client, code_status, nbytes, method, url, user, hier, ctype = fields
    float(ts)
    int(elapsed)
    assert client == "127.0.0.1"
    assert code_status == "TCP_MISS/200"
    assert int(nbytes) > len("hello logme\n")
    assert (method, url, user) == ("GET", origin.url("/text/logme"), "-")
    assert hier == "HIER_DIRECT/127.0.0.1"
    assert ctype.startswith("text/plain")


def test_status_page_for_requests_to_the_proxy_itself(proxy):
    r = curl(proxy.url + "/")
    assert b"webproxy" in r.stdout and b"requests served" in r.stdout
    r = curl("-x", proxy.url, proxy.url + "/")
    assert b"requests served" in r.stdout
