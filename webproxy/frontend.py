"""The client side of the proxy: one asyncio Protocol per client connection, llhttp (httptools)
parsing, pipelined requests answered in order by one serve loop, request bodies streamed with
backpressure, and response framing (length, chunked, or close-delimited for HTTP/1.0).

What to do with a request is not decided here: the `ConnectionHost` does that (`answer_now` in the
parser callback for what can be answered at once, `handle` in the serve task for the rest). When the
connection stays open is decided by the pure rules of `webproxy.http1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httptools

from tunnel.relay import detach_socket
from webproxy import http1
from webproxy.errors import ClientGone, Reject
from webproxy.http1 import ConnState, Framing
from webproxy.httpmsg import Headers, error_body, reason_phrase, serialize_head

BODY_HIGH = 1 << 20  # pause reading the client when this much request body is waiting upstream
BODY_LOW = 1 << 18
MAX_PIPELINE = 16  # parsed-but-unanswered requests before we stop reading the client
WRITE_HIGH = 1 << 18
DENIED_LINGER = 2.0  # seconds a refused client has to send the request its 403 answers
# The extension-method path re-parses the start of a read to find where the next message begins;
# a message longer than this before an extension method is refused instead, so work stays bounded.
BOUNDARY_SEARCH_MAX = 1 << 20


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


@dataclass(slots=True)
class Inherited:
    """What the HTTP connection inside an intercepted TLS tunnel inherits from the CONNECT that
    opened it: its requests carry no proxy credentials of their own and belong to that client."""

    client_ip: str
    client_port: int
    host: str  # the CONNECT authority: where every request inside goes
    port: int
    user: Any = None  # the CONNECT's authenticated user (webproxy.authpolicy.Identity), if any
    connect: str | None = None  # "ip:port" to dial instead (transparent mode: the original destination)
    ended: asyncio.Future[None] | None = None  # set when the inner connection is gone


class ConnectionHost(Protocol):
    """What a client connection needs from the proxy around it, and nothing more."""

    @property
    def limits(self) -> Mapping[str, Any]: ...  # the live [server] section (SIGHUP may replace it)

    def now(self) -> float: ...

    def admit(self, conn: ClientConnection) -> tuple[int, str] | None: ...

    def release(self, conn: ClientConnection) -> None: ...

    def denied(self, conn: ClientConnection) -> bool: ...

    def on_parse_failure(self, conn: ClientConnection, item: ParseFailure) -> None: ...

    def answer_now(self, conn: ClientConnection, req: Request) -> bool: ...

    def handle(self, conn: ClientConnection, req: Request) -> Awaitable[bool]: ...


class ClientConnection(asyncio.Protocol):
    """One client connection: parse, queue in order, answer, decide (by http1.keep_open) whether
    to go on. Its lifecycle is `state` (http1.ConnState)."""

    def __init__(self, host: ConnectionHost, initial: bytes = b"",
                 transparent_dst: tuple[str, int] | None = None, inherited: Inherited | None = None) -> None:
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.state = ConnState.IDLE
        self.closed = False
        self.client_ip = "-"
        self.client_port = 0
        self.pending: deque[Request | ParseFailure] = deque()
        self.transparent_dst = transparent_dst
        self.inherited = inherited  # set: this is the decrypted inside of an intercepted tunnel
        self.initial = initial
        self.upgrade_rest: bytes | None = None
        self.response_started = False
        self.denied = False
        # The user a CONNECT on this connection authenticated as (webproxy.authpolicy.Identity):
        # requests inside an intercepted tunnel carry no Proxy-Authorization and inherit it.
        self.user: Any = inherited.user if inherited is not None else None
        # (Proxy-Authorization value, its verdict-cache key) of this connection's last request: a
        # client sends the same field every time, so it is hashed once per connection (webproxy.auth).
        self.auth_seen: Any = None
        self.served = 0
        self._admitted = False
        self._paused: set[str] = set()
        self._parse_failed = False
        self._in_message = False
        self._completed = 0
        self._stash = b""
        self._method_override: str | None = None
        self._held: Request | None = None  # a bodiless request, until its message completes
        self._head_bytes = 0  # bytes fed while the current request head is incomplete
        self._tail = b""  # the last bytes of the previous read (a blank line may span two reads)
        self._completed_with_body = 0
        self._waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._idle: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._eof = False  # the client half-closed after complete requests: answer them, then close
        self._reset_message()

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.state is ConnState.BUSY or self.state is ConnState.DRAINING

    def _to(self, state: ConnState) -> None:
        self.state = http1.next_state(self.state, state)
        # `closed` (no more bytes can be written: closed, or handed to a tunnel) follows the state;
        # kept as a plain attribute because every write asks (a property cost 7% of a hit's time).
        self.closed = state is ConnState.CLOSED or state is ConnState.DETACHED

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        inh = self.inherited
        if inh is not None:
            # Admitted and counted as the CONNECT that opened it (which holds the slot until
            # this connection ends): not admitted or counted a second time.
            self.client_ip, self.client_port = inh.client_ip, inh.client_port
            self._arm_idle()
        elif (denied := self.host.denied(self)):
            self.denied = denied
            # Not counted against the connection limits, and not kept: a request that is already
            # on its way gets its 403 (and the connection closes after it), silence is cut short.
            self._idle = self.loop.call_later(DENIED_LINGER, self.close)
        else:
            refusal = self.host.admit(self)
            if refusal is not None:
                status, message = refusal
                transport.write(self._simple(status, message, keep_alive=False))
                transport.close()
                self._to(ConnState.CLOSED)
                return
            self._admitted = True
            self._arm_idle()
        if self.initial:
            data, self.initial = self.initial, b""
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not ConnState.DETACHED:
            self._to(ConnState.CLOSED)
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
            self.host.release(self)
        inh = self.inherited
        if inh is not None and inh.ended is not None and not inh.ended.done():
            inh.ended.set_result(None)

    def eof_received(self) -> bool:
        """FIN from the client: keep the write side open while complete requests are waiting
        (http1.answer_after_eof), answer them, then close; otherwise close now."""
        waiting = bool(self.pending) or self.busy or self._held is not None
        cut_off = self._in_message and not self._parse_failed  # a refused request is still answered (400...)
        if not self.closed and http1.answer_after_eof(cut_off, waiting):
            self._eof = True
            return True
        return False

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
        descriptor, drop the transport. The admission slot stays taken until `host.release`."""
        t = self.transport
        assert t is not None
        while t.get_write_buffer_size() and not self.closed:
            await asyncio.sleep(0.001)
        if self.closed:
            raise ClientGone("client closed the connection")
        self._admitted = False  # connection_lost must not release: the tunnel holds the slot now
        self._to(ConnState.DETACHED)
        return detach_socket(t)

    def drain_and_close(self) -> None:
        """Graceful shutdown: an idle connection closes now; a busy one after its answer."""
        if self.closed:
            return
        if self.state is ConnState.IDLE and not self.pending and self._held is None:
            self.close()
        else:
            self._to(ConnState.DRAINING)
        self._wake()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        if self.state is not ConnState.DETACHED:
            self._to(ConnState.CLOSED)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        if self.state is not ConnState.DETACHED:
            self._to(ConnState.CLOSED)

    # ---- parsing ------------------------------------------------------------------------------
    def _reset_message(self) -> None:
        self._url: list[bytes] = []
        self._url_len = 0
        self._hdrs: Headers = []
        self._hsize = 0
        self._cur_body: RequestBody | None = None
        self._headers_done = False
        self._body_expected = False
        self._expect_continue = False
        self._msg_start = 0.0

    def data_received(self, data: bytes) -> None:
        """Feed the parser. No exception from parsing escapes: whatever cannot be parsed is a 400
        (or the Reject's status) after the requests completed before it (RFC 9112 2.2)."""
        if self._parse_failed or self.closed:
            return
        if self._stash:
            data, self._stash = self._stash + data, b""
        try:
            # A loop, not recursion: each round re-feeds what follows an extension method.
            while data is not None and not self._parse_failed:
                data = self._feed(data)
        except Exception as e:  # a parser state we did not foresee: refuse, never crash the transport
            self._fail_parse(400, f"malformed HTTP request ({_parser_reason(e)})")

    def _feed(self, data: bytes) -> bytes | None:
        """One parser feed; returns bytes to feed next (after an extension method), else None."""
        at_boundary = not self._in_message
        if self._in_message and not self._headers_done:
            self._head_bytes += len(data)  # on_message_begin resets it for a head that starts now
        self._completed = 0
        self._completed_with_body = 0
        tail, self._tail = self._tail, data[-3:]
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            # llhttp knows a fixed list of methods; a proxy must forward extension methods too.
            k = self._completed
            if k == 0:
                off: int | None = 0 if at_boundary else None
            elif at_boundary:
                off = _boundary_after(data, k)
            elif self._completed_with_body == 0:
                # The read began inside a head: with no body among the k messages, message k+1
                # begins after the k-th blank line (counting the previous read's last bytes).
                end = _heads_end(tail + data, k)
                off = None if end is None else end - len(tail)
            else:
                off = None
            if off is None or off < 0:
                self._fail_parse(400, "malformed HTTP request (invalid method)")
                return None
            return self._extension_method(data[off:])
        except httptools.HttpParserUpgrade as e:
            return self._on_upgrade(data[e.args[0]:])
        except Reject as e:
            self._fail_parse(e.status, e.message)
        except httptools.HttpParserError as e:
            cause = e.__context__ if isinstance(e.__context__, Reject) else None
            if cause is not None:
                self._fail_parse(cause.status, cause.message)
            else:
                self._fail_parse(400, f"malformed HTTP request ({_parser_reason(e)})")
            return None
        # llhttp only reports a header once its line ends: a head that keeps growing without one
        # must still be refused at the limit, not buffered whole.
        if self._in_message and not self._headers_done and self._head_bytes > self._head_limit():
            limit = self.host.limits["max_header_size"]
            self._fail_parse(431, f"the request header section is larger than this proxy's limit of {limit} bytes")
        return None

    def _head_limit(self) -> int:
        limits = self.host.limits
        return limits["max_header_size"] + limits["max_uri_length"] + 64  # 64: method, version, line ends

    def _extension_method(self, rest: bytes) -> bytes | None:
        """A request whose method llhttp does not know is re-fed with a stand-in method that frames
        the same way; on_headers_complete puts the real one back."""
        sp = rest.find(b" ")
        self.parser = httptools.HttpRequestParser(self)
        self._in_message = False
        if sp == -1:
            if len(rest) > 64 or b"\n" in rest:
                self._fail_parse(400, "malformed HTTP request (method token too long)")
            else:
                self._stash = rest  # the method token is not complete yet
            return None
        method = rest[:sp]
        if not _TOKEN_RE.fullmatch(method):
            self._fail_parse(400, "malformed HTTP request (invalid method)")
            return None
        self._method_override = method.decode("ascii")
        return b"GET" + rest[sp:]

    def _on_upgrade(self, rest: bytes) -> bytes | None:
        self._release_held()
        req = self.pending[-1] if self.pending else None
        if isinstance(req, Request) and req.method == "CONNECT":
            # Everything after a CONNECT head belongs to the tunnel, not to the HTTP parser.
            self.upgrade_rest = rest
            self.pause_reading("upgrade")
            return None
        # An Upgrade request (e.g. websocket) is forwarded without its Upgrade header, so the
        # connection stays HTTP: parse on with a fresh parser.
        self.parser = httptools.HttpRequestParser(self)
        self._in_message = False
        return rest or None

    def _fail_parse(self, status: int, message: str) -> None:
        self._parse_failed = True
        self._release_held()
        if self._cur_body is not None:
            self._cur_body.fail(Reject(status, message))
        self.pending.append(ParseFailure(status, message, self._msg_start or self.host.now()))
        self.pause_reading("failed")
        self._start_serving()

    def on_message_begin(self) -> None:
        self._in_message = True
        self._head_bytes = 0
        self._reset_message()
        self._msg_start = self.host.now()
        self._disarm_idle()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_len += len(url)
        limit = self.host.limits["max_uri_length"]
        if self._url_len > limit:
            raise Reject(414, f"the URI is longer than this proxy's limit of {limit} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hsize += len(name) + len(value) + 4
        if self._headers_done:
            # A trailer field of a chunked body: never merged into the header section (RFC 9110
            # 6.5.1). This proxy does not forward request trailers; it still bounds their size.
            if self._hsize > self.host.limits["max_header_size"]:
                raise Reject(431, "the request trailer section is larger than this proxy's limit")
            return
        limit = self.host.limits["max_header_size"]
        if self._hsize > limit:
            raise Reject(431, f"the request header section is larger than this proxy's limit of {limit} bytes")
        n = name.decode("latin-1")
        v = value.decode("latin-1")
        self._hdrs.append((n, v))
        ln = n.lower()
        if ln == "content-length" or ln == "transfer-encoding":
            self._body_expected = True
        elif ln == "expect":
            refusal = http1.expectation_refusal(v)
            if refusal is not None:
                raise Reject(*refusal)
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        p = self.parser
        method = self._method_override or p.get_method().decode("latin-1")
        self._method_override = None
        version = p.get_http_version()
        target = b"".join(self._url).decode("latin-1")
        headers = self._hdrs
        refusal = http1.request_framing_refusal(headers, version)
        if refusal is not None:
            raise Reject(*refusal)
        keep_alive = http1.wants_keep_alive(version, headers, p.should_keep_alive())
        body = None
        if self._body_expected and method != "CONNECT":
            limit = self.host.limits["max_body_size"]
            cl = http1.content_length(headers)
            if limit and cl is not None and cl > limit:
                raise Reject(413, f"the request body ({cl} bytes) is larger than this proxy's limit of {limit} bytes")
            if cl != 0:
                body = RequestBody(self, limit, self._expect_continue)
        self._cur_body = body
        req = Request(method, target, version, headers, keep_alive, body, self._msg_start)
        req.head_size = self._hsize + self._url_len
        if body is None and method != "CONNECT":
            self._held = req  # complete in a moment (on_message_complete): maybe answerable at once
            return
        self._queue(req)

    def on_body(self, body: bytes) -> None:
        if self._cur_body is not None:
            self._cur_body.feed(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self._completed += 1
        if self._body_expected:
            self._completed_with_body += 1
        if self._cur_body is not None:
            self._cur_body.finish()
            self._cur_body = None
        req, self._held = self._held, None
        if req is None:
            return
        # The hot path: with nothing earlier still being answered, a request the proxy can answer
        # from memory (a fresh hit) is answered right here, in the parser callback: no task, no
        # await, pipelined order unchanged.
        if self.state is ConnState.IDLE and not self.pending and not self.denied:
            self.served += 1
            self.response_started = False
            if self.host.answer_now(self, req):
                if self.closed:
                    self._parse_failed = True  # closing: whatever the client sent after is not read
                return
            self.served -= 1
        self._queue(req)

    def _release_held(self) -> None:
        if self._held is not None:
            req, self._held = self._held, None
            self._queue(req)

    def _queue(self, req: Request) -> None:
        self.pending.append(req)
        if len(self.pending) > MAX_PIPELINE:
            self.pause_reading("pipeline")
        self._start_serving()

    # ---- serving ------------------------------------------------------------------------------
    def _start_serving(self) -> None:
        if self._task is None or self._task.done():
            if not self.closed:
                self._task = self.loop.create_task(self._serve())
        else:
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _arm_idle(self) -> None:
        # One timer per connection, re-armed lazily: each request only stamps the time, and the
        # timer, when it fires early, sleeps again for the rest (no timer churn per request).
        self._idle_since = self.loop.time()
        if self._idle is None:
            timeout = self.host.limits["idle_timeout"]
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
        timeout = self.host.limits["idle_timeout"]
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
        """Answer queued requests in order. The task exists only while there is something to
        answer: a connection whose requests are all answered in the parser callback has none."""
        try:
            while not self.closed:
                if not self.pending:
                    if self.state is ConnState.DRAINING or self._eof:
                        self.close()
                    return
                item = self.pending.popleft()
                if len(self.pending) <= MAX_PIPELINE // 2:
                    self.resume_reading("pipeline")
                if isinstance(item, ParseFailure):
                    if not self.closed:
                        self.write(self._simple(item.status, item.message, keep_alive=False))
                    self.host.on_parse_failure(self, item)
                    break
                if self.state is ConnState.IDLE:
                    self._to(ConnState.BUSY)
                self.response_started = False
                self.served += 1
                keep = await self.host.handle(self, item)
                if not keep or self.closed:
                    break
                if item.body is not None and not (item.body.done and not item.body.chunks):
                    break  # the handler did not read the whole body: the framing is lost
                if self.upgrade_rest is not None:
                    break
                if self.state is ConnState.DRAINING:
                    break
                self._to(ConnState.IDLE)
                self._arm_idle()
        except ClientGone:
            pass
        except BaseException:
            self.abort()
            raise
        if not self.closed and self.transport is not None:
            self.close()

    def keep_open(self, req: Request, framing: Framing | None = None, forced_close: bool = False) -> bool:
        """Whether this connection stays open after answering `req` (http1.keep_open)."""
        body_unread = req.body is not None and not req.body.done
        last = self.state is ConnState.DRAINING or (self._eof and not self.pending)
        return http1.keep_open(req.keep_alive, last, self.served,
                               self.host.limits["max_requests_per_connection"], framing, body_unread, forced_close)

    def finish_now(self, keep: bool) -> None:
        """After an answer given in the parser callback: go on reading, or close."""
        if keep:
            self._arm_idle()
        else:
            self.close()

    # ---- writing ------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed:
            raise ClientGone("client closed the connection")
        self.transport.write(data)  # type: ignore[union-attr]

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    async def drain(self) -> None:
        if not self._write_paused:
            return
        if self.closed:
            raise ClientGone("client closed the connection")
        self._write_waiter = self.loop.create_future()
        timeout = self.host.limits["idle_timeout"] or None
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
    """Frames one response to the client (http1.response_framing) and counts bytes for the
    access log."""

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
        framing = http1.response_framing(req.method, status, req.version, length, has_body)
        self.no_body = framing is Framing.NO_BODY
        if self.no_body:
            if http1.length_field_for_bodiless(status, length):
                headers.append(("Content-Length", str(length)))
        elif framing is Framing.LENGTH:
            headers.append(("Content-Length", str(length)))
            self.remaining = length
        elif framing is Framing.CHUNKED:
            headers.append(("Transfer-Encoding", "chunked"))
            self.chunked = True
        head = serialize_head(status, reason or reason_phrase(status), headers)[:-2]
        self._finish_head(head, framing)

    def start_raw(self, head: bytes, length: int) -> None:
        """Like start() for a head already serialized with its Content-Length (all but the
        Connection field and the blank line): the cache's hot path."""
        self.no_body = self.req.method == "HEAD"
        self.remaining = length
        self._finish_head(head, Framing.NO_BODY if self.no_body else Framing.LENGTH)

    def _finish_head(self, head: bytes, framing: Framing) -> None:
        conn, req = self.conn, self.req
        self.keep_alive = keep = conn.keep_open(req, framing)
        self._head = head + http1.connection_field(req.version, keep)
        conn.response_started = True
        self.nbytes += len(self._head)

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

    def flush_head(self) -> None:
        """Send the held-back head now (before a body that goes out another way: sendfile)."""
        if self._head:
            data, self._head = self._head, b""
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
        keep = self.conn.keep_open(self.req, forced_close=close)
        data = self.conn._simple(status, message, keep, extra)
        if self.req.method == "HEAD":
            data = data[: data.index(b"\r\n\r\n") + 4]
        self.conn.response_started = True
        self.conn.write(data)
        self.nbytes += len(data)
        return keep


_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def on_message_complete(self) -> None:
        self.n += 1


def _boundary_after(data: bytes, k: int) -> int | None:
    """Offset in `data` (which starts at a message boundary) where message k+1 begins: the shortest
    prefix in which a scratch parser completes k messages. Only used on the extension-method path.
    Galloping, then bisecting, so the work grows with the boundary's offset, not with the read:
    a pipelined flood of extension methods costs about log(request size) scratch parses each."""
    def completed(prefix: bytes) -> int:
        c = _Counter()
        with contextlib.suppress(Exception):
            httptools.HttpRequestParser(c).feed_data(prefix)
        return c.n

    lo, hi = 1, min(256, len(data))
    while completed(data[:hi]) < k:
        if hi >= len(data) or hi >= BOUNDARY_SEARCH_MAX:
            return None  # bounded work: what follows is refused (400), never searched for long
        lo, hi = hi + 1, min(hi * 4, len(data))
    while lo < hi:
        mid = (lo + hi) // 2
        if completed(data[:mid]) >= k:
            hi = mid
        else:
            lo = mid + 1
    return lo


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def _heads_end(data: bytes, k: int) -> int | None:
    """Offset just past the k-th blank line in `data` (where a bodiless message k ends)."""
    pos = 0
    for _ in range(k):
        m = _BLANK_LINE.search(data, pos)
        if m is None:
            return None
        pos = m.end()
    return pos


def _parser_reason(e: Exception) -> str:
    text = str(e).strip()
    return text[:120] if text else type(e).__name__
