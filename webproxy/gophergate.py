"""gopher:// URLs through the proxy: the same checks, cache and relay path as ftp:// (FtpGate).

Gopher carries no freshness information: a 200 answer is fresh for `gopher.default_ttl` seconds.
The fetch itself is `webproxy.gopher.fetch`; this module only routes and sets freshness.
"""

from __future__ import annotations

from tunnel.connect import Resolver
from webproxy import logcodes
from webproxy.context import Env
from webproxy.exchange import Answers, Exchange
from webproxy.forward import CacheHandler, fetch_refusal, through_cache
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.gopher import fetch
from webproxy.httpmsg import Headers, Target
from webproxy.origin import Opener, OriginResponse
from webproxy.parentpath import ParentPath


class GopherGate:
    def __init__(self, env: Env, answers: Answers, resolve: Resolver, parents: ParentPath) -> None:
        self.env = env
        self.answers = answers
        self.parents = parents
        self.resolve = resolve
        self.cache: CacheHandler | None = None  # set when the cache is on

    async def open(self, ex: Exchange | None, target: Target, method: str, headers: Headers) -> OriginResponse:
        # `headers` (validators) only matter through a parent: a gopher server takes a selector.
        resp, hierarchy = await self.parents.gateway(target, method, headers, self.answers.via("1.1"),
                                                     lambda: self.direct(target, method))
        if ex is not None:
            ex.hierarchy = hierarchy or logcodes.hier_direct(target.host)
        return resp

    async def direct(self, target: Target, method: str) -> OriginResponse:
        cfg = self.env.cfg.gopher
        resp = await fetch(target, method, timeout=cfg["timeout"], resolve=self.resolve)
        if resp.status == 200 and resp.header("cache-control") is None:
            resp.headers.append(("Cache-Control", f"max-age={int(cfg['default_ttl'])}"))
        return resp

    def opener_for(self, target: Target) -> Opener:
        """Fetches with no client request behind them (background refresh)."""
        async def gopher_opener(method: str, headers: Headers) -> OriginResponse:
            return await self.open(None, target, method, headers)

        return gopher_opener

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange,
                     target: Target) -> bool:
        refused = await fetch_refusal(self.env, self.resolve, req, target, conn.client_ip)
        if refused is not None:
            return self.answers.deny(rw, ex, *refused)

        async def opener(method: str, hdrs: Headers) -> OriginResponse:
            return await self.open(ex, target, method, hdrs)

        return await through_cache(self.cache, self.answers, conn, req, rw, ex, target, [], opener)
