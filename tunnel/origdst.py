"""Where a redirected connection was really going (Linux netfilter), and transparent sockets.

REDIRECT (nat table) rewrites the destination, so the original one is asked from conntrack with
SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6). TPROXY (mangle table) leaves the packet
alone and delivers it to a listener marked IP_TRANSPARENT, so the original destination is simply
the accepted socket's local address.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75  # linux/in6.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Decode a struct sockaddr_in / sockaddr_in6 (port in network order) into (ip, port)."""
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"unknown address family {family}")


def redirect_original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination before REDIRECT/DNAT. Raises OSError (ENOENT) if conntrack has no entry."""
    if sock.family == socket.AF_INET6:
        local = sock.getsockname()[0]
        if not ipaddress.ip_address(local.split("%")[0]).ipv4_mapped:
            return parse_sockaddr(sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28))
    return parse_sockaddr(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))


def _plain(host: str) -> str:
    if host.startswith("::ffff:") and "." in host:
        return host[7:]  # IPv4 client on a dual-stack socket
    return host


def tproxy_original_dst(sock: socket.socket) -> tuple[str, int]:
    """With TPROXY the accepted socket is bound to the address the client asked for."""
    host, port = sock.getsockname()[:2]
    return _plain(host), port


def original_dst(sock: socket.socket, mode: str) -> tuple[str, int]:
    """mode "redirect" or "tproxy". A connection made straight to the listener (no NAT entry)
    answers with the listener's own address, which the caller then refuses as a loop."""
    if mode == "tproxy":
        return tproxy_original_dst(sock)
    try:
        return redirect_original_dst(sock)
    except OSError:
        host, port = sock.getsockname()[:2]
        return _plain(host), port


def set_transparent(sock: socket.socket) -> None:
    """Allow binding/accepting non-local addresses (needs CAP_NET_ADMIN)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        try:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)  # for v4-mapped traffic on a dual socket
        except OSError:
            pass
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def transparent_listener(host: str, port: int, *, tproxy: bool, backlog: int = 1024,
                         reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket; with `tproxy` it is IP_TRANSPARENT so TPROXY can deliver
    connections addressed to any destination to it. `reuse_port`: several worker processes bind
    the same address and the kernel spreads the connections (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if tproxy:
            set_transparent(sock)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
