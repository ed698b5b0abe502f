"""ftp:// URLs through the proxy: the HTTP client talks to us, we talk FTP to the server, and the
answer takes the same relay (and cache) path as an HTTP origin's.

FTP carries no freshness information, so 200 answers get one here: a fraction of the file's age
from MDTM (the same heuristic HTTP caches apply to Last-Modified), else `ftp.default_ttl`.
Revalidation is a conditional GET: the FTP fetcher answers If-Modified-Since from MDTM with 304.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from webproxy import logcodes
from webproxy.context import Env
from webproxy.dns import Resolver
from webproxy.errors import OriginError
from webproxy.exchange import Answers, Exchange
from webproxy.forward import CacheHandler, fetch_refusal, through_cache
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.ftp import FtpResponse, FtpTransferError, fetch
from webproxy.ftppool import FtpPool
from webproxy.httpmsg import Headers, Target, get_header
from webproxy.origin import Opener, OriginResponse
from webproxy.parentpath import ParentPath


class FtpOriginResponse(OriginResponse):
    """An FTP fetcher's answer in the shape the relay and the cache consume."""

    def __init__(self, resp: FtpResponse, method: str) -> None:
        self.resp = resp
        self.status = resp.status
        self.reason = resp.reason
        self.headers = [(k, v) for k, v in resp.headers if k.lower() != "content-length"]
        cl = resp.header("content-length")
        self.length = int(cl) if cl is not None and cl.isdigit() else None
        self.method = method

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.method == "HEAD":
            return
        try:
            async for chunk in self.resp.body():
                yield chunk
        except FtpTransferError as e:
            raise OriginError(str(e)) from None

    async def close(self, clean: bool) -> None:
        # FtpResponse knows whether its transfer completed, and pools or drops the session itself.
        with contextlib.suppress(Exception):
            await self.resp.aclose()


class FtpGate:
    def __init__(self, env: Env, answers: Answers, resolver: Resolver, parents: ParentPath) -> None:
        self.env = env
        self.answers = answers
        self.parents = parents
        self.resolve = resolver.resolve  # the destination check (access.deny_destinations)
        self.pool = FtpPool(env.cfg.ftp, resolve=resolver.address)  # the shared DNS cache
        self.cache: CacheHandler | None = None  # set when the cache is on

    def freshness(self, resp: FtpOriginResponse, now: float) -> int:
        cfg = self.env.cfg
        mdtm = resp.resp.mdtm
        if mdtm is not None and now > mdtm:
            return int(min((now - mdtm) * cfg.ftp["heuristic_fraction"], cfg.cache["heuristic_max"]))
        return int(cfg.ftp["default_ttl"])

    async def open(self, url: str, ex: Exchange | None, target: Target, method: str, headers: Headers) -> OriginResponse:
        # Through a parent, the URI carries the credentials as the client wrote them.
        named = replace(target, authority=f"{target.userinfo}@{target.authority}") if target.userinfo else target
        resp, hierarchy = await self.parents.gateway(target, method, headers, self.answers.via("1.1"),
                                                     lambda: self.direct(url, target, method, headers), named)
        if ex is not None:
            ex.hierarchy = hierarchy or logcodes.hier_direct(target.host)
        return resp

    async def direct(self, url: str, target: Target, method: str, headers: Headers) -> OriginResponse:
        resp = FtpOriginResponse(await fetch(url, method, headers, self.pool), method)
        if resp.status == 200 and resp.header("cache-control") is None:
            resp.headers.append(("Cache-Control", f"max-age={self.freshness(resp, time.time())}"))
        return resp

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange, target: Target) -> bool:
        refused = await fetch_refusal(self.env, self.resolve, req, target, conn.client_ip)
        if refused is not None:
            return self.answers.deny(rw, ex, *refused)
        headers = [(k, v) for k, v in req.headers if k.lower() not in ("host", "proxy-authorization")]

        async def opener(method: str, hdrs: Headers) -> OriginResponse:
            return await self.open(req.target, ex, target, method, hdrs)

        # Only anonymous fetches are shared: a user's files stay that user's.
        shared = not target.userinfo and get_header(req.headers, "authorization") is None
        return await through_cache(self.cache, self.answers, conn, req, rw, ex, target, headers, opener, shared)

    def opener_for(self, url: str, target: Target) -> Opener:
        """Fetches with no client request behind them (background refresh)."""
        async def ftp_opener(method: str, headers: Headers) -> OriginResponse:
            return await self.open(url, None, target, method, headers)

        return ftp_opener

    async def close(self) -> None:
        await self.pool.close()
