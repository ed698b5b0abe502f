"""The upstream HTTP/1.1 client (webproxy.upstream) on its own, against raw-socket origins that
write exact bytes: what goes out, how responses are framed, the keep-alive pool, retries,
timeouts, strictness, 1xx, DNS caching and backpressure."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from tests.rawserver import response
from tests.support import unanswered_port
from webproxy.dns import DNSError, Resolver
from webproxy.errors import OriginError, UpstreamError
from webproxy.httpmsg import Target
from webproxy.originconn import BODY_HIGH
from webproxy.upstream import Upstream

WAIT = 20.0  # a ceiling so a broken client fails instead of hanging; never a speed check


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request):
    """Every test runs on both loops: the proxy uses uvloop when it is installed."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def config(**overrides: Any) -> dict[str, Any]:
    cfg = {"connect_timeout": 5.0, "read_timeout": 5.0, "pool_size": 256, "pool_size_per_host": 0,
           "keepalive_timeout": 30.0, "dns_ttl": 60.0}
    cfg.update(overrides)
    return cfg


def target(port: int, path: str = "/", host: str = "127.0.0.1") -> Target:
    return Target("http", host, port, f"{host}:{port}", path)


async def fetch(up: Upstream, port: int, path: str = "/", method: str = "GET", headers: Any = None,
                **kw: Any) -> tuple[Any, bytes]:
    """(response, body) of one complete exchange; the connection goes back to the pool."""
    resp = await asyncio.wait_for(up.request(method, target(port, path), headers or [("Host", "x")], **kw), WAIT)
    body = bytearray()
    while chunk := await asyncio.wait_for(resp.read(), WAIT):
        body += chunk
    resp.release()
    return resp, bytes(body)


# ---- what goes out ---------------------------------------------------------------------------

async def test_request_goes_out_byte_exact_with_only_the_given_fields(raw_origin):
    o = raw_origin(lambda req, n: response(200, b"ok"))
    up = Upstream(config())
    path = "/a%2Fb/../c?q=%41%zz&x=1;y"
    headers = [("Host", "example.test"), ("x-lower", "v"), ("X-Dup", "1"), ("X-Dup", "2")]
    await fetch(up, o.port, path, headers=headers)
    assert o.requests == [f"GET {path} HTTP/1.1\r\nHost: example.test\r\nx-lower: v\r\nX-Dup: 1\r\n"
                          "X-Dup: 2\r\n\r\n".encode()]
    await up.close()


