"""The disk cache in the request path: the RFC 9111 decisions live in `cache/` (pure functions);
this module only carries them out with sockets and files, for http:// and ftp:// alike.

One request: look up -> decide -> serve a hit / revalidate / fetch and fill while serving.
Unsafe methods invalidate what they may have changed; PURGE removes a URL for admin clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cache import conditional, invalidation, logtags
from cache.decision import Action, Decision, decide, head_for, respond
from cache.freshness import age_header_value
from cache.key import BadURL, cache_key
from cache.model import Request as CacheRequest
from cache.storable import is_storable, make_stored
from cache.store import Hit, open_store
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.httpmsg import Headers, Target, serialize_head
from webproxy.origin import OriginResponse
from webproxy.proxy import Exchange
from webproxy.upstream import UpstreamError

if TYPE_CHECKING:
    from webproxy.server import ProxyServer

Opener = Callable[[str, Headers], Awaitable[OriginResponse]]

SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
READ_CHUNK = 256 * 1024
MAINTAIN_EVERY = 5.0


def origin_headers(resp: OriginResponse) -> Headers:
    """The origin's fields as the store wants them: with the declared length, which is how a
    short body is told from a complete one."""
    if resp.length is None:
        return resp.headers
    return [*resp.headers, ("Content-Length", str(resp.length))]


class CacheLayer:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.store = open_store(server.cfg.cache)
        self.name = server.cfg.server["name"]
        self.background: set[asyncio.Task[Any]] = set()
        self._maintainer = asyncio.get_running_loop().create_task(self._maintain_loop())

    # ---- entry point --------------------------------------------------------------------------
    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange,
                     target: Target, lazy_headers: Headers | Callable[[], Headers], opener: Opener) -> bool | None:
        """Answer `req` through the cache; None means: not a cache matter, forward it plainly.
        `lazy_headers`: the headers to send upstream, or a function that builds them."""
        method = req.method
        try:
            key = cache_key(target.origin_url)
        except BadURL:
            return None
        if method == "PURGE":
            return self.purge(conn, rw, ex, key)
        if method not in ("GET", "HEAD"):
            if method in SAFE:
                return None
            headers = lazy_headers() if callable(lazy_headers) else lazy_headers
            return await self.unsafe(req, rw, ex, target, headers, opener)
        now = time.time()
        rq = CacheRequest(method, target.origin_url, req.headers)
        hit = self.store.lookup(key, req.headers)
        d = decide(rq, hit.stored if hit else None, now, self.store.policy)
        action = d.action
        if action is Action.HIT and hit is not None and hit.body is not None and d.status == 200:
            return self.serve_fast(rw, ex, hit, now)
        headers = lazy_headers() if callable(lazy_headers) else lazy_headers
        if action is Action.HIT or action is Action.STALE_WHILE_REVALIDATE:
            assert hit is not None
            if action is Action.STALE_WHILE_REVALIDATE:
                self.spawn(self.revalidate_in_background(key, rq, d, headers, opener))
            result = self.serve_any(req, rw, ex, hit, d, now, logtags.served_tag(d, hit.in_memory))
            return await result if not isinstance(result, bool) else result
        if hit is not None and action is not Action.REVALIDATE:
            hit.close()
        if action is Action.ONLY_IF_CACHED_MISS:
            ex.code = "TCP_MISS"
            return self.server.proxy._error(rw, ex, 504, f"{target.origin_url[:200]} is not in the cache "
                                            "(the request said only-if-cached)")
        if action is Action.PASS:
            return None
        if action is Action.REVALIDATE:
            assert hit is not None
            if method == "HEAD":
                hit.close()
                return None  # a HEAD does not refresh the stored GET; just ask the origin
            return await self.revalidate(req, rw, ex, key, rq, hit, d, headers, opener)
        return await self.miss(req, rw, ex, key, rq, headers, opener)

    # ---- hits ---------------------------------------------------------------------------------
    def _head(self, rw: ResponseWriter, ex: Exchange, d: Decision, now: float, tag: str) -> int | None:
        status, reason, fields = head_for(d, now)
        length = None
        out = []
        for k, v in fields:
            if k.lower() == "content-length":
                length = int(v)
            else:
                out.append((k, v))
        out.append(self.server.proxy.via("1.1"))
        out.append(("X-Cache", f"HIT from {self.name}"))
        ex.status = status
        ex.code = tag
        if "REFRESH" not in tag:  # a refresh did go to the origin: keep its HIER_DIRECT
            ex.hierarchy = "HIER_NONE/-"
        ex.ctype = next((v for k, v in out if k.lower() == "content-type"), None)
        rw.start(status, reason, out, length, has_body=status not in (304, 416))
        return length

    def serve_fast(self, rw: ResponseWriter, ex: Exchange, hit: Hit, now: float) -> bool:
        """The hot path: a plain 200 hit from memory. Its head is serialized once per stored
        response; each hit only adds Age (and Connection when needed)."""
        stored = hit.stored
        head = stored.memo.get("wire_head")
        if head is None:
            status, reason, fields = head_for(Decision(Action.HIT, stored, 200), now)
            fields = [(k, v) for k, v in fields if k.lower() != "age"]
            fields.append(self.server.proxy.via("1.1"))
            fields.append(("X-Cache", f"HIT from {self.name}"))
            head = stored.memo["wire_head"] = serialize_head(status, reason, fields)[:-2]
            stored.memo["ctype"] = next((v for k, v in fields if k.lower() == "content-type"), None)
        ex.status = 200
        ex.code = "TCP_MEM_HIT" if hit.in_memory else "TCP_HIT"
        ex.ctype = stored.memo["ctype"]
        body = hit.body or b""
        rw.start_raw(head + b"Age: %d\r\n" % int(float(age_header_value(stored, now))), len(body))
        rw.write(body)
        self.store.count_hit(0 if rw.no_body else len(body), memory=hit.in_memory)
        return rw.end()

    def serve(self, req: Request, rw: ResponseWriter, ex: Exchange, hit: Hit, d: Decision, now: float,
              tag: str | None = None) -> bool:
        """A hit whose body is in memory (or that has no body to send)."""
        try:
            self._head(rw, ex, d, now, tag or logtags.served_tag(d, hit.in_memory))
            body = hit.body or b""
            if d.status == 206 and d.byte_range is not None:
                body = body[d.byte_range.start : d.byte_range.start + d.byte_range.length]
            if not rw.no_body:
                rw.write(body)
            self.store.count_hit(len(body) if not rw.no_body else 0, memory=hit.in_memory)
            return rw.end()
        finally:
            hit.close()

    async def serve_file(self, req: Request, rw: ResponseWriter, ex: Exchange, hit: Hit, d: Decision, now: float,
                         tag: str | None = None) -> bool:
        """A hit whose body is a file: read it in bounded chunks, with backpressure."""
        try:
            self._head(rw, ex, d, now, tag or logtags.served_tag(d, hit.in_memory))
            start, count = hit.offset, hit.size
            if d.status == 206 and d.byte_range is not None:
                start, count = hit.offset + d.byte_range.start, d.byte_range.length
            sent = 0
            if hit.file is None:
                raise OSError("stored body file is missing")
            fd = hit.file.fileno()
            while sent < count:
                chunk = os.pread(fd, min(READ_CHUNK, count - sent), start + sent)
                if not chunk:
                    raise OSError("stored body file is shorter than its entry says")
                await rw.send(chunk)
                sent += len(chunk)
            self.store.count_hit(sent, memory=False)
            return rw.end()
        except OSError as e:
            self.server.log_error(f"cache: cannot read the stored body for {req.target[:200]}: {e}")
            if rw.conn.response_started:
                rw.conn.abort()
                return False
            return self.server.proxy._error(rw, ex, 500, "the cached copy could not be read")
        finally:
            hit.close()

    def serve_any(self, req: Request, rw: ResponseWriter, ex: Exchange, hit: Hit, d: Decision, now: float,
                  tag: str) -> Awaitable[bool] | bool:
        if hit.body is not None or d.status in (304, 416) or req.method == "HEAD":
            return self.serve(req, rw, ex, hit, d, now, tag)
        return self.serve_file(req, rw, ex, hit, d, now, tag)

    # ---- misses -------------------------------------------------------------------------------
    async def miss(self, req: Request, rw: ResponseWriter, ex: Exchange, key: str, rq: CacheRequest,
                   headers: Headers, opener: Opener) -> bool:
        flight, leader = self.store.flights.join(key)
        if not leader:
            # Someone is already fetching this URL: wait for their copy instead of asking again.
            if await flight.wait(self.server.cfg.cache["collapse_wait"]):
                hit = self.store.lookup(key, req.headers)
                if hit is not None:
                    d = decide(rq, hit.stored, time.time(), self.store.policy)
                    if d.action is Action.HIT:
                        result = self.serve_any(req, rw, ex, hit, d, time.time(), "TCP_HIT")
                        return await result if not isinstance(result, bool) else result
                    hit.close()
            return await self.fetch_and_fill(req, rw, ex, None, rq, headers, opener)
        return await self.fetch_and_fill(req, rw, ex, key, rq, headers, opener)

    async def fetch_and_fill(self, req: Request, rw: ResponseWriter, ex: Exchange, key: str | None,
                             rq: CacheRequest, headers: Headers, opener: Opener, tag: str = "TCP_MISS") -> bool:
        """Fetch; stream to the client and, when storable and `key` is ours to fill, to the store."""
        ex.code = tag
        t_req = time.time()
        try:
            resp = await opener(req.method, headers)
        except UpstreamError as e:
            if key is not None:
                self.store.flights.finish(key, False)
            return self.server.proxy._upstream_error(req, rw, ex, e)
        except BaseException:
            if key is not None:
                self.store.flights.finish(key, False)
            raise
        t_resp = time.time()
        self.store.count_miss()
        fill = None
        if key is not None:
            fields = origin_headers(resp)
            if req.method == "GET" and is_storable(rq, resp.status, fields):
                fill = self.store.begin_fill(key, make_stored(rq, resp.status, resp.reason, fields, t_req, t_resp))
            else:
                self.store.flights.finish(key, False)
        return await self.server.proxy.relay_response(req, rw, ex, resp, sink=fill,
                                                      extra=[("X-Cache", f"MISS from {self.name}")])

    # ---- validation ---------------------------------------------------------------------------
    async def revalidate(self, req: Request, rw: ResponseWriter, ex: Exchange, key: str, rq: CacheRequest,
                         hit: Hit, d: Decision, headers: Headers, opener: Opener) -> bool:
        stored = d.stored
        assert stored is not None
        t_req = time.time()
        resp: OriginResponse | None = None
        error: UpstreamError | None = None
        try:
            resp = await opener("GET", conditional.revalidation_request_headers(headers, stored))
        except UpstreamError as e:
            error = e
        except BaseException:
            hit.close()
            raise
        t_resp = time.time()
        o = conditional.revalidation_outcome(rq, stored, resp.status if resp else None,
                                             origin_headers(resp) if resp else None, t_req, t_resp,
                                             self.store.policy)
        tag = logtags.revalidation_tag(o.action)
        if o.action == conditional.UPDATE:
            assert resp is not None and o.stored is not None
            await resp.close(True)
            self.store.update(hit, o.stored)
            hit.stored = o.stored
            result = self.serve_any(req, rw, ex, hit, respond(rq, o.stored), time.time(), tag)
            return await result if not isinstance(result, bool) else result
        if o.action == conditional.SERVE_STALE:
            if resp is not None:
                await resp.close(False)
            result = self.serve_any(req, rw, ex, hit, respond(rq, stored), time.time(), tag)
            return await result if not isinstance(result, bool) else result
        hit.close()
        if o.action == conditional.FORWARD_ERROR:
            ex.code = tag
            if resp is None:
                assert error is not None
                return self.server.proxy._upstream_error(req, rw, ex, error)
            return await self.server.proxy.relay_response(req, rw, ex, resp)
        if o.action == conditional.REPLACE and resp is not None:
            ex.code = tag
            self.store.count_miss()
            fill = None
            fields = origin_headers(resp)
            if is_storable(rq, resp.status, fields):
                flight, leader = self.store.flights.join(key)
                if leader:
                    fill = self.store.begin_fill(key, make_stored(rq, resp.status, resp.reason, fields, t_req, t_resp))
            return await self.server.proxy.relay_response(req, rw, ex, resp, sink=fill,
                                                          extra=[("X-Cache", f"MISS from {self.name}")])
        # REFETCH: the 304 did not match what we hold; fetch it whole.
        if resp is not None:
            await resp.close(True)
        flight, leader = self.store.flights.join(key)
        return await self.fetch_and_fill(req, rw, ex, key if leader else None, rq, headers, opener, tag)

    async def refresh(self, key: str, rq: CacheRequest, stored: Any, headers: Headers, opener: Opener) -> str:
        """Revalidate (or refetch) a stored entry with no client waiting: the background path of
        stale-while-revalidate and of active refresh. Returns the outcome (conditional.UPDATE,
        REPLACE, ...); a failure leaves the entry as it is."""
        t_req = time.time()
        try:
            resp = await opener("GET", conditional.revalidation_request_headers(headers, stored))
        except UpstreamError:
            return conditional.FORWARD_ERROR
        t_resp = time.time()
        o = conditional.revalidation_outcome(rq, stored, resp.status, origin_headers(resp), t_req, t_resp,
                                             self.store.policy)
        if o.action == conditional.UPDATE:
            await resp.close(True)
            hit = self.store.lookup(key, rq.headers)
            if hit is not None:
                with hit:
                    self.store.update(hit, o.stored)
            return o.action
        if o.action == conditional.REPLACE and is_storable(rq, resp.status, origin_headers(resp)):
            flight, leader = self.store.flights.join(key)
            if not leader:
                await resp.close(False)
                return conditional.FORWARD_ERROR
            fill = self.store.begin_fill(key, make_stored(rq, resp.status, resp.reason, origin_headers(resp),
                                                          t_req, t_resp))
            clean = False
            try:
                async for chunk in resp.chunks():
                    fill.write(chunk)
                clean = True
                fill.commit()
            except Exception:
                fill.abort()
                return conditional.FORWARD_ERROR
            finally:
                if fill.active:
                    fill.abort()
                await resp.close(clean)
            return o.action
        await resp.close(False)
        return o.action if o.action != conditional.REPLACE else conditional.FORWARD_ERROR

    async def revalidate_in_background(self, key: str, rq: CacheRequest, d: Decision, headers: Headers,
                                       opener: Opener) -> None:
        if self.store.flights.get(key) is not None:
            return
        assert d.stored is not None
        await self.refresh(key, rq, d.stored, headers, opener)

    # ---- unsafe methods, PURGE ----------------------------------------------------------------
    async def unsafe(self, req: Request, rw: ResponseWriter, ex: Exchange, target: Target, headers: Headers,
                     opener: Opener) -> bool:
        """Forward, then drop what the response says may have changed (RFC 9111 4.4)."""
        ex.code = "TCP_MISS"
        try:
            resp = await opener(req.method, headers)
        except UpstreamError as e:
            return self.server.proxy._upstream_error(req, rw, ex, e)
        keys = invalidation.invalidated_keys(req.method, target.origin_url, resp.status, resp.headers)
        if keys:
            self.store.invalidate(keys)
        return await self.server.proxy.relay_response(req, rw, ex, resp)

    def purge(self, conn: ClientConnection, rw: ResponseWriter, ex: Exchange, key: str) -> bool:
        proxy = self.server.proxy
        if not self.server.is_admin(conn):
            ex.code = "TCP_DENIED"
            return proxy._error(rw, ex, 403, f"access denied: PURGE is for admin clients (access.admin_clients); "
                                f"{conn.client_ip} is not one")
        removed = self.store.purge(key)
        ex.code = "TCP_MISS"
        if not removed:
            return proxy._error(rw, ex, 404, f"{key} was not in the cache")
        ex.status = 200
        body = f"purged {key}\n".encode()
        ex.ctype = "text/plain"
        rw.start(200, "OK", [("Content-Type", "text/plain; charset=utf-8")], len(body))
        rw.write(body)
        return rw.end()

    # ---- housekeeping -------------------------------------------------------------------------
    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _maintain_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(MAINTAIN_EVERY)
            try:
                await loop.run_in_executor(None, self.store.maintain)
            except Exception as e:
                self.server.log_error(f"cache maintenance failed: {e!r}")

    async def close(self) -> None:
        self._maintainer.cancel()
        for task in list(self.background):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(self._maintainer, *self.background, return_exceptions=True)
        self.store.close()
