"""Transparent mode: connections that iptables redirected to us are sniffed by tunnel.transparent;
those that speak HTTP come here and are served like explicit-proxy requests.

Every request on an intercepted connection is fetched from the connection's original
destination, never from wherever its Host header or an absolute-form URL points: a client cannot
make us connect elsewhere (our own services on the gateway included). The name it gives (the URL's
authority, else Host) only names the response: it is cached under that URL only when the name
resolves to the original destination address, so a forged name cannot poison the cache (the hole
CVE-2009-0801 described for Squid).
"""

from __future__ import annotations

from tunnel.connect import Resolver
from webproxy.exchange import Answers, Exchange
from webproxy.forward import HttpForwarder
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.httpmsg import BadTarget, Target, get_header, parse_absolute


class TransparentHttp:
    def __init__(self, answers: Answers, forwarder: HttpForwarder, resolve: Resolver) -> None:
        self.answers = answers
        self.forwarder = forwarder
        self.resolve = resolve

    async def _host_points_at(self, host: str, port: int, ip: str) -> bool:
        try:
            found = await self.resolve(host, port)
        except Exception:
            return False
        return any((entry.get("host") if isinstance(entry, dict) else entry) == ip for entry in found)

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        assert conn.transparent_dst is not None
        ip, port = conn.transparent_dst
        dst = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        try:
            named = self._named(req, dst, port)
        except BadTarget as e:
            return self.answers.error(rw, ex, 400, str(e))
        target = Target(named.scheme, named.host, named.port, named.authority, named.path, connect=dst)
        ex.url = named.origin_url
        cacheable = named.port == port and (named.host == ip or await self._host_points_at(named.host, port, ip))
        return await self.forwarder.handle(conn, req, rw, ex, target, cacheable=cacheable)

    @staticmethod
    def _named(req: Request, dst: str, port: int) -> Target:
        """What the client says it asked for (absolute-form URL, else Host), for naming only."""
        if not (req.target.startswith("/") or req.target == "*"):
            named = parse_absolute(req.target)
            if named.scheme != "http":
                raise BadTarget(f"an intercepted connection carries http:// requests, not {named.scheme}://")
            return named
        host = get_header(req.headers, "host")
        named = parse_absolute(f"http://{host or dst}{req.target}")
        if named.port != port and host and ":" not in host.rsplit("]", 1)[-1]:
            # Host without a port on a redirected non-80 connection: the port is the one dialled.
            named = parse_absolute(f"http://{host}:{port}{req.target}")
        return named
