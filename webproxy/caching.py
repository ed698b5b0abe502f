"""The disk cache in the request path. What to do is decided by `cache.transaction` (pure steps
over the RFC 9111 rules); this module is the one driver that carries the steps out with sockets
and files, for client requests (http:// and ftp:// alike) and for background refreshes.

    begin -> Serve | Fetch | Answer | Pass;  Fetch -> after_fetch -> Serve | Store | Relay | Fetch

Fresh hits from memory are answered in the parser callback (`answer_now`); everything else in the
connection's serve task (`handle`). Unsafe methods invalidate what they may have changed; PURGE
removes a URL for admin clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cache import conditional, invalidation, transaction
from cache.decision import Action, Decision, decide, head_for, is_plain, plain_hit_until
from cache.fill import Fill
from cache.freshness import age_header_value
from cache.key import BadURL, cache_key
from cache.model import SAFE_METHODS, StoredResponse
from cache.model import Request as CacheRequest
from cache.store import Hit, Store, StoreWriteError
from cache.transaction import Answer, Fetch, Pass, Relay, Serve, Step
from cache.transaction import Store as StoreStep
from webproxy import logcodes
from webproxy.context import Env
from webproxy.errors import ClientGone, UpstreamError
from webproxy.exchange import Answers, Exchange
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.httpmsg import Headers, Target, serialize_head
from webproxy.origin import Opener, OriginResponse

READ_CHUNK = 256 * 1024
SENDFILE_MIN = 64 * 1024  # below this a read and one write cost less than a sendfile call (measured)
MAINTAIN_EVERY = 5.0
# A leader whose client took no byte for this long releases the requests waiting for its fill: they
# fetch for themselves rather than at the pace of a client that may never read again.
LEADER_STALL = 1.0


def origin_headers(resp: OriginResponse) -> Headers:
    """The origin's fields as the store wants them: with the declared length, which is how a
    short body is told from a complete one."""
    if resp.length is None:
        return resp.headers
    return [*resp.headers, ("Content-Length", str(resp.length))]


@dataclass(slots=True)
class Client:
    """The client side of a transaction; a background refresh has none."""

    req: Request
    rw: ResponseWriter
    ex: Exchange


class CacheLayer:
    def __init__(self, env: Env, answers: Answers, store: Store) -> None:
        self.env = env
        self.answers = answers
        self.store = store
        self.background: set[asyncio.Task[Any]] = set()
        self._keys: dict[str, str | None] = {}  # origin URL -> cache key (None: not cacheable)
        self._maintainer = asyncio.get_running_loop().create_task(self._maintain_loop())

    @property
    def name(self) -> str:
        return self.env.cfg.server["name"]

    def key_for(self, url: str) -> str | None:
        """cache_key(url), remembered for recent URLs (the hit path asks for every request)."""
        keys = self._keys
        if url in keys:
            return keys[url]
        try:
            key: str | None = cache_key(url)
        except BadURL:
            key = None
        if len(keys) >= 4096:
            keys.clear()
        keys[url] = key
        return key

    # ---- entry points ---------------------------------------------------------------------------
    def answer_now(self, req: Request, rw: ResponseWriter, ex: Exchange, target: Target) -> bool | None:
        """A fresh 200 from the memory tier, answered synchronously (one dict lookup, one write);
        None when this request needs more than that."""
        key = self.key_for(target.origin_url)
        if key is None:
            return None
        hit = self.store.lookup(key, req.headers, count_use=False, memory_only=True)
        if hit is None:
            return None
        if hit.body is None:
            hit.close()
            return None
        now = time.time()
        rq = CacheRequest(req.method, target.origin_url, req.headers)
        if is_plain(rq):
            if now >= plain_hit_until(hit.stored, self.store.policy):
                return None  # stale: revalidated in the serve task
        else:
            d = decide(rq, hit.stored, now, self.store.policy)
            if d.action is not Action.HIT or d.status != 200:
                return None
        self.store.count_use(hit.key, hit.size)
        return self.serve_fast(rw, ex, hit, now)

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange,
                     target: Target, lazy_headers: Headers | Callable[[], Headers], opener: Opener) -> bool | None:
        """Answer `req` through the cache; None means: not a cache matter, forward it plainly.
        `lazy_headers`: the fields to send upstream, or a function that builds them."""
        method = req.method
        key = self.key_for(target.origin_url)
        if key is None:
            return None
        if method == "PURGE":
            return self.purge(conn, rw, ex, key)
        if method not in ("GET", "HEAD"):
            if method in SAFE_METHODS:
                return None
            return await self.unsafe(req, rw, ex, target, self._headers(lazy_headers), opener)
        rq = CacheRequest(method, target.origin_url, req.headers)
        hit = self.store.lookup(key, req.headers)
        step = transaction.begin(rq, hit.stored if hit else None, time.time(), self.store.policy)
        if isinstance(step, Serve) and not step.background and hit is not None and hit.body is not None \
                and step.decision.status == 200:
            return self.serve_fast(rw, ex, hit, time.time())
        if not isinstance(step, Serve) and not (isinstance(step, Fetch) and step.conditional) and hit is not None:
            hit.close()
            hit = None
        result = await self.drive(key, rq, step, hit, lazy_headers, opener, Client(req, rw, ex))
        return result if isinstance(result, bool) or result is None else None

    async def refresh(self, url: str, rq: CacheRequest, stored: StoredResponse, headers: Headers,
                      opener: Opener) -> str:
        """Revalidate (or refetch) a stored entry with no client waiting: the background path of
        stale-while-revalidate and of active refresh. Returns the outcome (conditional.UPDATE,
        REPLACE, ...); a failure leaves the entry as it is."""
        result = await self.drive(url, rq, transaction.refresh(stored), None, headers, opener, None)
        assert isinstance(result, str)
        return result

    # ---- the driver -----------------------------------------------------------------------------
    async def drive(self, key: str, rq: CacheRequest, step: Step, hit: Hit | None,
                    lazy_headers: Headers | Callable[[], Headers], opener: Opener,
                    client: Client | None) -> bool | str | None:
        """Carry out `step` and the steps that follow. With a client: returns whether its
        connection may serve another request (None: forward plainly). Without: the outcome."""
        store = self.store
        resp: OriginResponse | None = None
        error: UpstreamError | None = None
        leader = False  # we own the collapsed-forwarding flight of `key` (and must end it)
        follower = False  # we waited for another request's fetch, in vain: we fetch, they store
        tag_override: str | None = None
        try:
            while True:
                if isinstance(step, Serve):
                    if resp is not None:
                        await resp.close(step.update is not None)
                        resp = None
                    if step.update is not None:
                        if hit is None:
                            hit = store.lookup(key, rq.headers, count_use=False)
                        if hit is not None:
                            store.update(hit, step.update)
                            hit.stored = step.update
                    if client is None:
                        if step.outcome == conditional.UPDATE and step.update is None:
                            return conditional.FORWARD_ERROR  # nothing stored: the entry is as it was
                        return step.outcome
                    assert hit is not None
                    if step.background and store.flights.get(key) is None and step.decision.stored is not None:
                        self.spawn(self.refresh(key, rq, step.decision.stored, self._headers(lazy_headers), opener))
                    tag = tag_override or (logcodes.served(step.decision, hit.in_memory) if step.outcome == transaction.HIT
                                           else logcodes.revalidation(step.outcome))
                    served, hit = hit, None
                    return await self.serve(client, served, step.decision, tag)
                if isinstance(step, Answer):
                    assert client is not None
                    client.ex.code = logcodes.MISS
                    return self.answers.error(client.rw, client.ex, step.status, step.message)
                if isinstance(step, Pass):
                    return None if client is not None else transaction.MISS
                if isinstance(step, Fetch):
                    if not step.conditional and not leader:
                        # Only a request whose answer can be shared leads; any miss waits for a
                        # flight already in the air.
                        flight, leader = store.flights.join(key) if step.lead else (store.flights.get(key), False)
                        if flight is not None and not leader and client is not None \
                                and step.outcome == transaction.MISS:
                            # Someone is already fetching this URL: wait for their copy.
                            follower = True
                            if await flight.wait(self.env.cfg.cache["collapse_wait"]):
                                hit = store.lookup(key, rq.headers)
                                if hit is not None:
                                    d = decide(rq, hit.stored, time.time(), store.policy)
                                    if d.action is Action.HIT:
                                        step, tag_override = Serve(d), logcodes.HIT
                                        continue
                                    hit.close()
                                    hit = None
                    if client is not None and step.outcome in (transaction.MISS, conditional.REFETCH):
                        client.ex.code = logcodes.MISS if step.outcome == transaction.MISS \
                            else logcodes.revalidation(step.outcome)
                    method = rq.method if not step.conditional else "GET"
                    t_req = time.time()
                    try:
                        resp = await opener(method, step.request_headers(self._headers(lazy_headers)))
                    except UpstreamError as e:
                        error, resp = e, None
                    t_resp = time.time()
                    if resp is None and not step.conditional:
                        step = Relay(step.outcome)
                        continue
                    step = transaction.after_fetch(rq, step, resp.status if resp else None,
                                                   origin_headers(resp) if resp else None,
                                                   resp.reason if resp else "", t_req, t_resp, store.policy)
                    if not isinstance(step, Serve) and hit is not None:
                        hit.close()
                        hit = None
                    continue
                if isinstance(step, StoreStep):
                    assert resp is not None
                    if not leader:
                        _, leader = store.flights.join(key)
                    if not leader or follower:
                        if client is None:
                            return conditional.FORWARD_ERROR
                        step = Relay(step.outcome)
                        continue
                    fill = store.begin_fill(key, step.stored)
                    leader = False  # the fill's commit or abort ends the flight
                    if client is None:
                        return await self._fill_quietly(resp, fill, step.outcome)
                    r, resp = resp, None
                    return await self._relay(client, r, step.outcome, fill)
                assert isinstance(step, Relay)
                if leader:
                    # Nothing will be stored: release the waiters now, not after the relay.
                    store.flights.finish(key, False)
                    leader = False
                if client is None:
                    return self._not_refreshed(step.outcome)
                if resp is None:
                    assert error is not None
                    client.ex.code = self._relay_tag(step.outcome)
                    return self.answers.upstream_error(client.req, client.rw, client.ex, error)
                r, resp = resp, None
                return await self._relay(client, r, step.outcome, None)
        finally:
            if leader:
                store.flights.finish(key, False)
            if hit is not None:
                hit.close()
            if resp is not None:
                await resp.close(False)

    def _headers(self, lazy: Headers | Callable[[], Headers]) -> Headers:
        return lazy() if callable(lazy) else lazy

    @staticmethod
    def _not_refreshed(outcome: str) -> str:
        """A background refresh that stored nothing: why, for the refresher's counters."""
        return conditional.FORWARD_ERROR if outcome in (transaction.MISS, conditional.REPLACE) else outcome

    @staticmethod
    def _relay_tag(outcome: str) -> str:
        return logcodes.MISS if outcome == transaction.MISS else logcodes.revalidation(outcome)

    async def _relay(self, client: Client, resp: OriginResponse, outcome: str, fill: Fill | None) -> bool:
        client.ex.code = self._relay_tag(outcome)
        if outcome == conditional.FORWARD_ERROR:
            extra = None
        else:
            self.store.count_miss()
            extra = [("X-Cache", f"MISS from {self.name}")]
        watch = StallWatch(client.rw, fill) if fill is not None else None
        try:
            return await self.answers.relay(client.req, client.rw, client.ex, resp, sink=fill, extra=extra)
        finally:
            if watch is not None:
                watch.cancel()
                self.report_write_failures()

    async def _fill_quietly(self, resp: OriginResponse, fill: Any, outcome: str) -> str:
        """A background refresh's new body: into the store, nobody to relay it to."""
        clean = False
        try:
            async for chunk in resp.chunks():
                fill.write(chunk)
            clean = True
            return conditional.REPLACE if fill.commit() else conditional.FORWARD_ERROR
        except Exception:
            return conditional.FORWARD_ERROR
        finally:
            if fill.active:
                fill.abort()
            await resp.close(clean)
            self.report_write_failures()

    # ---- serving from the store -------------------------------------------------------------------
    def _head(self, rw: ResponseWriter, ex: Exchange, d: Decision, now: float, tag: str) -> int | None:
        status, reason, fields = head_for(d, now)
        length = None
        out = []
        for k, v in fields:
            if k.lower() == "content-length":
                length = int(v)
            else:
                out.append((k, v))
        out.append(self.answers.via("1.1"))
        out.append(("X-Cache", f"HIT from {self.name}"))
        ex.status = status
        ex.code = tag
        if "REFRESH" not in tag:  # a refresh did go to the origin: keep its HIER_DIRECT
            ex.hierarchy = logcodes.HIER_NONE
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
            fields.append(self.answers.via("1.1"))
            fields.append(("X-Cache", f"HIT from {self.name}"))
            head = stored.memo["wire_head"] = serialize_head(status, reason, fields)[:-2]
            stored.memo["ctype"] = next((v for k, v in fields if k.lower() == "content-type"), None)
        ex.status = 200
        ex.code = logcodes.MEM_HIT if hit.in_memory else logcodes.HIT
        ex.ctype = stored.memo["ctype"]
        body = hit.body or b""
        rw.start_raw(head + b"Age: %d\r\n" % int(float(age_header_value(stored, now))), len(body))
        rw.write(body)
        self.store.count_hit(0 if rw.no_body else len(body), memory=hit.in_memory)
        return rw.end()

    async def serve(self, client: Client, hit: Hit, d: Decision, tag: str) -> bool:
        """A hit: its body from memory, or from its file (sendfile while the client keeps up)."""
        rw, ex = client.rw, client.ex
        try:
            self._head(rw, ex, d, time.time(), tag)
            if hit.body is not None or rw.no_body:
                body = hit.body or b""
                if d.status == 206 and d.byte_range is not None:
                    body = body[d.byte_range.start : d.byte_range.start + d.byte_range.length]
                rw.write(body)
                self.store.count_hit(0 if rw.no_body else len(body), memory=hit.in_memory)
                return rw.end()
            start, count = hit.offset, hit.size
            if d.status == 206 and d.byte_range is not None:
                start, count = hit.offset + d.byte_range.start, d.byte_range.length
            if hit.file is None:
                raise OSError("stored body file is missing")
            await send_file(rw, hit.file.fileno(), start, count)
            self.store.count_hit(count, memory=False)
            return rw.end()
        except OSError as e:
            self.env.log_error(f"cache: cannot read the stored body for {client.req.target[:200]}: {e}")
            if rw.conn.response_started:
                rw.conn.abort()
                return False
            return self.answers.error(rw, ex, 500, "the cached copy could not be read")
        finally:
            hit.close()

    # ---- unsafe methods, PURGE ----------------------------------------------------------------
    async def unsafe(self, req: Request, rw: ResponseWriter, ex: Exchange, target: Target, headers: Headers,
                     opener: Opener) -> bool:
        """Forward, then drop what the response says may have changed (RFC 9111 4.4)."""
        ex.code = logcodes.MISS
        try:
            resp = await opener(req.method, headers)
        except UpstreamError as e:
            return self.answers.upstream_error(req, rw, ex, e)
        keys = invalidation.invalidated_keys(req.method, target.origin_url, resp.status, resp.headers)
        if keys:
            self.store.invalidate(keys)
        return await self.answers.relay(req, rw, ex, resp)

    def purge(self, conn: ClientConnection, rw: ResponseWriter, ex: Exchange, key: str) -> bool:
        if not self.env.is_admin(conn.client_ip):
            return self.answers.deny(rw, ex, 403, f"access denied: PURGE is for admin clients "
                                     f"(access.admin_clients); {conn.client_ip} is not one")
        ex.code = logcodes.MISS
        try:
            removed = self.store.purge(key)
        except StoreWriteError as e:
            return self.answers.error(rw, ex, 503, f"{key} could not be purged: {e}")
        if not removed:
            return self.answers.error(rw, ex, 404, f"{key} was not in the cache")
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

    def report_write_failures(self) -> None:
        """The store's line about failed writes (a full disk), when one is due: at most one a
        minute however many fills fail (cache.writefailures)."""
        line = self.store.write_failures.report(time.monotonic())
        if line is not None:
            self.env.log_error(line)

    async def _maintain_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(MAINTAIN_EVERY)
            try:
                await loop.run_in_executor(None, self.store.maintain)
            except Exception as e:
                self.env.log_error(f"cache maintenance failed: {e!r}")
            self.report_write_failures()

    async def close(self) -> None:
        self._maintainer.cancel()
        for task in list(self.background):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(self._maintainer, *self.background, return_exceptions=True)
        self.store.close()


