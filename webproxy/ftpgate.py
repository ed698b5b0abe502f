"""ftp:// URLs through the proxy: the HTTP client talks to us, we talk FTP to the server, and the
answer takes the same relay (and cache) path as an HTTP origin's.

FTP carries no freshness information, so 200 answers get one here: a fraction of the file's age
from MDTM (the same heuristic HTTP caches apply to Last-Modified), else `ftp.default_ttl`.
Revalidation is a conditional GET: the FTP fetcher answers If-Modified-Since from MDTM with 304.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.ftp import fetch
from webproxy.ftppool import FtpPool
from webproxy.httpmsg import Headers, Target, get_header
from webproxy.origin import FtpOriginResponse, OriginResponse
from webproxy.proxy import Exchange

if TYPE_CHECKING:
    from webproxy.server import ProxyServer


class FtpGate:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.pool = FtpPool(server.cfg.ftp, resolve=server.resolver.address)

    def freshness(self, resp: OriginResponse, now: float) -> int:
        cfg = self.server.cfg
        mdtm = getattr(resp.resp, "mdtm", None)
        if mdtm is not None and now > mdtm:
            return int(min((now - mdtm) * cfg.ftp["heuristic_fraction"], cfg.cache["heuristic_max"]))
        return int(cfg.ftp["default_ttl"])

    async def open(self, url: str, ex: Exchange | None, target: Target, method: str, headers: Headers) -> OriginResponse:
        resp = FtpOriginResponse(await fetch(url, method, headers, self.pool), method)
        if ex is not None:
            ex.hierarchy = f"HIER_DIRECT/{target.host}"
        if resp.status == 200 and resp.header("cache-control") is None:
            resp.headers.append(("Cache-Control", f"max-age={self.freshness(resp, time.time())}"))
        return resp

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange, target: Target) -> bool:
        proxy = self.server.proxy
        refused = proxy.check_target(req, rw, ex, target)
        if refused is not None:
            return refused
        headers = [(k, v) for k, v in req.headers if k.lower() not in ("host", "proxy-authorization")]

        async def opener(method: str, hdrs: Headers) -> OriginResponse:
            return await self.open(req.target, ex, target, method, hdrs)

        cache = self.server.cache_layer
        # Only anonymous fetches are shared: a user's files stay that user's.
        if cache is not None and not target.userinfo and get_header(req.headers, "authorization") is None:
            handled = await cache.handle(conn, req, rw, ex, target, headers, opener)
            if handled is not None:
                return handled
        ex.code = "TCP_MISS"
        return await proxy.relay_response(req, rw, ex, await opener(req.method, headers))

    def status_rows(self) -> list[tuple[str, Any]]:
        return []

    async def close(self) -> None:
        await self.pool.close()
