"""Fetching from origin servers over HTTP/1.1: our own client, built for a proxy.

One asyncio Protocol per origin connection parses responses with llhttp (httptools) in callbacks;
the request coroutine only waits for the head and then for body bytes, so a request costs one
future and no task (a request body is the exception: it is pumped by a task of its own, so the
origin can answer before the body is all sent). Connections are kept alive in a pool per
(host, port) with the `[upstream]` limits and idle expiry.

Nothing is added or changed on the way: the request target byte-for-byte, only the header fields
the caller passes (plus `Transfer-Encoding: chunked` when a body of unknown length must be framed),
no decompression, no cookies. Responses are checked strictly (`webproxy.originframing`): an
ambiguous or malformed head is a 502, never a guess.

Failures before the response head come back as `UpstreamError` with the status the client should
see (502/504) and a sentence naming the host; failures after it as `BodyError` from `read()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httptools

from webproxy.dns import DNSError, Resolver
from webproxy.httpmsg import Headers, Target
from webproxy.originframing import CLOSE, NO_BODY, BadResponse, response_framing

# RFC 9110 9.2.2: a request that may be sent twice without a different effect.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
BODY_HIGH = 1 << 18  # response bytes buffered for a slow consumer before we stop reading the origin
BODY_LOW = 1 << 16
MAX_HEAD = 1 << 16  # default cap on an origin's response header section (server.max_header_size)

# Exchange states of one origin connection.
IDLE, HEAD, BODY, DONE, CLOSED = range(5)

# informational(status, reason, headers): a 1xx interim response arrived (RFC 9110 15.2).
Informational = Callable[[int, str, Headers], None]


class UpstreamError(Exception):
    """The origin could not be asked, or did not answer usably: `status` (502/504) for the client,
    `message` naming the host and the cause, `code` the Squid-style error name for the log."""

    def __init__(self, status: int, message: str, code: str = "ERR_CONNECT_FAIL") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class BodyError(Exception):
    """The origin failed after the response head: the body is incomplete."""


class _Stale(Exception):
    """A reused connection was closed by the origin before any byte of the response arrived."""


class _HeadDone(Exception):
    """Raised from a parser callback to stop llhttp after a HEAD response's head: llhttp cannot
    know the request was HEAD and would otherwise read a body of the advertised length."""


class UpstreamResponse:
    """The final response head; `read()` the body (b"" at its end), then `release()` (the
    connection may be reused) or `abort()` (dropped). `length` is the declared Content-Length."""

    __slots__ = ("status", "reason", "version", "headers", "length", "peer", "_conn")

    def __init__(self, conn: OriginConnection) -> None:
        self.status = conn.status
        self.reason = conn.reason
        self.version = conn.version
        self.headers = conn.headers
        self.length = conn.length
        self.peer = conn.peer
        self._conn = conn

    def read(self) -> Awaitable[bytes]:
        """The next body bytes (all that is buffered, in one piece), b"" at the end; BodyError
        when the body is incomplete."""
        return self._conn.read()

    def release(self) -> None:
        self._conn.release()

    def abort(self) -> None:
        self._conn.abort()


def serialize_request(method: str, path: str, headers: Headers, chunked: bool) -> bytes:
    """The request head in one piece; `path` and the fields exactly as given (latin-1 round trip)."""
    fields = "".join([f"{k}: {v}\r\n" for k, v in headers])
    end = "Transfer-Encoding: chunked\r\n\r\n" if chunked else "\r\n"
    return f"{method} {path} HTTP/1.1\r\n{fields}{end}".encode("latin-1", "replace")


class OriginConnection(asyncio.Protocol):
    """One connection to an origin, carrying one exchange at a time (no pipelining upstream)."""

    def __init__(self, upstream: Upstream, key: tuple[str, int], label: str) -> None:
        self.upstream = upstream
        self.loop = upstream.loop
        self.key = key
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = IDLE
        self.reused = False
        self.counted = True  # holds a pool slot until forgotten
        self.idle_since = 0.0
        self.head_limit = MAX_HEAD
        self.read_timeout = 0.0
        self.method = "GET"
        self.informational: Informational | None = None
        self.received = False
        self.status = 0
        self.reason = ""
        self.version = "1.1"
        self.headers: Headers = []
        self.length: int | None = None
        self.kind = NO_BODY
        self.keep_alive = False
        self.error: BaseException | None = None
        self._reason = b""
        self._hsize = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._body_sent = True
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ---- transport events ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state != HEAD and state != BODY:
            self._bad_connection()  # bytes nobody asked for: this connection's framing is lost
            return
        self.received = True
        self._last = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, _HeadDone):
                # Anything after a HEAD response's head is not part of any answer we asked for.
                if not (data.endswith(b"\r\n\r\n")):
                    self.keep_alive = False
                self.parser = httptools.HttpResponseParser(self)
            elif self.state == DONE:
                self.keep_alive = False  # extra bytes after a complete response
            elif isinstance(cause, BadResponse):
                self._fail(UpstreamError(502, f"{self.label} sent an invalid response: {cause}", "ERR_INVALID_RESP"))
            else:
                self._fail(UpstreamError(502, f"{self.label} sent an invalid response: {_parser_reason(e)}",
                                         "ERR_INVALID_RESP"))

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self.state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if state == HEAD and self.error is None:
            if not self.received and self.reused:
                self.error = _Stale()
            elif not self.received:
                self.error = UpstreamError(502, f"{self.label} closed the connection without answering",
                                           "ERR_READ_ERROR")
            else:
                self.error = UpstreamError(502, f"{self.label} closed the connection in the middle of the "
                                           "response head", "ERR_READ_ERROR")
        elif state == BODY:
            if self.kind == CLOSE and self.error is None:
                state = DONE  # RFC 9112 6.3 rule 8: the close is the end of this body
                self.keep_alive = False
            elif self.error is None:
                self.error = BodyError(f"{self.label} closed the connection before the end of the body")
        if state == DONE:
            self.state = DONE
            self.keep_alive = False
        self._wake()
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)
        if state == IDLE:
            self.upstream._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)

    # ---- parser callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.state != HEAD:
            raise BadResponse("extra data after the response")
        self.headers = []
        self._hsize = 0
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hsize += len(name) + len(value) + 4
        if self._hsize > self.head_limit:
            raise BadResponse(f"its header section is larger than {self.head_limit} bytes")
        if self.state == HEAD:  # trailer fields are dropped, never merged into the head
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        p = self.parser
        status = p.get_status_code()
        kind, length = response_framing(self.method, status, self.headers)
        reason = self._reason.decode("latin-1")
        if status < 200:
            cb = self.informational
            if cb is not None:
                with contextlib.suppress(Exception):  # a client gone is noticed by the final relay
                    cb(status, reason, self.headers)
            return
        self.status = status
        self.reason = reason
        self.version = p.get_http_version()
        self.kind = kind
        self.length = length
        self.keep_alive = p.should_keep_alive()
        self.state = BODY
        self._wake()
        if self.method == "HEAD":
            self.state = DONE
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        if self.state != BODY:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > BODY_HIGH and not self._paused:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def on_message_complete(self) -> None:
        if self.state == BODY:  # (1xx interim messages complete too, before the final head)
            self.state = DONE
            self._wake()

    # ---- one exchange -------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._bad_connection()
        self._wake()

    def _bad_connection(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    async def exchange(self, method: str, head: bytes, body: AsyncIterator[bytes] | None, chunked: bool,
                       informational: Informational | None) -> UpstreamResponse:
        if self.state != IDLE:  # closed before we could use it (say, it spoke first)
            self.abort()
            if self.reused:
                raise _Stale()
            raise UpstreamError(502, f"{self.label} closed the connection without answering", "ERR_READ_ERROR")
        cfg = self.upstream.cfg
        self.method = method
        self.informational = informational
        self.read_timeout = cfg["read_timeout"]
        self.head_limit = self.upstream.head_limit
        self.received = False
        self.error = None
        self.status = 0
        self.state = HEAD
        self._last = self.loop.time()
        self.transport.write(head)  # type: ignore[union-attr]
        if body is not None:
            self._body_sent = False
            self._pump = self.loop.create_task(self._send_body(body, chunked))
        self._arm_timer()
        try:
            while self.state == HEAD and self.error is None:
                self._waiter = self.loop.create_future()
                await self._waiter
                self._waiter = None
        except BaseException:
            self.abort()
            raise
        if self.status == 0:  # no final head: the error says why
            error = self.error or UpstreamError(502, f"{self.label} did not answer", "ERR_READ_ERROR")
            self.abort()
            raise error
        return UpstreamResponse(self)

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.state == CLOSED:
                    return
                if not chunk:
                    continue
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                self._last = self.loop.time()
                if self._write_paused:
                    self._drainer = self.loop.create_future()
                    await self._drainer
                    self._drainer = None
            if chunked and self.state != CLOSED:
                transport.write(b"0\r\n\r\n")
            self._body_sent = True
        except Exception:
            # The client's body failed (gone, over a limit): the origin got a truncated request,
            # so this connection cannot carry anything more. The caller reads the body's own error.
            if self.state == HEAD:
                self._fail(UpstreamError(502, "the request body could not be read from the client",
                                         "ERR_READ_ERROR"))
            else:
                self._fail(BodyError("the request body could not be read from the client"))

    async def read(self) -> bytes:
        """The next body bytes (all that is buffered, in one piece), b"" at the end."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused and self.state == BODY:
                    self._paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                return data
            if self.error is not None:
                raise self.error if isinstance(self.error, BodyError) else BodyError(str(self.error))
            if self.state == DONE:
                return b""
            if self.state != BODY:
                raise BodyError(f"{self.label} closed the connection before the end of the body")
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        """The consumer is done: back to the pool when the exchange ended cleanly, else dropped."""
        if self.state == DONE and self.keep_alive and self.error is None and self._body_sent:
            self._reset()
            self.upstream._put_idle(self)
        else:
            self.abort()

    def abort(self) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            if self.transport is not None:
                self.transport.abort()
        self._reset()
        self.upstream._forget(self)

    def _reset(self) -> None:
        if self.state != CLOSED:
            self.state = IDLE
        self.informational = None
        self.headers = []
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.state == IDLE:
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._paused = False
        if self._pump is not None:
            if not self._pump.done():
                self._pump.cancel()
            self._pump = None
        self._body_sent = True

    # ---- read timeout -------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        # One timer per connection, re-armed lazily: each byte only stamps the time, and the timer,
        # when it fires early, sleeps again for the rest (no timer churn per request or chunk).
        if self._timer is None and self.read_timeout:
            self._timer = self.loop.call_at(self._last + self.read_timeout, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        state = self.state
        if state != HEAD and state != BODY:
            return
        now = self.loop.time()
        if self._paused or (not self._body_sent and not self._write_paused):
            # We stopped reading for a slow consumer, or the origin waits for request body bytes
            # the client has not sent yet: neither is the origin's delay.
            self._last = now
        deadline = self._last + self.read_timeout
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        if state == HEAD:
            self._fail(UpstreamError(504, f"timed out waiting for {self.label} to answer", "ERR_READ_TIMEOUT"))
        else:
            self._fail(BodyError(f"timed out reading the body from {self.label}"))


class _Host:
    """The pool's record of one (host, port): idle connections (most recent last), live count."""

    __slots__ = ("idle", "live")

    def __init__(self) -> None:
        self.idle: list[OriginConnection] = []
        self.live = 0


class Upstream:
    """The origin-side HTTP client, shared by every client connection of one proxy process."""

    def __init__(self, cfg: dict[str, Any], resolver: Resolver | None = None, head_limit: int = MAX_HEAD) -> None:
        self.cfg = cfg
        self.resolver = resolver if resolver is not None else Resolver(cfg["dns_ttl"])
        self.head_limit = head_limit
        self.loop = asyncio.get_running_loop()
        self.active = 0  # fetches in flight, read by the refresher's load check
        self.opened = 0  # connections opened, for stats and tests
        self._hosts: dict[tuple[str, int], _Host] = {}
        self._live = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(self, method: str, target: Target, headers: Headers,
                      body: AsyncIterator[bytes] | None = None,
                      informational: Informational | None = None) -> UpstreamResponse:
        """Send the request to `target` (its `connect` address when set, else host and port) and
        return once the final response head is in. `headers` go out exactly as given; `body`
        is streamed (chunked unless the headers carry Content-Length). Interim 1xx responses go
        to `informational` as they arrive. Raises UpstreamError."""
        key = _dial(target)
        label = f"{target.host}:{target.port}"
        chunked = body is not None and not any(k.lower() == "content-length" for k, _ in headers)
        head = serialize_request(method, target.path, headers, chunked)
        conn = await self._acquire(key, label, fresh=False)
        try:
            return await conn.exchange(method, head, body, chunked, informational)
        except _Stale:
            # RFC 9112 9.3.1: a request on a connection the origin had already closed may be
            # retried once, on a new connection, when repeating it is harmless (idempotent and
            # without a body we have already consumed).
            if method not in IDEMPOTENT or body is not None:
                raise UpstreamError(502, f"{label} closed the connection without answering",
                                    "ERR_READ_ERROR") from None
        conn = await self._acquire(key, label, fresh=True)
        try:
            return await conn.exchange(method, head, body, chunked, informational)
        except _Stale:  # (cannot happen on a fresh connection; kept for the type)
            raise UpstreamError(502, f"{label} closed the connection without answering", "ERR_READ_ERROR") from None

    # ---- the pool -----------------------------------------------------------------------------
    async def _acquire(self, key: tuple[str, int], label: str, fresh: bool) -> OriginConnection:
        loop = self.loop
        while True:
            if self._closed:
                raise UpstreamError(502, "the proxy is shutting down", "ERR_CONNECT_FAIL")
            h = self._hosts.get(key)
            if h is None:
                h = self._hosts[key] = _Host()
            if h.idle and not fresh:
                now = loop.time()
                keepalive = self.cfg["keepalive_timeout"]
                while h.idle:
                    conn = h.idle.pop()
                    if (now - conn.idle_since < keepalive and conn.state == IDLE
                            and not conn.transport.is_closing()):  # type: ignore[union-attr]
                        conn.reused = True
                        return conn
                    conn.abort()  # expired (the sweeper had not come round yet)
                continue  # aborting may have dropped this host's record: look it up again
            limit = self.cfg["pool_size"]
            per_host = self.cfg["pool_size_per_host"]
            if (not limit or self._live < limit) and (not per_host or h.live < per_host):
                self._live += 1
                h.live += 1
                try:
                    conn = await self._open(key, label)
                except BaseException:
                    self._live -= 1
                    h.live -= 1
                    self._drop_host_if_unused(key, h)
                    self._wake_waiters()
                    raise
                return conn
            if self._evict_idle(h if per_host and h.live >= per_host else None):
                continue
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    async def _open(self, key: tuple[str, int], label: str) -> OriginConnection:
        host, port = key
        loop = self.loop
        timeout = self.cfg["connect_timeout"] or None
        last: OSError | None = None
        try:
            async with asyncio.timeout(timeout):
                for _family, ip in await self.resolver.addresses(host, port):
                    conn = OriginConnection(self, key, label)
                    try:
                        await loop.create_connection(lambda c=conn: c, ip, port)  # type: ignore[misc]
                    except OSError as e:
                        last = e
                        continue
                    self.opened += 1
                    return conn
        except TimeoutError:
            raise UpstreamError(504, f"timed out connecting to {label}", "ERR_CONNECT_FAIL") from None
        except DNSError as e:
            raise UpstreamError(502, f"cannot resolve {label}: DNS lookup failed ({e.strerror or e})",
                                "ERR_DNS_FAIL") from None
        raise UpstreamError(502, f"cannot connect to {label}: {_why(last)}", "ERR_CONNECT_FAIL")

    def _put_idle(self, conn: OriginConnection) -> None:
        keepalive = self.cfg["keepalive_timeout"]
        h = self._hosts.get(conn.key)
        if self._closed or keepalive <= 0 or h is None:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        h.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(keepalive, self._sweep)
        self._wake_waiters()

    def _forget(self, conn: OriginConnection) -> None:
        """Give back the slot of a connection that is gone (exactly once per connection)."""
        if not conn.counted:
            return
        conn.counted = False
        self._live -= 1
        h = self._hosts.get(conn.key)
        if h is not None:
            h.live -= 1
            if conn in h.idle:
                h.idle.remove(conn)
            self._drop_host_if_unused(conn.key, h)
        self._wake_waiters()

    def _drop_host_if_unused(self, key: tuple[str, int], h: _Host) -> None:
        if h.live <= 0 and self._hosts.get(key) is h:
            del self._hosts[key]

    def _evict_idle(self, only: _Host | None) -> bool:
        """Close the longest-idle connection (of `only`, else of any host) to make room."""
        candidates = [only] if only is not None else list(self._hosts.values())
        oldest: OriginConnection | None = None
        for h in candidates:
            if h.idle and (oldest is None or h.idle[0].idle_since < oldest.idle_since):
                oldest = h.idle[0]
        if oldest is None:
            return False
        oldest.abort()
        return True

    def _wake_waiters(self) -> None:
        # Everyone waiting looks again: a freed slot may fit some waiters and not others.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _sweep(self) -> None:
        self._sweeper = None
        keepalive = self.cfg["keepalive_timeout"]
        now = self.loop.time()
        earliest = None
        for h in list(self._hosts.values()):
            for conn in list(h.idle):
                if keepalive <= 0 or now - conn.idle_since >= keepalive:
                    conn.abort()
                elif earliest is None or conn.idle_since < earliest:
                    earliest = conn.idle_since
        if earliest is not None:
            self._sweeper = self.loop.call_at(earliest + keepalive, self._sweep)

    def stats(self) -> dict[str, int]:
        return {"live": self._live, "idle": sum(len(h.idle) for h in self._hosts.values()),
                "opened": self.opened}

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for h in list(self._hosts.values()):
            for conn in list(h.idle):
                conn.abort()
        self._wake_waiters()


def _dial(target: Target) -> tuple[str, int]:
    """(host, port) to connect to: the intercepted destination in transparent mode."""
    if target.connect is None:
        return target.host, target.port
    host, _, port = target.connect.rpartition(":")
    return host.strip("[]"), int(port)


def _why(e: BaseException | None) -> str:
    if e is None:
        return "no address to connect to"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return text if text else type(e).__name__


def _parser_reason(e: Exception) -> str:
    text = str(e).strip()
    return text[:120] if text else type(e).__name__