class StallWatch:
    """Releases a fill's waiters when its client takes no byte for LEADER_STALL seconds (checked
    twice per period: one timer per relaying leader, nothing per chunk)."""

    def __init__(self, rw: ResponseWriter, fill: Fill) -> None:
        self.rw = rw
        self.fill = fill
        self.seen = -1
        self.idle = 0.0
        self.loop = asyncio.get_running_loop()
        self.handle = self.loop.call_later(LEADER_STALL / 2, self.check)

    def check(self) -> None:
        if not self.fill.active:
            return
        if self.rw.nbytes != self.seen:
            self.seen, self.idle = self.rw.nbytes, 0.0
        else:
            self.idle += LEADER_STALL / 2
            if self.idle >= LEADER_STALL:
                self.fill.release_waiters()
                return
        self.handle = self.loop.call_later(LEADER_STALL / 2, self.check)

    def cancel(self) -> None:
        self.handle.cancel()


async def send_file(rw: ResponseWriter, fd: int, start: int, count: int) -> None:
    """`count` bytes of file `fd` from `start` to the client. While the transport's buffer is
    empty the kernel copies file to socket itself (os.sendfile: zero-copy, as the seed's proxy did
    with TransmitFile); when the client lags, one chunk is read and queued, so the transport's
    flow control waits for it and memory stays at one chunk plus the write buffer."""
    conn = rw.conn
    rw.flush_head()
    t = conn.transport
    # Over TLS (an intercepted tunnel) the bytes must go through the transport to be encrypted:
    # sendfile on the socket underneath would put plaintext into the TLS stream.
    sock = t.get_extra_info("socket") if t is not None and t.get_extra_info("sslcontext") is None else None
    out_fd = sock.fileno() if sock is not None and count >= SENDFILE_MIN else -1
    sent = 0
    while sent < count:
        if conn.closed:
            raise ClientGone("client closed the connection")
        if out_fd >= 0 and conn.write_buffer_size() == 0:
            try:
                n = os.sendfile(out_fd, fd, start + sent, count - sent)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                out_fd = -1  # not a socket sendfile can write to: read and write instead
                n = 0
            if n:
                sent += n
                rw.nbytes += n
                continue
        chunk = os.pread(fd, min(READ_CHUNK, count - sent), start + sent)
        if not chunk:
            raise OSError("stored body file is shorter than its entry says")
        await rw.send(chunk)
        sent += len(chunk)
