"""The client side of the proxy: one asyncio Protocol per client connection, llhttp (httptools)
parsing, pipelined requests answered in order by one serve loop, request bodies streamed with
backpressure, and response framing (length, chunked, or close-delimited for HTTP/1.0).

What to do with a request is not decided here: `handler(conn, request)` does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httptools

from tunnel.relay import detach_socket
from webproxy.httpmsg import Headers, error_body, reason_phrase, serialize_head

BODY_HIGH = 1 << 20  # pause reading the client when this much request body is waiting upstream
BODY_LOW = 1 << 18
MAX_PIPELINE = 16  # parsed-but-unanswered requests before we stop reading the client
WRITE_HIGH = 1 << 18


class ClientGone(Exception):
    """The client closed its connection (or stopped reading for longer than the idle timeout)."""


class Reject(Exception):
    """A request the parser side refuses outright: status code and a sentence for the body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RequestBody:
    """Request body bytes as the parser delivers them; reading them is what lets the client send
    more (and what triggers `100 Continue` for a client that asked for it)."""

    def __init__(self, conn: ClientConnection, limit: int, expect_continue: bool) -> None:
        self.conn = conn
        self.limit = limit
        self.expect_continue = expect_continue
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received = 0
        self.done = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.limit and self.received > self.limit:
            raise Reject(413, f"the request body is larger than this proxy's limit of {self.limit} bytes")
        self.chunks.append(data)
        self.buffered += len(data)
        self._wake()
        if self.buffered > BODY_HIGH:
            self.conn.pause_reading("body")

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self.error = exc
        self._wake()

    async def read(self) -> bytes:
        """The next chunk, or b"" at the end of the body."""
        if self.expect_continue:
            self.expect_continue = False
            if not self.conn.response_started:
                try:
                    self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                except ClientGone as e:
                    self.error = e  # so the handler sees a vanished client, not an upstream failure
                    raise
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self._waiter = self.conn.loop.create_future()
            await self._waiter
        data = self.chunks.popleft()
        self.buffered -= len(data)
        if self.buffered < BODY_LOW:
            self.conn.resume_reading("body")
        return data

    async def stream(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


class Request:
    __slots__ = ("method", "target", "version", "headers", "keep_alive", "body", "start", "head_size")

    def __init__(self, method: str, target: str, version: str, headers: Headers, keep_alive: bool,
                 body: RequestBody | None, start: float) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = body
        self.start = start
        self.head_size = 0


class ParseFailure:
    __slots__ = ("status", "message", "start")

    def __init__(self, status: int, message: str, start: float) -> None:
        self.status = status
        self.message = message
        self.start = start


Handler = Callable[["ClientConnection", Request], Awaitable[None]]


class ClientConnection(asyncio.Protocol):
    """One client connection. `server` provides: cfg, handler, admit/release, log, on_parse_failure."""

    def __init__(self, server: Any, initial: bytes = b"", transparent_dst: tuple[str, int] | None = None) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client_ip = "-"
        self.client_port = 0
        self.pending: deque[Request | ParseFailure] = deque()
        self.transparent_dst = transparent_dst
        self.initial = initial
        self.upgrade_rest: bytes | None = None
        self.response_started = False
        self.closed = False
        self.closing = False  # graceful shutdown: answer what is in flight, then close
        self.busy = False
        self.denied = False
        self.served = 0
        self._admitted = False
        self._paused: set[str] = set()
        self._parse_failed = False
        self._in_message = False
        self._completed = 0
        self._stash = b""
        self._method_override: str | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._idle: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._reset_message()

    # ---- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
        refusal = self.server.admit(self)
        if refusal is not None:
            status, message = refusal
            transport.write(self._simple(status, message, keep_alive=False))
            transport.close()
            self.closed = True
            return
        self._admitted = True
        self.denied = self.server.denied(self)  # decided once per connection, answered per request
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        self._task = self.loop.create_task(self._serve())
        self._arm_idle()
        if self.initial:
            data, self.initial = self.initial, b""
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle()
        gone = ClientGone("client closed the connection")
        for item in self.pending:
            if isinstance(item, Request) and item.body is not None:
                item.body.fail(gone)
        if self._cur_body is not None:
            self._cur_body.fail(gone)
        self._wake()
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_exception(gone)
        if self._admitted:
            self._admitted = False
            self.server.release(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    def pause_reading(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    async def detach(self) -> socket.socket:
        """Hand the raw client socket over (CONNECT): flush what we wrote, duplicate the file
        descriptor, drop the transport. The admission slot stays taken until `server.release`."""
        t = self.transport
        assert t is not None
        while t.get_write_buffer_size() and not self.closed:
            await asyncio.sleep(0.001)
        if self.closed:
            raise ClientGone("client closed the connection")
        self._admitted = False  # connection_lost must not release: the tunnel holds the slot now
        self.closed = True
        return detach_socket(t)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    # ---- parsing ----------------------------------------------------------------------------
    def _reset_message(self) -> None:
        self._url: list[bytes] = []
        self._url_len = 0
        self._hdrs: Headers = []
        self._hsize = 0
        self._cur_body: RequestBody | None = None
        self._body_expected = False
        self._expect_continue = False
        self._msg_start = 0.0

    def data_received(self, data: bytes) -> None:
        if self._parse_failed:
            return
        if self._stash:
            data, self._stash = self._stash + data, b""
        at_boundary = not self._in_message
        self._completed = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            # llhttp knows a fixed list of methods; a proxy must forward extension methods too.
            off = 0 if self._completed == 0 else _boundary_after(data, self._completed)
            if not at_boundary or off is None:
                self._fail_parse(400, "malformed HTTP request (invalid method)")
            else:
                self._extension_method(data[off:])
        except httptools.HttpParserUpgrade as e:
            self._on_upgrade(data[e.args[0]:])
        except Reject as e:
            self._fail_parse(e.status, e.message)
        except httptools.HttpParserError as e:
            cause = e.__context__ if isinstance(e.__context__, Reject) else None
            if cause is not None:
                self._fail_parse(cause.status, cause.message)
            else:
                self._fail_parse(400, f"malformed HTTP request ({_parser_reason(e)})")

    def _extension_method(self, rest: bytes) -> None:
        """Re-feed a request whose method llhttp does not know, with a stand-in method that frames
        the same way; on_headers_complete puts the real one back."""
        sp = rest.find(b" ")
        self.parser = httptools.HttpRequestParser(self)
        self._in_message = False
        if sp == -1:
            if len(rest) > 64 or b"\n" in rest:
                self._fail_parse(400, "malformed HTTP request (method token too long)")
            else:
                self._stash = rest  # the method token is not complete yet
            return
        method = rest[:sp]
        if not _TOKEN_RE.fullmatch(method):
            self._fail_parse(400, "malformed HTTP request (invalid method)")
            return
        self._method_override = method.decode("ascii")
        self.data_received(b"GET" + rest[sp:])

    def _on_upgrade(self, rest: bytes) -> None:
        req = self.pending[-1] if self.pending else None
        if isinstance(req, Request) and req.method == "CONNECT":
            # Everything after a CONNECT head belongs to the tunnel, not to the HTTP parser.
            self.upgrade_rest = rest
            self.pause_reading("upgrade")
            return
        # An Upgrade request (e.g. websocket) is forwarded without its Upgrade header, so the
        # connection stays HTTP: parse on with a fresh parser.
        self.parser = httptools.HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    def _fail_parse(self, status: int, message: str) -> None:
        self._parse_failed = True
        if self._cur_body is not None:
            self._cur_body.fail(Reject(status, message))
        self.pending.append(ParseFailure(status, message, self._msg_start or self.server.now()))
        self.pause_reading("failed")
        self._wake()

    def on_message_begin(self) -> None:
        self._in_message = True
        self._reset_message()
        self._msg_start = self.server.now()
        self._disarm_idle()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_len += len(url)
        if self._url_len > self.server.cfg.server["max_uri_length"]:
            raise Reject(414, f"the URI is longer than this proxy's limit of {self.server.cfg.server['max_uri_length']} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hsize += len(name) + len(value) + 4
        if self._hsize > self.server.cfg.server["max_header_size"]:
            raise Reject(431, f"the request header section is larger than this proxy's limit of {self.server.cfg.server['max_header_size']} bytes")
        n = name.decode("latin-1")
        v = value.decode("latin-1")
        self._hdrs.append((n, v))
        ln = n.lower()
        if ln == "content-length" or ln == "transfer-encoding":
            self._body_expected = True
        elif ln == "expect":
            if v.strip().lower() == "100-continue":
                self._expect_continue = True
            else:
                raise Reject(417, f"this proxy does not support the expectation {v!r}")

    def on_headers_complete(self) -> None:
        p = self.parser
        method = self._method_override or p.get_method().decode("latin-1")
        self._method_override = None
        version = p.get_http_version()
        target = b"".join(self._url).decode("latin-1")
        headers = self._hdrs
        _check_framing(headers)
        keep_alive = p.should_keep_alive()
        if version == "1.0":
            pc = [v.strip().lower() for k, v in headers if k.lower() == "proxy-connection"]
            if "keep-alive" in pc:
                keep_alive = True
        if any(k.lower() == "proxy-connection" and v.strip().lower() == "close" for k, v in headers):
            keep_alive = False
        body = None
        if self._body_expected and method != "CONNECT":
            limit = self.server.cfg.server["max_body_size"]
            cl = _content_length(headers)
            if limit and cl is not None and cl > limit:
                raise Reject(413, f"the request body ({cl} bytes) is larger than this proxy's limit of {limit} bytes")
            if cl != 0:
                body = RequestBody(self, limit, self._expect_continue)
        self._cur_body = body
        req = Request(method, target, version, headers, keep_alive, body, self._msg_start)
        req.head_size = self._hsize + self._url_len
        self.pending.append(req)
        if len(self.pending) > MAX_PIPELINE:
            self.pause_reading("pipeline")
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._cur_body is not None:
            self._cur_body.feed(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._completed += 1
        if self._cur_body is not None:
            self._cur_body.finish()
            self._cur_body = None

    # ---- serving ----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _arm_idle(self) -> None:
        # One timer per connection, re-armed lazily: each request only stamps the time, and the
        # timer, when it fires early, sleeps again for the rest (no timer churn per request).
        self._idle_since = self.loop.time()
        if self._idle is None:
            timeout = self.server.cfg.server["idle_timeout"]
            if timeout:
                self._idle = self.loop.call_at(self._idle_since + timeout, self._on_idle)

    def _disarm_idle(self) -> None:
        self._idle_since = None

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if self.closed:
            return
        timeout = self.server.cfg.server["idle_timeout"]
        since = self._idle_since
        if since is None or self.busy or self.pending:
            since = self.loop.time()  # in use: look again a full timeout from now
            if not (self.busy or self.pending):
                self._idle_since = since
        deadline = since + timeout
        if timeout and self.loop.time() < deadline:
            self._idle = self.loop.call_at(deadline, self._on_idle)
            return
        if not timeout:
            return
        self.close()
        self._wake()

    async def _serve(self) -> None:
        try:
            while not self.closed:
                if not self.pending:
                    if self.closing:
                        break
                    self._arm_idle()
                    self._waiter = self.loop.create_future()
                    await self._waiter
                    self._waiter = None
                    continue
                item = self.pending.popleft()
                if len(self.pending) <= MAX_PIPELINE // 2:
                    self.resume_reading("pipeline")
                if isinstance(item, ParseFailure):
                    if not self.closed:
                        self.write(self._simple(item.status, item.message, keep_alive=False))
                    self.server.on_parse_failure(self, item)
                    break
                self.busy = True
                self.response_started = False
                self.served += 1
                keep = await self.server.handler(self, item)
                self.busy = False
                if not keep or self.closed:
                    break
                if item.body is not None and not (item.body.done and not item.body.chunks):
                    break  # the handler did not read the whole body: the framing is lost
                if self.upgrade_rest is not None:
                    break
        except ClientGone:
            pass
        finally:
            self.busy = False
            self._cancel_idle()
            if not self.closed and self.transport is not None:
                self.transport.close()
                self.closed = True

    def request_keep_alive(self, req: Request) -> bool:
        """Whether this connection stays open after answering `req`."""
        if not req.keep_alive or self.closing:
            return False
        limit = self.server.cfg.server["max_requests_per_connection"]
        return not (limit and self.served >= limit)

    # ---- writing ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed:
            raise ClientGone("client closed the connection")
        self.transport.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        if not self._write_paused:
            return
        if self.closed:
            raise ClientGone("client closed the connection")
        self._write_waiter = self.loop.create_future()
        timeout = self.server.cfg.server["idle_timeout"] or None
        try:
            await asyncio.wait_for(self._write_waiter, timeout)
        except TimeoutError:
            self.abort()
            raise ClientGone("client stopped reading") from None
        finally:
            self._write_waiter = None

    def _simple(self, status: int, message: str, keep_alive: bool, extra: Headers | None = None) -> bytes:
        body = error_body(status, message)
        headers = [
            ("Server", "webproxy"),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(extra or []),
            ("Connection", "keep-alive" if keep_alive else "close"),
        ]
        return serialize_head(status, reason_phrase(status), headers) + body


class ResponseWriter:
    """Frames one response to the client: Content-Length when known, chunked for HTTP/1.1 when not,
    close-delimited for HTTP/1.0; counts bytes for the access log."""

    __slots__ = ("conn", "req", "chunked", "keep_alive", "nbytes", "no_body", "remaining", "_head")

    def __init__(self, conn: ClientConnection, req: Request) -> None:
        self.conn = conn
        self.req = req
        self.chunked = False
        self.keep_alive = False
        self.no_body = False
        self.nbytes = 0
        self.remaining: int | None = None
        self._head = b""  # held back to go out in one write with the first body bytes

    def start(self, status: int, reason: str, headers: Headers, length: int | None, has_body: bool = True) -> None:
        """Write the head. `headers` must be end-to-end only; `length` None means unknown."""
        req = self.req
        self.no_body = not has_body or req.method == "HEAD" or status in (204, 304) or status < 200
        if self.no_body:
            if length is not None and status >= 200 and status != 204:
                headers.append(("Content-Length", str(length)))  # what a GET would carry: HEAD's news
        elif length is not None:
            headers.append(("Content-Length", str(length)))
            self.remaining = length
        elif req.version == "1.1":
            headers.append(("Transfer-Encoding", "chunked"))
            self.chunked = True
        head = serialize_head(status, reason or reason_phrase(status), headers)[:-2]
        self._finish_head(head, close_delimited=not self.no_body and length is None and req.version != "1.1")

    def start_raw(self, head: bytes, length: int) -> None:
        """Like start() for a head already serialized with its Content-Length (all but the
        Connection field and the blank line): the cache's hot path."""
        self.no_body = self.req.method == "HEAD"
        self.remaining = length
        self._finish_head(head, close_delimited=False)

    def _finish_head(self, head: bytes, close_delimited: bool) -> None:
        conn, req = self.conn, self.req
        keep = conn.request_keep_alive(req) and not close_delimited
        self.keep_alive = keep
        if req.version == "1.0":
            head += b"Connection: keep-alive\r\n\r\n" if keep else b"Connection: close\r\n\r\n"
        elif not keep:
            head += b"Connection: close\r\n\r\n"
        else:
            head += b"\r\n"
        self._head = head
        conn.response_started = True
        self.nbytes += len(head)

    def write(self, data: bytes) -> None:
        """Queue body bytes without waiting for the client to drain them (small bodies)."""
        if self.no_body or not data:
            return
        self.nbytes += len(data)
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        self.conn.write(data)

    async def send(self, data: bytes) -> None:
        """Body bytes, with backpressure from the client."""
        if self.no_body or not data:
            return
        self.write(data)
        await self.conn.drain()

    def end(self) -> bool:
        """Finish the body; returns whether the connection may be kept alive."""
        tail = b"0\r\n\r\n" if self.chunked else b""
        self.nbytes += len(tail)
        if self._head or tail:
            data, self._head = self._head + tail, b""
            self.conn.write(data)
        return self.keep_alive

    def simple(self, status: int, message: str, extra: Headers | None = None, close: bool = False) -> bool:
        """A complete short plain-text response (errors, denials)."""
        keep = self.conn.request_keep_alive(self.req) and not close
        if self.req.body is not None and not self.req.body.done:
            keep = False  # we are not going to read the body: closing is the only safe framing
        data = self.conn._simple(status, message, keep, extra)
        if self.req.method == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        self.conn.response_started = True
        self.conn.write(data)
        self.nbytes += len(data)
        return keep


def _content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k.lower() == "content-length":
            try:
                return int(v.strip())
            except ValueError:
                return None
    return None


def _check_framing(headers: Headers) -> None:
    """Refuse the request-smuggling shapes llhttp may let through (RFC 9112 6.1, 6.3)."""
    cls = {v.strip() for k, v in headers if k.lower() == "content-length"}
    tes = [v for k, v in headers if k.lower() == "transfer-encoding"]
    if cls and tes:
        raise Reject(400, "the request has both Content-Length and Transfer-Encoding")
    if len(cls) > 1:
        raise Reject(400, "the request has conflicting Content-Length values")
    for v in cls:
        if not v.isdigit():
            raise Reject(400, f"bad Content-Length {v!r}")
    if tes:
        codings = [c.strip().lower() for t in tes for c in t.split(",")]
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise Reject(400, "Transfer-Encoding must end in a single 'chunked'")
        if any(c not in ("chunked", "gzip", "deflate", "compress", "identity", "x-gzip") for c in codings):
            raise Reject(501, f"unsupported transfer coding in {', '.join(codings)!r}")


_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def on_message_complete(self) -> None:
        self.n += 1


def _boundary_after(data: bytes, k: int) -> int | None:
    """Offset in `data` (which starts at a message boundary) where message k+1 begins: the shortest
    prefix in which a scratch parser completes k messages. Only used on the rare extension-method path."""
    def completed(prefix: bytes) -> int:
        c = _Counter()
        with contextlib.suppress(httptools.HttpParserError):
            httptools.HttpRequestParser(c).feed_data(prefix)
        return c.n

    lo, hi = 1, len(data)
    while lo < hi:
        mid = (lo + hi) // 2
        if completed(data[:mid]) >= k:
            hi = mid
        else:
            lo = mid + 1
    return lo if completed(data[:lo]) >= k else None


def _parser_reason(e: Exception) -> str:
    text = str(e).strip()
    return text[:120] if text else type(e).__name__