async def test_request_body_of_unknown_length_is_streamed_chunked(raw_origin):
    o = raw_origin(lambda req, n: response(200, b"ok"))
    up = Upstream(config())

    async def body():
        for part in (b"hello ", b"", b"world"):
            await asyncio.sleep(0.01)
            yield part

    resp, got = await fetch(up, o.port, "/up", "POST", body=body())
    assert resp.status == 200 and got == b"ok"
    assert o.requests[0] == (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
    await up.close()


async def test_request_body_with_content_length_goes_out_as_is(raw_origin):
    o = raw_origin(lambda req, n: response(200, b"ok"))
    up = Upstream(config())

    async def body():
        yield b"abc"
        yield b"de"

    await fetch(up, o.port, "/up", "PUT", headers=[("Host", "x"), ("Content-Length", "5")], body=body())
    assert o.requests[0] == b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
    await up.close()


# ---- response framing ------------------------------------------------------------------------

async def test_keep_alive_carries_requests_on_one_connection(raw_origin):
    o = raw_origin(lambda req, n: response(200, f"answer {n}".encode(), "Content-Type: text/plain"))
    up = Upstream(config())
    bodies = [(await fetch(up, o.port, f"/{i}"))[1] for i in range(3)]
    assert bodies == [b"answer 0", b"answer 1", b"answer 2"]
    assert o.connections == 1 and up.opened == 1
    await up.close()


async def test_head_response_has_no_body_and_the_connection_is_reused(raw_origin):
    def respond(req: bytes, n: int) -> bytes:
        if req.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        return response(200, b"after head")

    o = raw_origin(respond)
    up = Upstream(config())
    resp, body = await fetch(up, o.port, "/h", "HEAD")
    assert resp.status == 200 and resp.length == 1000 and body == b""
    assert (await fetch(up, o.port, "/g"))[1] == b"after head"
    assert o.connections == 1
    await up.close()


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body(raw_origin, status):
    def respond(req: bytes, n: int) -> bytes:
        if n == 0:
            return f"HTTP/1.1 {status} X\r\nETag: \"1\"\r\n\r\n".encode()
        return response(200, b"next")

    o = raw_origin(respond)
    up = Upstream(config())
    resp, body = await fetch(up, o.port)
    assert resp.status == status and body == b""
    assert (await fetch(up, o.port))[1] == b"next"
    assert o.connections == 1
    await up.close()


async def test_chunked_body_is_decoded_and_trailers_are_not_merged(raw_origin):
    o = raw_origin(lambda req, n: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                                  b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n")
    up = Upstream(config())
    resp, body = await fetch(up, o.port)
    assert body == b"hello world"
    assert [k for k, _ in resp.headers] == ["Transfer-Encoding", "Trailer"]
    assert resp.length is None
    await up.close()


async def test_close_delimited_body_ends_at_the_close(raw_origin):
    o = raw_origin(lambda req, n: [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ", 0.05,
                                   b"part two"], close_after=True)
    up = Upstream(config())
    resp, body = await fetch(up, o.port)
    assert body == b"part one, part two" and resp.length is None
    assert up.stats()["idle"] == 0  # a close-delimited connection is never reused
    await up.close()


async def test_informational_responses_arrive_in_order_and_stay_out_of_the_final_one(raw_origin):
    o = raw_origin(lambda req, n: [b"HTTP/1.1 100 Continue\r\n\r\n", 0.02,
                                   b"HTTP/1.1 102 Processing\r\n\r\n",
                                   b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", 0.02,
                                   response(200, b"final", "Content-Type: text/plain")])
    up = Upstream(config())
    seen: list[tuple[int, str, list[tuple[str, str]]]] = []
    resp, body = await fetch(up, o.port, informational=lambda s, r, h: seen.append((s, r, h)))
    assert [(s, r) for s, r, _ in seen] == [(100, "Continue"), (102, "Processing"), (103, "Early Hints")]
    assert seen[2][2] == [("Link", "</s.css>; rel=preload")]
    assert resp.status == 200 and body == b"final"
    assert ("Link", "</s.css>; rel=preload") not in resp.headers
    await up.close()


# ---- strictness ------------------------------------------------------------------------------

MALFORMED = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "differing-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "invalid-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "bare-cr": b"HTTP/1.1 200 OK\r\nX-A: one\rtwo\r\nContent-Length: 5\r\n\r\nhello",
    "bare-lf": b"HTTP/1.1 200 OK\r\nX-A: one\ntwo\r\nContent-Length: 5\r\n\r\nhello",
    "oversized-head": b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\nContent-Length: 5\r\n\r\nhello",
    "bad-status-line": b"HTTP/1.1 2OO OK\r\nContent-Length: 5\r\n\r\nhello",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "unasked-101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "te-not-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 5\r\n\r\nhello",
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
async def test_malformed_response_heads_are_502_naming_the_host(raw_origin, shape):
    o = raw_origin(lambda req, n: MALFORMED[shape])
    up = Upstream(config())
    with pytest.raises(UpstreamError) as e:
        await fetch(up, o.port)
    assert e.value.status == 502 and e.value.code == "ERR_INVALID_RESP"
    assert f"127.0.0.1:{o.port} sent an invalid response" in e.value.message
    assert len(e.value.message) < 200
    assert up.stats() == {"live": 0, "idle": 0, "opened": 1}  # the connection was dropped
    await up.close()


@pytest.mark.parametrize("shape", ["length", "chunked"])
async def test_a_body_that_ends_early_raises_body_error(raw_origin, shape):
    head = (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" if shape == "length"
            else b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n")
    o = raw_origin(lambda req, n: [head, b"only ten b"], close_after=True)
    up = Upstream(config())
    resp = await up.request("GET", target(o.port), [("Host", "x")])
    assert resp.status == 200
    got = b""
    with pytest.raises(OriginError, match="closed the connection before the end of the body"):
        while chunk := await asyncio.wait_for(resp.read(), WAIT):
            got += chunk
    assert got == b"only ten b"
    resp.abort()
    assert up.stats()["live"] == 0
    await up.close()


# ---- the pool and retries --------------------------------------------------------------------

def answer_once_then_close(req: bytes, n: int) -> bytes | None:
    """Answers the first request of each connection; closes the connection at the second one, as an
    origin does whose keep-alive timeout ran out just as the request arrived."""
    return response(200, b"fresh connection") if n == 0 else None


async def test_get_on_a_pooled_connection_the_origin_closed_is_retried_once(raw_origin):
    o = raw_origin(answer_once_then_close)
    up = Upstream(config())
    await fetch(up, o.port)
    resp, body = await fetch(up, o.port)
    assert resp.status == 200 and body == b"fresh connection"
    assert o.connections == 2 and len(o.requests) == 3
    await up.close()


async def test_post_on_a_pooled_connection_the_origin_closed_is_not_retried(raw_origin):
    o = raw_origin(answer_once_then_close)
    up = Upstream(config())
    await fetch(up, o.port)
    with pytest.raises(UpstreamError) as e:
        await fetch(up, o.port, "/form", "POST", headers=[("Host", "x"), ("Content-Length", "0")])
    assert e.value.status == 502 and "closed the connection without answering" in e.value.message
    assert o.connections == 1 and len(o.requests) == 2
    await up.close()


async def test_a_fresh_connection_closed_without_answer_is_not_retried(raw_origin):
    o = raw_origin(lambda req, n: None)
    up = Upstream(config())
    with pytest.raises(UpstreamError) as e:
        await fetch(up, o.port)
    assert e.value.status == 502 and "closed the connection without answering" in e.value.message
    assert o.connections == 1
    await up.close()


async def test_per_host_limit_queues_requests_on_one_connection(raw_origin):
    o = raw_origin(lambda req, n: [0.1, response(200, b"ok")])
    up = Upstream(config(pool_size_per_host=1))
    results = await asyncio.gather(*(fetch(up, o.port, f"/{i}") for i in range(3)))
    assert [b for _, b in results] == [b"ok"] * 3
    assert o.connections == 1
    await up.close()


async def test_total_limit_evicts_an_idle_connection_of_another_host(raw_origin):
    a = raw_origin(lambda req, n: response(200, b"a"))
    b = raw_origin(lambda req, n: response(200, b"b"))
    up = Upstream(config(pool_size=1))
    await fetch(up, a.port)
    await fetch(up, b.port)
    assert up.stats()["live"] == 1 and up.opened == 2
    await up.close()


async def test_many_concurrent_requests_to_several_hosts_stay_within_the_total_limit(raw_origin):
    origins = [raw_origin(lambda req, n: [0.01, response(200, b"ok")]) for _ in range(3)]
    up = Upstream(config(pool_size=2))
    peak = 0

    async def one(i: int) -> bytes:
        nonlocal peak
        resp = await up.request("GET", target(origins[i % 3].port, f"/{i}"), [("Host", "x")])
        peak = max(peak, up.stats()["live"])
        body = b""
        while chunk := await resp.read():
            body += chunk
        resp.release()
        return body

    bodies = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(30))), WAIT)
    assert bodies == [b"ok"] * 30
    assert peak <= 2 and up.stats()["live"] <= 2
    await up.close()


