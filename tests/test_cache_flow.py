"""The cache library driven the way the front end drives it (cache/__init__.py), against real
aiohttp origins whose request counters prove hits and misses. The clock is the test's: the
origin dates its responses with it and the cache decides with it."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from cache import conditional, storable
from cache.conditional import revalidation_outcome, revalidation_request_headers
from cache.decision import Action, decide, head_for, respond
from cache.httpdate import format_http_date
from cache.invalidation import invalidated_keys
from cache.key import cache_key
from cache.model import Request, get_one
from cache.store import Store
from webproxy.logcodes import revalidation as revalidation_tag
from webproxy.logcodes import served as served_tag

T0 = 1_800_000_000.0


class Clock:
    t = T0

    def __call__(self) -> float:
        return self.t


class Origin:
    """A scripted origin: `routes[path] = handler(request) -> web.Response`; counts requests."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.hits: dict[str, int] = {}
        self.seen: list[dict[str, str]] = []
        self.routes = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        self.seen.append(dict(request.headers))
        resp = await self.routes[request.path](request)
        resp.headers["Date"] = format_http_date(self.clock.t)
        return resp


async def serve_from_cache(store, d, hit, rq, now, tag):
    status, _, headers = head_for(d, now)
    if status in (304, 416) or rq.method == "HEAD":
        body = b""
    else:
        if hit.body is not None:
            body = hit.body
        else:
            hit.file.seek(hit.offset)
            body = hit.file.read(hit.size)
        if d.byte_range is not None:
            body = body[d.byte_range.start : d.byte_range.end + 1]
    hit.close()
    store.count_hit(len(body), memory=hit.in_memory)
    return status, headers, body, tag


async def relay_and_maybe_store(store, rq, key, resp, t_req, t_resp):
    """Read an origin response, storing it while it streams when it is storable."""
    raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
    fill = None
    if storable.is_storable(rq, resp.status, raw):
        fill = store.begin_fill(key, storable.make_stored(rq, resp.status, resp.reason, raw, t_req, t_resp))
    body = b""
    async for chunk in resp.content.iter_any():
        body += chunk
        if fill is not None:
            fill.write(chunk)
    if fill is not None:
        fill.commit()
    else:
        store.flights.finish(key, False)
    store.invalidate(invalidated_keys(rq.method, rq.url, resp.status, raw))
    return resp.status, raw, body


async def fetch_and_maybe_store(store, session, rq, key, headers):
    t_req = store.clock()
    async with session.request(rq.method, rq.url, headers=headers) as resp:
        return await relay_and_maybe_store(store, rq, key, resp, t_req, store.clock())


async def proxy(store: Store, session, method: str, url: str, headers=()):
    """One request through the cache; returns (status, headers, body, log tag)."""
    now = store.clock()
    key = cache_key(url)
    rq = Request(method, url, list(headers))
    hit = store.lookup(key, rq.headers) if method in ("GET", "HEAD") else None
    d = decide(rq, hit.stored if hit else None, now, store.policy)
    if d.action in (Action.HIT, Action.STALE_WHILE_REVALIDATE):
        return await serve_from_cache(store, d, hit, rq, now, served_tag(d, hit.in_memory))
    if d.action is Action.ONLY_IF_CACHED_MISS:
        return 504, [], b"", "TCP_MISS"
    if d.action is Action.REVALIDATE:
        t_req = store.clock()
        try:
            async with session.request(method, url, headers=revalidation_request_headers(rq.headers, d.stored)) as resp:
                raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
                o = revalidation_outcome(rq, d.stored, resp.status, raw, t_req, store.clock(), store.policy)
                if o.action == conditional.REPLACE:  # a full new response: store it like a miss
                    hit.close()
                    status, raw, body = await relay_and_maybe_store(store, rq, key, resp, t_req, store.clock())
                    return status, raw, body, revalidation_tag(o.action)
                body = await resp.read()
        except aiohttp.ClientError:
            raw, body = None, b""
            o = revalidation_outcome(rq, d.stored, None, None, t_req, store.clock(), store.policy)
        tag = revalidation_tag(o.action)
        if o.action == conditional.UPDATE:
            store.update(hit, o.stored)
            return await serve_from_cache(store, respond(rq, o.stored), hit, rq, now, tag)
        if o.action == conditional.SERVE_STALE:
            return await serve_from_cache(store, respond(rq, d.stored), hit, rq, now, tag)
        hit.close()
        if o.action == conditional.FORWARD_ERROR:
            return (502 if raw is None else resp.status), raw or [], body, tag
        status, raw, body = await fetch_and_maybe_store(store, session, rq, key, rq.headers)  # REFETCH
        return status, raw, body, tag
    flight, leader = store.flights.join(key)
    if not leader and await flight.wait(5):
        return await proxy(store, session, method, url, headers)
    status, raw, body = await fetch_and_maybe_store(store, session, rq, key, rq.headers)
    store.count_miss()
    return status, raw, body, "TCP_MISS"


@pytest.fixture
async def env(aiohttp_server, tmp_path):
    clock = Clock()
    origin = Origin(clock)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", origin.handle)
    server = await aiohttp_server(app)
    store = Store(str(tmp_path / "cache"), clock=clock)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield store, session, origin, clock, lambda path: str(server.make_url(path))
    store.close()


def reply(body: bytes, **headers):
    async def handler(request):
        return web.Response(body=body, headers=headers)
    return handler


