"""The transparent listener: connections redirected by iptables (REDIRECT or TPROXY) arrive here.

For each one: find the original destination, refuse it if that is one of our own listeners (a
redirect loop), then sniff the first bytes (bounded in size and time). Whatever could be the start
of an HTTP/1.x request goes to the caller's `on_http` (the HTTP front end, so access rules, limits,
the log and the cache apply, and a request that is not one after all gets its 400/431 there);
anything else, including a server-speaks-first protocol that sends nothing within the sniff
timeout, is relayed raw to the original destination, once the caller's `admit` lets it: a raw relay
passes the same client check and counts against the same connection limits as HTTP.

A TLS ClientHello is read whole when the caller intercepts TLS (`on_tls`): if `wants_tls(sni, dst)`
says so, the connection (admitted like a raw relay) goes to `on_tls` instead of being relayed.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tunnel.clienthello import parse_client_hello
from tunnel.connect import DialError, DialRefused, Resolver, open_upstream
from tunnel.forwarder import fmt_addr, log_line
from tunnel.listeners import ListenerSet
from tunnel.netaddr import is_local_address as _is_local_address
from tunnel.netaddr import norm_ip as _norm
from tunnel.origdst import original_dst
from tunnel.relay import relay, reset_on_close

logger = logging.getLogger("tunnel")

# on_http(sock, initial_bytes, orig_dst, client_addr); may be a coroutine function. It owns `sock`.
OnHttp = Callable[[socket.socket, bytes, tuple[str, int], Any], Any]
# admit(client_ip) -> None to let a raw relay through (a connection slot is taken), else the reason
# it is refused (for the log line); release(client_ip) gives the slot back when the relay ends.
Admit = Callable[[str], str | None]
Release = Callable[[str], None]
# wants_tls(sni, orig_dst): whether a TLS connection is intercepted; on_tls(sock, initial, orig_dst,
# client_addr, sni) then owns `sock` (a coroutine function).
WantsTls = Callable[[str | None, tuple[str, int]], bool]
OnTls = Callable[[socket.socket, bytes, tuple[str, int], Any, str | None], Awaitable[None]]

_METHOD_MAX = 24
_SCHEME_MAX = 32
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def _scheme_byte(c: int) -> bool:  # RFC 3986 3.1: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    return 0x61 <= c | 0x20 <= 0x7A or 0x30 <= c <= 0x39 or c in b"+-."


def looks_like_http(data: bytes) -> bool | None:
    """Could `data` be the start of an HTTP/1.x request (RFC 9112 2.2, 3)?

    True: a method and the start of a request target are there ("GET /", "OPTIONS *",
    "GET http://", "CONNECT h"): it is read as HTTP, however long or slow the rest of the head is.
    False: it cannot be one (TLS, SSH, HTTP/2's preface, binary...). None: too short to tell yet.
    Leading empty lines are skipped, as RFC 9112 2.2 asks of a server.
    """
    n = len(data)
    i = 0
    while i < n and data[i] in b"\r\n":
        i += 1
    start = i
    while i < n and 0x41 <= data[i] <= 0x5A:  # method: upper-case letters
        i += 1
        if i - start > _METHOD_MAX:
            return False
    if i == n:
        return None
    if i == start or data[i] != 0x20:
        return False
    method = data[start:i]
    if method == b"PRI":  # the HTTP/2 connection preface (RFC 9113 3.4): not for an HTTP/1 front end
        return False
    j = i + 1
    if j == n:
        return None
    if data[j] in b"/*":  # origin-form, asterisk-form
        return True
    if method == b"CONNECT":  # authority-form
        return 0x21 <= data[j] <= 0x7E
    if not 0x61 <= data[j] | 0x20 <= 0x7A:  # absolute-form starts with a scheme
        return False
    k = j
    while k < n and _scheme_byte(data[k]):
        k += 1
        if k - j > _SCHEME_MAX:
            return False
    rest = data[k:k + 3]
    if rest == b"://":
        return True
    return None if b"://".startswith(rest) else False


def read_as_http(data: bytes) -> bool:
    """The verdict when sniffing stops (decided, `sniff_bytes` in, or `sniff_timeout` passed):
    only a client that sent nothing, or bytes that cannot be HTTP, is relayed raw. A start that is
    still undecided (a slow or blank-line-led request) goes to the HTTP front end, which applies
    its limits and timeouts: being slow must never be a way around the HTTP rules."""
    return bool(data) and looks_like_http(data) is not False


def is_own_listener(dst: tuple[str, int], own: Sequence[tuple[str, int]]) -> bool:
    """Would relaying to `dst` reach one of our own listeners (`own`, wildcards allowed)?"""
    ip, port = _norm(dst[0]), dst[1]
    for host, p in own:
        if p != port:
            continue
        if host in _WILDCARDS:
            if ipaddress.ip_address(ip).is_loopback or _is_local_address(ip):
                return True
        elif _norm(host) == ip:
            return True
    return False


def _reset(sock: socket.socket) -> None:
    """Close with RST, which is what the client would have seen from a refusing destination."""
    reset_on_close(sock)
    sock.close()


class TransparentListener:
    def __init__(self, listen: Sequence[tuple[str, int]], *, on_http: OnHttp, mode: str = "redirect",
                 sniff_bytes: int = 4096, sniff_timeout: float = 2.0, connect_timeout: float = 10.0,
                 idle_timeout: float | None = None, spoof_client_address: bool = False,
                 own_listeners: Sequence[tuple[str, int]] = (), resolve: Resolver | None = None,
                 log: Callable[[str], None] | None = None, engine: str | None = None,
                 admit: Admit | None = None, release: Release | None = None,
                 half_close_timeout: float | None = None, wants_tls: WantsTls | None = None,
                 on_tls: OnTls | None = None) -> None:
        if mode not in ("redirect", "tproxy"):
            raise ValueError("transparent mode must be 'redirect' or 'tproxy'")
        self.listen = list(listen)
        self.on_http = on_http
        self.mode = mode
        self.sniff_bytes = max(1, sniff_bytes)
        self.sniff_timeout = sniff_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout or None
        self.spoof = spoof_client_address and mode == "tproxy"
        self.own = list(own_listeners)
        self.resolve = resolve
        self.log = log or (lambda line: logger.info("%s", line))
        self.engine = engine
        self.admit = admit
        self.release = release
        self.half_close_timeout = half_close_timeout
        self.wants_tls = wants_tls
        self.on_tls = on_tls
        self.listeners = ListenerSet(self._on_accept)

    def start(self) -> None:
        """Bind every listen address (raises OSError; IP_TRANSPARENT needs CAP_NET_ADMIN)."""
        self.listeners.listen(self.listen, tproxy=self.mode == "tproxy")
        self.own.extend(self.listeners.addresses)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.listeners.addresses

    async def close(self) -> None:
        await self.listeners.close()

    def _on_accept(self, sock: socket.socket, addr: Any) -> None:
        # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; callers want plain a.b.c.d.
        self.listeners.spawn(self._handle(sock, (_norm(addr[0]), addr[1])))

    async def _sniff(self, sock: socket.socket) -> tuple[bytes, bool]:
        """Read until the bytes say HTTP or not, `sniff_bytes` are in, or `sniff_timeout` passes.
        Returns (bytes, whether the client already closed its side)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sniff_timeout
        data = b""
        while len(data) < self.sniff_bytes:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    chunk = await loop.sock_recv(sock, self.sniff_bytes - len(data))
            except TimeoutError:
                break
            if not chunk:
                return data, True
            data += chunk
            if looks_like_http(data) is not None:
                hello = parse_client_hello(data) if self.on_tls is not None else None
                if hello is None or not hello.tls or hello.complete:
                    break  # (a ClientHello is read whole when TLS may be intercepted)
        return data, False

    async def _handle(self, sock: socket.socket, addr: Any) -> None:
        dst: tuple[str, int] = ("-", 0)
        try:
            dst = original_dst(sock, self.mode)
            if is_own_listener(dst, self.own):
                sock.close()
                self.log(log_line(addr, fmt_addr(dst), None, "refused-loop", kind="transparent"))
                return
            try:
                initial, closed = await self._sniff(sock)
            except OSError as e:
                self.log(log_line(addr, fmt_addr(dst), None, f"client-error ({e.strerror or e})",
                                  kind="transparent"))
                return
            if closed and not initial:
                self.log(log_line(addr, fmt_addr(dst), None, "client-closed", kind="transparent"))
                return
            if read_as_http(initial):
                handed, sock = sock, None
                result = self.on_http(handed, initial, dst, addr)
                if inspect.isawaitable(result):
                    await result
                return
            refused = self.admit(addr[0]) if self.admit is not None else None
            if refused is not None:
                _reset(sock)
                sock = None
                self.log(log_line(addr, fmt_addr(dst), None, refused, kind="transparent"))
                return
            handed, sock = sock, None
            try:
                hello = parse_client_hello(initial)
                if (self.on_tls is not None and self.wants_tls is not None and hello.complete
                        and self.wants_tls(hello.sni, dst)):
                    await self.on_tls(handed, initial, dst, addr, hello.sni)
                    return
                await self._relay(handed, addr, dst, initial)
            finally:
                if self.release is not None:
                    self.release(addr[0])
        except asyncio.CancelledError:
            self.log(log_line(addr, fmt_addr(dst), None, "cancelled", kind="transparent"))
        except Exception as e:
            logger.exception("transparent connection from %s failed", fmt_addr(addr))
            self.log(log_line(addr, fmt_addr(dst), None, f"error ({type(e).__name__})", kind="transparent"))
        finally:
            if sock is not None:
                sock.close()

    async def _relay(self, sock: socket.socket, addr: Any, dst: tuple[str, int], initial: bytes) -> None:
        """Connect to the original destination (from the client's own address when spoofing) and
        relay; `sock` is always closed."""
        try:
            local = (_norm(addr[0]), 0) if self.spoof else None
            try:
                upstream = await open_upstream(dst[0], dst[1], timeout=self.connect_timeout,
                                               local_addr=local, transparent=self.spoof,
                                               resolve=self.resolve)
            except DialError as e:
                if isinstance(e, DialRefused):
                    _reset(sock)
                else:
                    sock.close()
                self.log(log_line(addr, fmt_addr(dst), None, f"upstream-failed ({e})", kind="transparent"))
                return
        except BaseException:
            sock.close()
            raise
        result = await relay(sock, upstream, client_initial=initial, idle_timeout=self.idle_timeout,
                             half_close_timeout=self.half_close_timeout, engine=self.engine)
        self.log(log_line(addr, fmt_addr(dst), result, kind="transparent"))


async def serve_transparent(settings: dict[str, Any], on_http: OnHttp, *,
                            own_listeners: Sequence[tuple[str, int]] = (), connect_timeout: float = 10.0,
                            idle_timeout: float | None = None, resolve: Resolver | None = None,
                            log: Callable[[str], None] | None = None,
                            started: Callable[[TransparentListener], None] | None = None) -> None:
    """Run the `[transparent]` config section (listen, mode, spoof_client_address, sniff_bytes,
    sniff_timeout) until cancelled. `own_listeners` are the proxy's other listen addresses."""
    listener = TransparentListener(
        settings["listen"], on_http=on_http, mode=settings.get("mode", "redirect"),
        sniff_bytes=settings.get("sniff_bytes", 4096), sniff_timeout=settings.get("sniff_timeout", 2.0),
        spoof_client_address=settings.get("spoof_client_address", False), own_listeners=own_listeners,
        half_close_timeout=settings.get("half_close_timeout") or None,
        connect_timeout=connect_timeout, idle_timeout=idle_timeout, resolve=resolve, log=log)
    listener.start()
    try:
        if started is not None:
            started(listener)
        await asyncio.Event().wait()
    finally:
        await listener.close()