async def test_tiny_chunks_are_bounded_by_count_too(raw_origin):
    # 200,000 one-byte chunks: a buffer bounded by payload bytes alone would hold them all.
    chunks = b"1\r\nx\r\n" * 200_000
    o = raw_origin(lambda req, n: [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunks, b"0\r\n\r\n"])
    up = Upstream(config())
    resp = await up.request("GET", target(o.port), [("Host", "x")])
    await asyncio.sleep(0.5)
    # Paused after BODY_HIGH / PIECE_COST pieces plus what one read of the socket carried.
    assert len(resp._conn._chunks) < 50_000
    body = b""
    while chunk := await asyncio.wait_for(resp.read(), WAIT):
        body += chunk
    assert body == b"x" * 200_000
    resp.release()
    await up.close()


async def test_idle_connections_expire_after_the_keepalive_timeout(raw_origin):
    o = raw_origin(lambda req, n: response(200, b"ok"))
    up = Upstream(config(keepalive_timeout=0.2))
    await fetch(up, o.port)
    assert up.stats()["idle"] == 1
    await asyncio.sleep(0.5)
    assert up.stats() == {"live": 0, "idle": 0, "opened": 1}
    await fetch(up, o.port)
    assert o.connections == 2
    await up.close()


# ---- timeouts --------------------------------------------------------------------------------

