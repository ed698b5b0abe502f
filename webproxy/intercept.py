"""The inside of an intercepted tunnel: read the client's ClientHello without consuming it (which
name does it ask for? is it TLS at all?), get the leaf certificate for that name (memory, else disk,
else minted, in a thread), complete the TLS handshake as the server, and serve the HTTP/1.1
requests inside with the same front end (`ClientConnection`) as plain http:// ones; their targets
become https:// URLs there (routing.Router, tlspolicy.inner_url).

Which hosts are intercepted, which name the certificate carries and how failures are read are the
pure rules of `webproxy.tlspolicy`; this module is the I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

from tunnel.clienthello import RECORD_MAX, Hello, parse_client_hello
from tunnel.relay import relay
from tunnel.transparent import looks_like_http
from webproxy.certs import Authority
from webproxy.context import Env
from webproxy.frontend import ClientConnection, ConnectionHost, Inherited
from webproxy.httpmsg import error_body
from webproxy.tlspolicy import cert_name, handshake_rejected, intercepted
from webproxy.tlstransport import TlsTransport, accept_tls

HELLO_TIMEOUT = 10.0  # seconds a client has to send its ClientHello after "200 Connection established"
HANDSHAKE_TIMEOUT = 10.0
PEEK_RETRY = 0.002  # a ClientHello split over segments: look again shortly (peeking leaves it readable)
REJECTED_MAX = 4096  # hosts remembered as refusing our certificate (logged once each)
NOT_TLS_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n%b")


class Interceptor:
    def __init__(self, env: Env, host: ConnectionHost, authority: Authority | None) -> None:
        self.env = env
        self.host = host
        self.authority = authority
        self.rejected: set[str] = set()

    def wants(self, host: str) -> bool:
        """Whether a CONNECT to `host` is intercepted (tls.intercept, read live: SIGHUP applies)."""
        return self.authority is not None and intercepted(host, self.env.cfg.tls["intercept"])

    def _log(self, message: str) -> None:
        self.env.log_error(message, "info")

    async def serve(self, sock: socket.socket, initial: bytes, inherited: Inherited) -> None:
        """Serve the tunnel on `sock` (bytes already read from it: `initial`) until it ends.
        Always closes `sock`; never raises for anything the client does."""
        bridge: asyncio.Task[object] | None = None
        if initial:
            # Bytes the CONNECT parser already read cannot be pushed back into the socket: the
            # TLS side reads from one end of a socket pair that is fed them first, then the rest.
            outer, inner_end = socket.socketpair()
            outer.setblocking(False)
            inner_end.setblocking(False)
            bridge = asyncio.ensure_future(relay(sock, outer, client_initial=initial))
            sock = inner_end
        try:
            await self._serve(sock, inherited)
        except Exception as e:  # the process must outlive anything a client does
            self.env.log_error(f"intercepted tunnel to {inherited.host}:{inherited.port}: {e!r}")
            sock.close()
        finally:
            if bridge is not None:
                bridge.cancel()
                await asyncio.gather(bridge, return_exceptions=True)

    async def _serve(self, sock: socket.socket, inh: Inherited) -> None:
        who = f"client {inh.client_ip}: CONNECT {inh.host}:{inh.port} (intercepted, tls.intercept)"
        hello = await _peek_hello(sock, HELLO_TIMEOUT)
        if hello is None:
            self._log(f"{who}: no TLS handshake within {HELLO_TIMEOUT:g} s, or the client closed; closed")
            sock.close()
            return
        if not hello.tls:
            self._not_tls(sock, who)
            return
        name = cert_name(hello.sni, inh.host)
        assert self.authority is not None
        loop = asyncio.get_running_loop()
        ctx = self.authority.cached(name, time.time())
        if ctx is None:
            try:  # file I/O and signing: off the event loop
                ctx = await loop.run_in_executor(None, self.authority.context_for, name)
            except (OSError, ssl.SSLError) as e:
                self.env.log_error(f"{who}: cannot mint a certificate for {name}: {e}; closed")
                sock.close()
                return
        inh.ended = loop.create_future()
        inner = ClientConnection(self.host, inherited=inh)
        try:
            tls = await accept_tls(sock, ctx, HANDSHAKE_TIMEOUT)
        except (OSError, EOFError, TimeoutError) as e:
            sock.close()
            if handshake_rejected(e):
                if name not in self.rejected:
                    if len(self.rejected) >= REJECTED_MAX:
                        self.rejected.clear()
                    self.rejected.add(name)
                    self.env.log_error(
                        f"{who}: the client refused the certificate minted for {name} "
                        f"({_why(e)}); if it does not trust the webproxy CA (webproxy ca show), or pins its "
                        f"certificates, remove {name} from tls.intercept", "warning")
            else:
                self._log(f"{who}: TLS handshake failed: {_why(e)}")
            return
        TlsTransport(loop, tls, inner).start()
        await inh.ended

    def _not_tls(self, sock: socket.socket, who: str) -> None:
        """A client that speaks plain HTTP (or anything else) where TLS was expected: an HTTP
        client gets a 400 it can read, anything else the connection closed; both logged."""
        # Consume what was sent (bounded): closing with unread bytes would reset the connection
        # (RST) instead of ending it cleanly, and could destroy our answer before it is read.
        first = b""
        with contextlib.suppress(OSError):
            while len(first) < 65536 and (chunk := sock.recv(65536)):
                first += chunk
        if looks_like_http(first):
            self._log(f"{who}: the client sent plain HTTP instead of a TLS handshake; answered 400, closed")
            body = error_body(400, "this tunnel is intercepted by the proxy: speak TLS (https://) inside it")
            with contextlib.suppress(OSError):
                sock.send(NOT_TLS_ANSWER % (len(body), body))
                sock.shutdown(socket.SHUT_WR)
        else:
            self._log(f"{who}: the client sent bytes that are not TLS ({first[:8].hex()}...); closed")
        sock.close()


async def _peek_hello(sock: socket.socket, timeout: float) -> Hello | None:
    """The ClientHello verdict from bytes peeked (not consumed) from `sock`; None when the client
    closed or sent nothing decisive in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    fd = sock.fileno()
    while True:
        try:
            data = sock.recv(RECORD_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            return None
        if data is not None:
            if not data:
                return None
            hello = parse_client_hello(data)
            if not hello.tls or hello.complete:
                return hello
            if len(data) >= RECORD_MAX:
                return Hello(True, True, None)
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        if data:  # part of the hello is in: it stays readable, so wait a little, not for readiness
            await asyncio.sleep(PEEK_RETRY)
            continue
        ready = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        try:
            await asyncio.wait_for(ready, remaining)
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(fd)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return f"TLS alert {e.reason}"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "it closed the connection during the handshake"
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