async def test_second_request_for_a_fresh_object_never_reaches_the_origin(env):
    store, session, origin, clock, url = env
    origin.routes["/logo.png"] = reply(b"PNG" * 1000, **{"Cache-Control": "max-age=60"})
    first = await proxy(store, session, "GET", url("/logo.png"))
    clock.t += 30
    second = await proxy(store, session, "GET", url("/logo.png"))
    assert first[3] == "TCP_MISS" and second[3] == "TCP_MEM_HIT"
    assert second[0] == 200 and second[2] == b"PNG" * 1000
    assert get_one(second[1], "age") == "30" and origin.hits["/logo.png"] == 1


async def test_stale_object_is_revalidated_with_its_etag_and_served_from_disk_on_304(env):
    store, session, origin, clock, url = env
    big = b"B" * 300_000

    async def handler(request):
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})
        return web.Response(body=big, headers={"ETag": '"v1"', "Cache-Control": "max-age=60"})

    origin.routes["/big"] = handler
    await proxy(store, session, "GET", url("/big"))
    clock.t += 120
    status, headers, body, tag = await proxy(store, session, "GET", url("/big"))
    assert (status, tag, body) == (200, "TCP_REFRESH_UNMODIFIED", big)
    assert origin.seen[-1]["If-None-Match"] == '"v1"' and origin.hits["/big"] == 2
    clock.t += 30  # freshness renewed by the 304
    assert (await proxy(store, session, "GET", url("/big")))[3] == "TCP_HIT"
    assert origin.hits["/big"] == 2


async def test_changed_object_replaces_the_stored_one(env):
    store, session, origin, clock, url = env
    versions = iter([b"old", b"new"])

    async def handler(request):
        return web.Response(body=next(versions), headers={"ETag": f'"{origin.hits["/v"]}"', "Cache-Control": "max-age=10"})

    origin.routes["/v"] = handler
    await proxy(store, session, "GET", url("/v"))
    clock.t += 20
    assert (await proxy(store, session, "GET", url("/v")))[2] == b"new"
    assert (await proxy(store, session, "GET", url("/v")))[2:] == (b"new", "TCP_MEM_HIT")


async def test_origin_down_serves_stale_within_stale_if_error(env, unused_tcp_port):
    store, session, origin, clock, url = env
    origin.routes["/s"] = reply(b"stale ok", **{"Cache-Control": "max-age=10, stale-if-error=600"})
    await proxy(store, session, "GET", url("/s"))
    clock.t += 60
    dead = f"http://127.0.0.1:{unused_tcp_port}/s"
    # Same object as seen through a dead origin: store it under the dead URL's key first.
    hit = store.lookup(cache_key(url("/s")), [])
    f = store.begin_fill(cache_key(dead), hit.stored)
    f.write(hit.body)
    assert f.commit()
    status, _, body, tag = await proxy(store, session, "GET", dead)
    assert (status, body, tag) == (200, b"stale ok", "TCP_REFRESH_FAIL_OLD")


async def test_post_invalidates_the_cached_object(env):
    store, session, origin, clock, url = env

    async def handler(request):
        if request.method == "POST":
            return web.Response(status=201, headers={"Location": "/other"})
        return web.Response(body=b"x", headers={"Cache-Control": "max-age=600"})

    origin.routes["/item"] = handler
    origin.routes["/other"] = handler
    await proxy(store, session, "GET", url("/item"))
    await proxy(store, session, "GET", url("/other"))
    await proxy(store, session, "POST", url("/item"))
    assert store.lookup(cache_key(url("/item")), []) is None
    assert store.lookup(cache_key(url("/other")), []) is None


async def test_vary_keeps_one_variant_per_accept_encoding(env):
    store, session, origin, clock, url = env

    async def handler(request):
        enc = request.headers.get("Accept-Encoding", "identity")
        return web.Response(body=enc.encode(), headers={"Vary": "Accept-Encoding", "Cache-Control": "max-age=60"})

    origin.routes["/v"] = handler
    for enc in ("gzip", "br", "gzip", "br"):
        assert (await proxy(store, session, "GET", url("/v"), [("Accept-Encoding", enc)]))[2] == enc.encode()
    assert origin.hits["/v"] == 2


async def test_range_and_head_are_answered_from_the_cache(env):
    store, session, origin, clock, url = env
    origin.routes["/r"] = reply(bytes(range(256)) * 400, **{"Cache-Control": "max-age=60"})
    await proxy(store, session, "GET", url("/r"))
    status, headers, body, _ = await proxy(store, session, "GET", url("/r"), [("Range", "bytes=256-511")])
    assert status == 206 and body == bytes(range(256)) and get_one(headers, "content-range") == "bytes 256-511/102400"
    status, headers, body, _ = await proxy(store, session, "HEAD", url("/r"))
    assert status == 200 and body == b"" and get_one(headers, "content-length") == "102400"
    assert origin.hits["/r"] == 1


async def test_concurrent_misses_are_collapsed_into_one_origin_fetch(env):
    store, session, origin, clock, url = env
    release = asyncio.Event()

    async def slow(request):
        await release.wait()
        return web.Response(body=b"once", headers={"Cache-Control": "max-age=60"})

    origin.routes["/c"] = slow
    tasks = [asyncio.ensure_future(proxy(store, session, "GET", url("/c"))) for _ in range(5)]
    while origin.hits.get("/c") != 1:
        await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*tasks)
    assert [r[2] for r in results] == [b"once"] * 5 and origin.hits["/c"] == 1
