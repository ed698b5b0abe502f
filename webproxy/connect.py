"""CONNECT host:port: access checks, open the upstream, answer 200, then hand both raw sockets to
tunnel.relay. The access-log line is written when the tunnel ends (as Squid does), with the bytes
sent to the client and the tunnel's duration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunnel.connect import UpstreamDNSError, UpstreamError, UpstreamTimeout, open_upstream
from tunnel.relay import relay
from webproxy.acl import domain_denied
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.httpmsg import BadTarget, has_via_loop, parse_authority
from webproxy.metrics import TALLY
from webproxy.proxy import Exchange

if TYPE_CHECKING:
    from webproxy.server import ProxyServer

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


async def handle_connect(server: ProxyServer, conn: ClientConnection, req: Request, rw: ResponseWriter,
                         ex: Exchange) -> bool:
    proxy = server.proxy
    cfg = server.cfg
    try:
        host, port = parse_authority(req.target, 0)
        if port == 0:
            raise BadTarget(f"CONNECT needs host:port, got {req.target[:200]!r}")
    except BadTarget as e:
        return proxy._error(rw, ex, 400, str(e), close=True)
    if port not in cfg.access["connect_ports"]:
        ex.code = "TCP_DENIED"
        allowed = ", ".join(str(p) for p in cfg.access["connect_ports"]) or "none"
        return proxy._error(rw, ex, 403, f"access denied: CONNECT to port {port} is not allowed "
                            f"(allowed ports: {allowed}; see access.connect_ports)", close=True)
    why = domain_denied(host, cfg.access)
    if why:
        ex.code = "TCP_DENIED"
        return proxy._error(rw, ex, 403, f"access denied: {why}", close=True)
    if has_via_loop(req.headers, cfg.server["name"]) or server.is_self(host, port):
        ex.code = "TCP_DENIED"
        return proxy._error(rw, ex, 508, f"forwarding loop detected: CONNECT to {host}:{port} is this proxy", close=True)
    ex.code = "TCP_TUNNEL"
    try:
        upstream = await open_upstream(host, port, timeout=cfg.upstream["connect_timeout"], resolve=server.resolve)
    except UpstreamDNSError as e:
        return proxy._error(rw, ex, 502, f"cannot resolve {host}: {e}", close=True)
    except UpstreamTimeout as e:
        return proxy._error(rw, ex, 504, f"timed out connecting to {e}", close=True)
    except UpstreamError as e:
        return proxy._error(rw, ex, 502, f"cannot connect to {e}", close=True)
    peer = upstream.getpeername()
    ex.hierarchy = f"HIER_DIRECT/{peer[0]}"
    ex.status = 200
    try:
        conn.write(ESTABLISHED)
        client = await conn.detach()
    except Exception:
        upstream.close()
        raise
    rw.nbytes = len(ESTABLISHED)
    TALLY.tunnels += 1
    try:
        result = await relay(client, upstream, client_initial=conn.upgrade_rest or b"",
                             idle_timeout=cfg.server["idle_timeout"] or None)
        rw.nbytes += result.upstream_to_client
    finally:
        TALLY.tunnels -= 1
        server.release(conn)
    return False