async def test_connect_timeout_is_504():
    with unanswered_port() as port:
        up = Upstream(config(connect_timeout=0.3))
        started = time.monotonic()
        with pytest.raises(UpstreamError) as e:
            await fetch(up, port)
        assert e.value.status == 504 and "timed out connecting to 127.0.0.1" in e.value.message
        assert time.monotonic() - started < 3
        await up.close()


async def test_read_timeout_before_the_head_is_504(raw_origin):
    o = raw_origin(lambda req, n: [2.0, response(200, b"late")])
    up = Upstream(config(read_timeout=0.3))
    with pytest.raises(UpstreamError) as e:
        await fetch(up, o.port)
    assert e.value.status == 504 and e.value.code == "ERR_READ_TIMEOUT"
    assert f"timed out waiting for 127.0.0.1:{o.port}" in e.value.message
    await up.close()


async def test_read_timeout_in_the_body_raises_body_error(raw_origin):
    o = raw_origin(lambda req, n: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", 2.0, b"rest!!"])
    up = Upstream(config(read_timeout=0.3))
    with pytest.raises(OriginError, match="timed out"):
        await fetch(up, o.port)
    await up.close()


async def test_a_client_uploading_slowly_is_not_an_origin_read_timeout(raw_origin):
    o = raw_origin(lambda req, n: response(200, b"got it"))
    up = Upstream(config(read_timeout=0.25))

    async def slow_body():  # each pause longer than the read timeout
        for part in (b"a", b"b", b"c"):
            await asyncio.sleep(0.4)
            yield part

    resp, body = await fetch(up, o.port, "/up", "POST", body=slow_body())
    assert resp.status == 200 and body == b"got it"
    await up.close()


async def test_refused_and_unresolvable_origins_are_502():
    up = Upstream(config(), Resolver(60, lookup=lambda h, p: _no_such_name()))
    with pytest.raises(UpstreamError) as e:
        await fetch(up, 9)
    assert e.value.status == 502 and "connection refused" in e.value.message
    with pytest.raises(UpstreamError) as e:
        await up.request("GET", target(80, host="nowhere.test"), [("Host", "nowhere.test")])
    assert e.value.status == 502 and e.value.code == "ERR_DNS_FAIL"
    assert "cannot resolve nowhere.test:80: DNS lookup failed" in e.value.message
    await up.close()


async def _no_such_name() -> list[tuple[int, str]]:
    raise DNSError(4, "Domain name not found")


# ---- DNS cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("ttl,lookups", [(60.0, 1), (0.0, 3)])
async def test_dns_answers_are_reused_for_the_ttl(raw_origin, ttl, lookups):
    o = raw_origin(lambda req, n: response(200, b"ok"))
    calls: list[str] = []

    async def lookup(host: str, port: int) -> list[tuple[int, str]]:
        calls.append(host)
        return [(socket.AF_INET, "127.0.0.1")]

    # No keep-alive, so every request opens a connection and needs the address again.
    up = Upstream(config(keepalive_timeout=0.0, dns_ttl=ttl), Resolver(ttl, lookup=lookup))
    for _ in range(3):
        resp = await up.request("GET", target(o.port, host="origin.test"), [("Host", "origin.test")])
        while await resp.read():
            pass
        resp.release()
    assert calls == ["origin.test"] * lookups
    assert o.connections == 3
    await up.close()


# ---- backpressure ----------------------------------------------------------------------------

async def test_a_slow_consumer_stops_the_origin_after_a_bounded_buffer(raw_origin):
    size = 32 * 1024 * 1024
    block = b"x" * 65536
    o = raw_origin(lambda req, n: [f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode(),
                                   *([block] * (size // len(block)))])
    up = Upstream(config())
    resp = await up.request("GET", target(o.port), [("Host", "x")])
    await asyncio.sleep(0.5)  # nobody reads: the origin must be held off, not buffered
    conn = resp._conn
    assert conn._buffered <= BODY_HIGH + 1024 * 1024, conn._buffered
    got = 0
    while chunk := await asyncio.wait_for(resp.read(), WAIT):
        got += len(chunk)
    assert got == size
    resp.release()
    await up.close()
