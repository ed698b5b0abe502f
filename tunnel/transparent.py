"""The transparent listener: connections redirected by iptables (REDIRECT or TPROXY) arrive here.

For each one: find the original destination, refuse it if that is one of our own listeners (a
redirect loop), then sniff the first bytes (bounded in size and time). An HTTP/1.x request line goes
to the caller's `on_http` (the HTTP front end, so caching applies); anything else, including a
server-speaks-first protocol that sends nothing within the sniff timeout, is relayed raw to the
original destination.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from tunnel.connect import Resolver, UpstreamError, UpstreamRefused, open_upstream
from tunnel.forwarder import fmt_addr, log_line
from tunnel.listeners import ListenerSet
from tunnel.netaddr import is_local_address as _is_local_address
from tunnel.netaddr import norm_ip as _norm
from tunnel.origdst import original_dst
from tunnel.relay import relay

logger = logging.getLogger("tunnel")

# on_http(sock, initial_bytes, orig_dst, client_addr); may be a coroutine function. It owns `sock`.
OnHttp = Callable[[socket.socket, bytes, tuple[str, int], Any], Any]

_METHOD_MAX = 24
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def looks_like_http(data: bytes) -> bool | None:
    """Is `data` the start of an HTTP/1.x request line ("METHOD SP target SP HTTP/1.x CRLF")?

    True: yes. False: it cannot be one (TLS, SSH, binary...). None: too short to tell yet.
    """
    n = len(data)
    i = 0
    while i < n and 0x41 <= data[i] <= 0x5A:  # method: upper-case letters
        i += 1
        if i > _METHOD_MAX:
            return False
    if i == n:
        return None
    if i == 0 or data[i] != 0x20:
        return False
    j = i + 1
    while j < n and 0x21 <= data[j] <= 0x7E:  # request target: visible ASCII
        j += 1
    if j == n:
        return None
    if j == i + 1 or data[j] != 0x20:
        return False
    rest = data[j + 1:j + 11]
    for want in (b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", b"HTTP/1.1\n", b"HTTP/1.0\n"):
        if rest[:len(want)] == want:
            return True
        if want.startswith(rest):
            return None
    return False


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
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class TransparentListener:
    def __init__(self, listen: Sequence[tuple[str, int]], *, on_http: OnHttp, mode: str = "redirect",
                 sniff_bytes: int = 4096, sniff_timeout: float = 2.0, connect_timeout: float = 10.0,
                 idle_timeout: float | None = None, spoof_client_address: bool = False,
                 own_listeners: Sequence[tuple[str, int]] = (), resolve: Resolver | None = None,
                 log: Callable[[str], None] | None = None, engine: str | None = None) -> None:
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
                break
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
            if looks_like_http(initial):
                handed, sock = sock, None
                result = self.on_http(handed, initial, dst, addr)
                if inspect.isawaitable(result):
                    await result
                return
            local = (_norm(addr[0]), 0) if self.spoof else None
            try:
                upstream = await open_upstream(dst[0], dst[1], timeout=self.connect_timeout,
                                               local_addr=local, transparent=self.spoof,
                                               resolve=self.resolve)
            except UpstreamError as e:
                if isinstance(e, UpstreamRefused):
                    _reset(sock)
                else:
                    sock.close()
                sock = None
                self.log(log_line(addr, fmt_addr(dst), None, f"upstream-failed ({e})", kind="transparent"))
                return
            handed, sock = sock, None
            result = await relay(handed, upstream, client_initial=initial, idle_timeout=self.idle_timeout,
                                 engine=self.engine)
            self.log(log_line(addr, fmt_addr(dst), result, kind="transparent"))
        except asyncio.CancelledError:
            self.log(log_line(addr, fmt_addr(dst), None, "cancelled", kind="transparent"))
        except Exception as e:
            logger.exception("transparent connection from %s failed", fmt_addr(addr))
            self.log(log_line(addr, fmt_addr(dst), None, f"error ({type(e).__name__})", kind="transparent"))
        finally:
            if sock is not None:
                sock.close()


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
        connect_timeout=connect_timeout, idle_timeout=idle_timeout, resolve=resolve, log=log)
    listener.start()
    try:
        if started is not None:
            started(listener)
        await asyncio.Event().wait()
    finally:
        await listener.close()
