"""The cache against stalled clients, a purge from outside, and origins that send odd fields
(issue 15, items 7, 9, 10, 12): what a client receives, timed against the origin's own delay, and
what the origin's request counters say was fetched."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from aiohttp import web

from tests.support import MethodEchoOrigin, RawClient, header, proxy_get, run_webproxy

DELAY = 1.0  # the origin's own delay before it answers
COLLAPSE_WAIT = 20.0  # how long a waiter would wait for a stalled leader before the fix


@pytest.fixture
def cproxy(make_proxy):
    """The cache on, active refresh off (origin counters see only clients), a long collapse wait so
    a waiter held by a stalled leader shows in the timings."""
    return make_proxy({"refresh": {"enabled": False}, "cache": {"collapse_wait": COLLAPSE_WAIT}})


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def timed_get(proxy, url):
    start = time.monotonic()
    status, fields, body = proxy_get(proxy, url, timeout=COLLAPSE_WAIT + 20)
    return time.monotonic() - start, status, fields, body


# --- item 7: one stalled client does not hold a URL for everyone ------------------------------------


def test_a_get_whose_body_never_ends_does_not_make_others_wait(cproxy, make_origin):
    o = make_origin()

    async def reads_the_body_then_answers(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(DELAY)
        return web.Response(body=b"shared", headers={"Cache-Control": "max-age=600"})

    o.route("GET", "/needs-body", reads_the_body_then_answers)
    o.start()
    url = o.url("/needs-body")
    stalled = socket.create_connection(("127.0.0.1", cproxy.port))
    try:
        stalled.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b"x" * 10)
        wait_until(lambda: o.hits["/needs-body"] == 1)  # its request is at the origin, waiting for the body
        elapsed, status, _, body = timed_get(cproxy, url)
        assert (status, body) == (200, b"shared")
        assert elapsed < DELAY + 2.5, f"the second client waited {elapsed:.1f}s for the stalled one"
        assert o.hits["/needs-body"] == 2
        # the second client's answer was shareable, so it led and stored it
        assert proxy_get(cproxy, url)[2] == b"shared" and o.hits["/needs-body"] == 2
    finally:
        stalled.close()


def huge_then_small(o, path: str, cache_control: str) -> str:
    """Route `path` on origin `o`: after DELAY, the first request gets a 64 MiB body (which a client
    that reads none of it stalls after a few MiB), later ones `small`. Returns the URL."""

    async def handler(request: web.Request) -> web.StreamResponse:
        first = o.hits[path] == 1
        await asyncio.sleep(DELAY)
        resp = web.StreamResponse(headers={"Cache-Control": cache_control})
        resp.content_length = (64 << 20) if first else 5
        await resp.prepare(request)
        if first:
            block = b"z" * 65536
            for _ in range(1024):
                await resp.write(block)
        else:
            await resp.write(b"small")
        return resp

    o.route("GET", path, handler)
    o.start()
    return o.url(path)


def waiter_behind_a_leader_that_never_reads(proxy, o, path: str, url: str) -> float:
    """A leader that asks for `url` and reads nothing, then a second client: its time, checked."""
    leader = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        leader.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: o.hits[path] == 1)  # the leader's flight is in the air
        elapsed, status, _, body = timed_get(proxy, url)
        assert (status, body) == (200, b"small")  # its own fetch, not the leader's
        assert o.hits[path] == 2
        return elapsed
    finally:
        leader.close()


def test_waiters_are_released_when_the_leaders_answer_is_not_storable(cproxy, make_origin):
    o = make_origin()
    url = huge_then_small(o, "/not-storable", "no-store")
    elapsed = waiter_behind_a_leader_that_never_reads(cproxy, o, "/not-storable", url)
    # released when the leader's head said no-store (at most DELAY), then its own fetch (DELAY)
    assert elapsed < 2 * DELAY + 2.5, f"the waiter waited {elapsed:.1f}s for a response it could not use"


def test_a_leader_whose_client_stops_reading_releases_the_waiters(cproxy, make_origin):
    o = make_origin()
    url = huge_then_small(o, "/slow-reader", "max-age=600")
    elapsed = waiter_behind_a_leader_that_never_reads(cproxy, o, "/slow-reader", url)
    # the leader's answer (DELAY), its client idle for about a second, then its own fetch (DELAY)
    assert elapsed < 2 * DELAY + 1.5 + 2.5, f"the waiter waited {elapsed:.1f}s for a client that never reads"


def test_a_waiter_still_gets_the_leaders_stored_copy(cproxy, origin):
    url = origin.put("collapse-still", b"c" * 5000, delay=DELAY, Cache_Control="max-age=600")
    results = []
    threads = [threading.Thread(target=lambda: results.append(timed_get(cproxy, url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [(s, b) for _, s, _, b in results] == [(200, b"c" * 5000)] * 4
    assert origin.full["collapse-still"] == 1


# --- item 9: after `webproxy purge` returns, the next request is a miss ------------------------------


def test_the_next_request_after_webproxy_purge_returns_is_a_miss(cproxy, origin):
    url = origin.put("purge-next", b"p" * 100, Cache_Control="max-age=600")
    for n in range(1, 6):
        assert proxy_get(cproxy, url)[2] == b"p" * 100  # a miss (n == 1) or the first after a purge
        assert origin.full["purge-next"] == n
        _, fields, _ = proxy_get(cproxy, url)
        assert fields["x-cache"].startswith("HIT") and origin.full["purge-next"] == n  # from memory
        r = run_webproxy("purge", "-c", str(cproxy.config_path), url)
        assert r.returncode == 0, r.stderr
    assert proxy_get(cproxy, url)[1]["x-cache"].startswith("MISS")
    assert origin.full["purge-next"] == 6


# --- item 10: Expires that is not an HTTP-date, Content-Range ----------------------------------------


INVALID_EXPIRES = [
    "Thu, 18 Aug 50 02:01:18 GMT", "Thu 18 Aug 2050 02:01:18 GMT", "Thu, 18  Aug  2050 02:01:18 GMT",
    "Thu, 18-Aug-2050 02:01:18 GMT", "Thu, 18 Aug 2050 02.01.18 GMT", "Thu, 18 Aug 2050 2:01:18 GMT",
    "Thu, 18 Aug 2050 02:01:18 UTC",
]


def test_an_expires_that_is_not_an_http_date_makes_the_response_already_stale(cproxy, origin):
    good = origin.put("expires-good", b"e", Expires="Thu, 18 Aug 2050 02:01:18 GMT")
    proxy_get(cproxy, good)
    proxy_get(cproxy, good)
    assert origin.full["expires-good"] == 1
    for i, value in enumerate(INVALID_EXPIRES):
        url = origin.put(f"expires-bad-{i}", b"e", Expires=value)
        proxy_get(cproxy, url)
        _, fields, body = proxy_get(cproxy, url)
        assert body == b"e" and origin.full[f"expires-bad-{i}"] == 2, value
        assert fields["x-cache"].startswith("MISS"), value


def test_content_range_on_a_stored_response_is_stored_and_returned(cproxy, origin):
    url = origin.put("content-range", b"abc", Cache_Control="max-age=600", Content_Range="bytes 0-2/3")
    proxy_get(cproxy, url)
    _, fields, body = proxy_get(cproxy, url)
    assert body == b"abc" and origin.full["content-range"] == 1 and fields["x-cache"].startswith("HIT")
    assert fields["content-range"] == "bytes 0-2/3"


def test_an_interim_response_is_neither_stored_nor_merged_into_the_stored_final_one(cproxy):
    o = MethodEchoOrigin(reply=b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\nX-Interim: yes\r\n\r\n"
                        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 5\r\n\r\nfinal")
    url = o.url("/hinted")
    try:
        answers = []
        for _ in range(2):
            c = RawClient(cproxy.port)
            c.send(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answers.append(c.response())  # (any 1xx passed on is skipped by h11 here)
            c.close()
        for resp, body in answers:
            assert (resp.status_code, body) == (200, b"final")
            assert header(resp, "x-interim") is None and header(resp, "link") is None
        assert header(answers[1][0], "x-cache").startswith("HIT") and len(o.lines) == 1
    finally:
        o.stop()


# --- item 12: a Cache-Control that does not parse is not stored ---------------------------------------


@pytest.mark.parametrize("value", ['private="unterminated', "public; max-age=600"])
def test_a_cache_control_that_does_not_parse_is_not_shared_with_another_client(cproxy, origin, value):
    name = f"cc-malformed-{len(value)}"
    url = origin.put(name, b"for one client only", Cache_Control=value)
    proxy_get(cproxy, url, "Cookie: user=alice")
    _, fields, body = proxy_get(cproxy, url)
    assert origin.full[name] == 2 and fields["x-cache"].startswith("MISS")


@pytest.mark.parametrize("value", ['private="unterminated, max-age=600', "private, max-age=600"])
def test_a_304_that_makes_the_stored_response_private_or_malformed_is_not_stored(cproxy, origin, value):
    name = f"cc-304-{len(value)}"
    url = origin.put(name, b"v1 body", Cache_Control="max-age=1", ETag='"v1"')
    proxy_get(cproxy, url)
    time.sleep(1.5)
    origin.put(name, b"v1 body", Cache_Control=value, ETag='"v1"')
    assert proxy_get(cproxy, url)[2] == b"v1 body"  # revalidated: a 304 that says "private"
    assert proxy_get(cproxy, url, "Cookie: someone=else")[2] == b"v1 body"
    assert origin.conditional[name] == 2  # not answered from the store: validated again
    assert origin.full[name] == 1
