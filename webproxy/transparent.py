"""Transparent mode glue: connections that iptables redirected to us are sniffed by
tunnel.transparent; those that speak HTTP come here and are served like explicit-proxy requests.

An origin-form request is fetched from the connection's original destination, never from
wherever its Host header points: a client cannot make us connect elsewhere. Its response is
cached under the Host's URL only when that name resolves to the original destination address,
so a forged Host cannot poison the cache (the hole CVE-2009-0801 described for Squid).
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.httpmsg import BadTarget, Target, parse_absolute
from webproxy.proxy import Exchange

if TYPE_CHECKING:
    from webproxy.server import ProxyServer


def on_http_factory(server: ProxyServer) -> Any:
    """The callback tunnel.transparent calls with a socket whose first bytes look like HTTP."""

    async def on_http(sock: socket.socket, initial: bytes, orig_dst: tuple[str, int], client_addr: Any) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(
            lambda: ClientConnection(server, initial=initial, transparent_dst=orig_dst), sock)

    return on_http


async def _host_points_at(server: ProxyServer, host: str, port: int, ip: str) -> bool:
    try:
        found = await server.resolve(host, port)
    except Exception:
        return False
    return any(entry.get("host") == ip for entry in found)


async def handle_transparent_http(server: ProxyServer, conn: ClientConnection, req: Request, rw: ResponseWriter,
                                  ex: Exchange, host: str | None) -> bool:
    assert conn.transparent_dst is not None
    ip, port = conn.transparent_dst
    dst = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    try:
        named = parse_absolute(f"http://{host or dst}{req.target}")
    except BadTarget as e:
        return server.proxy._error(rw, ex, 400, str(e))
    if named.port != port and host and ":" not in host.rsplit("]", 1)[-1]:
        # Host without a port on a redirected non-80 connection: the port is the one dialled.
        named = parse_absolute(f"http://{host}:{port}{req.target}")
    target = Target(named.scheme, named.host, named.port, named.authority, named.path, connect=dst)
    ex.url = named.origin_url
    cacheable = named.port == port and (named.host == ip or await _host_points_at(server, named.host, port, ip))
    return await server.proxy.http(conn, req, rw, ex, target, cacheable=cacheable)
