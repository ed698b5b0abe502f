"""gopher:// URLs through the proxy: the same checks, cache and relay path as ftp:// (FtpGate).

Gopher carries no freshness information: a 200 answer is fresh for `gopher.default_ttl` seconds.
The fetch itself is `webproxy.gopher.fetch`; this module only routes and sets freshness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.gopher import fetch
from webproxy.httpmsg import Headers, Target
from webproxy.origin import OriginResponse
from webproxy.proxy import Exchange

if TYPE_CHECKING:
    from webproxy.server import ProxyServer


class GopherGate:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    async def open(self, ex: Exchange | None, target: Target, method: str) -> OriginResponse:
        cfg = self.server.cfg.gopher
        resp = await fetch(target, method, timeout=cfg["timeout"], resolve=self.server.resolve)
        if ex is not None:
            ex.hierarchy = f"HIER_DIRECT/{target.host}"
        if resp.status == 200 and resp.header("cache-control") is None:
            resp.headers.append(("Cache-Control", f"max-age={int(cfg['default_ttl'])}"))
        return resp

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange,
                     target: Target) -> bool:
        proxy = self.server.proxy
        refused = proxy.check_target(req, rw, ex, target)
        if refused is not None:
            return refused

        async def opener(method: str, hdrs: Headers) -> OriginResponse:
            return await self.open(ex, target, method)

        cache = self.server.cache_layer
        if cache is not None:
            handled = await cache.handle(conn, req, rw, ex, target, [], opener)
            if handled is not None:
                return handled
        ex.code = "TCP_MISS"
        return await proxy.relay_response(req, rw, ex, await opener(req.method, []))
