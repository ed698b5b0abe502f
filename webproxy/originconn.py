"""One keep-alive connection to an origin server, as an asyncio Protocol: the request head goes
out in one write, the response is parsed by llhttp (httptools) in callbacks, the body is buffered
for the consumer up to a bound (then the origin is paused), and one lazily re-armed timer enforces
the read timeout. The request coroutine waits on one future for the head and then for body bytes:
no task per request (a request body is the exception: a task pumps it, so the origin can answer
before the body is all sent). The pool that owns the connection is `webproxy.upstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import httptools

from webproxy.errors import OriginError, UpstreamError
from webproxy.httpmsg import Headers
from webproxy.originframing import CLOSE, NO_BODY, BadResponse, response_framing

BODY_HIGH = 1 << 18  # response bytes buffered for a slow consumer before we stop reading the origin
PIECE_COST = 64  # bytes counted per buffered piece on top of its length (the bytes object's overhead)
MAX_HEAD = 1 << 16  # default cap on an origin's response header section (server.max_header_size)

# Exchange states of one origin connection.
IDLE, HEAD, BODY, DONE, CLOSED = range(5)

# informational(status, reason, headers): a 1xx interim response arrived (RFC 9110 15.2).
Informational = Callable[[int, str, Headers], None]


class StaleConnection(Exception):
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
        """The next body bytes (all that is buffered, in one piece), b"" at the end; OriginError
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


class Pool(Protocol):
    """What a connection needs from the pool that owns it."""

    loop: asyncio.AbstractEventLoop
    cfg: dict[str, Any]  # the [upstream] section (read per exchange: SIGHUP may change it)
    head_limit: int

    def give_back(self, conn: OriginConnection) -> None:
        """The exchange ended cleanly: keep the connection for the next request."""

    def forget(self, conn: OriginConnection) -> None:
        """The connection is gone: free its slot."""


class OriginConnection(asyncio.Protocol):
    """One connection to an origin, carrying one exchange at a time (no pipelining upstream)."""

    def __init__(self, pool: Pool, key: tuple[str, int], label: str) -> None:
        self.pool = pool
        self.loop = pool.loop
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
                self.error = StaleConnection()
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
                self.error = OriginError(f"{self.label} closed the connection before the end of the body")
        if state == DONE:
            self.state = DONE
            self.keep_alive = False
        self._wake()
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)
        if state == IDLE:
            self.pool.forget(self)

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
        # Each piece also costs an object: counted, so tiny chunks cannot grow memory 40-fold.
        self._buffered += len(body) + PIECE_COST
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
                raise StaleConnection()
            raise UpstreamError(502, f"{self.label} closed the connection without answering", "ERR_READ_ERROR")
        cfg = self.pool.cfg
        self.method = method
        self.informational = informational
        self.read_timeout = cfg["read_timeout"]
        self.head_limit = self.pool.head_limit
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
                self._fail(OriginError("the request body could not be read from the client"))

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
                raise self.error if isinstance(self.error, OriginError) else OriginError(str(self.error))
            if self.state == DONE:
                return b""
            if self.state != BODY:
                raise OriginError(f"{self.label} closed the connection before the end of the body")
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        """The consumer is done: back to the pool when the exchange ended cleanly, else dropped."""
        if self.state == DONE and self.keep_alive and self.error is None and self._body_sent:
            self._reset()
            self.pool.give_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            if self.transport is not None:
                self.transport.abort()
        self._reset()
        self.pool.forget(self)

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
            self._fail(OriginError(f"timed out reading the body from {self.label}"))


def _parser_reason(e: Exception) -> str:
    text = str(e).strip()
    return text[:120] if text else type(e).__name__
