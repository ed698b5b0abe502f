"""http:// requests: the checks every fetch shares (domain filter, forwarding loops), the request
as the origin receives it (hop-by-hop fields removed, Host from the URL, our Via), the fetch, and a
plain pass-through when the cache has nothing to do with the request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from tunnel.connect import Resolver
from webproxy import logcodes
from webproxy.acl import domain_denied, ip_of
from webproxy.context import Env
from webproxy.errors import UpstreamError
from webproxy.exchange import Answers, Exchange
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.httpmsg import (
    Headers,
    Target,
    get_header,
    has_via_loop,
    reason_phrase,
    serialize_head,
    strip_hop_by_hop,
)
from webproxy.metrics import TALLY
from webproxy.origin import HttpOriginResponse, Opener, OriginResponse
from webproxy.parentpath import ParentPath
from webproxy.upstream import Informational, Upstream

ALLOW_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE, CONNECT"
# Never echoed by TRACE (RFC 9110 9.3.8: a TRACE answer must not leak credentials).
TRACE_SECRET_FIELDS = frozenset({"authorization", "proxy-authorization", "cookie"})


def refusal(env: Env, req: Request, target: Target, looped: bool | None = None) -> tuple[int, str] | None:
    """Domain filter and loop detection for any fetch: (status, message) when refused. `looped`:
    whether our Via is on the request, when the caller has looked already."""
    why = domain_denied(target.host, env.cfg.access)
    if why:
        return 403, f"access denied: {why}"
    if looped if looped is not None else has_via_loop(req.headers, env.cfg.server["name"]):
        return 508, (f"forwarding loop detected: this request for {target.host} "
                     "has already passed through this proxy")
    return None


async def destination_refusal(env: Env, resolve: Resolver, client_ip: str, host: str, port: int) -> str | None:
    """access.deny_destinations on the resolved address, for clients not on this host (a client
    on the LAN must not reach services bound to the proxy host's loopback)."""
    if not env.cfg.access["deny_destinations"] or env.is_local_address(client_ip):
        return None
    if ip_of(host) is not None:
        ips = [host]
    else:
        try:
            ips = [e["host"] if isinstance(e, dict) else str(e) for e in await resolve(host, port)]
        except Exception:
            return None  # the fetch itself reports the DNS failure
    if any(env.destination_refused(client_ip, ip) for ip in ips):
        return f"access denied: {host} is an address of the proxy host (see access.deny_destinations)"
    return None


async def fetch_refusal(env: Env, resolve: Resolver, req: Request, target: Target,
                        client_ip: str) -> tuple[int, str] | None:
    """Every check a fetch of any scheme passes before it goes out: the domain filter, loops, and
    access.deny_destinations on the address actually dialled (the original destination when
    intercepted)."""
    refused = refusal(env, req, target)
    if refused is not None:
        return refused
    host = target.connect.rsplit(":", 1)[0].strip("[]") if target.connect else target.host
    why = await destination_refusal(env, resolve, client_ip, host, target.port)
    return (403, why) if why is not None else None


async def through_cache(cache: CacheHandler | None, answers: Answers, conn: ClientConnection, req: Request,
                        rw: ResponseWriter, ex: Exchange, target: Target, headers: Headers, opener: Opener,
                        shared: bool = True) -> bool:
    """A fetcher's answer (ftp, gopher): from the cache when it is on and the answer may be
    `shared`, else relayed straight from the origin."""
    if cache is not None and shared:
        handled = await cache.handle(conn, req, rw, ex, target, headers, opener)
        if handled is not None:
            return handled
    ex.code = logcodes.MISS
    return await answers.relay(req, rw, ex, await opener(req.method, headers))


def max_forwards_reached(req: Request) -> bool:
    """TRACE or OPTIONS with Max-Forwards: 0 is answered by this hop (RFC 9110 7.6.2)."""
    if req.method not in ("TRACE", "OPTIONS"):
        return False
    mf = get_header(req.headers, "max-forwards")
    return mf is not None and mf.strip().isdigit() and int(mf.strip()) == 0


class CacheHandler(Protocol):
    """The cache layer as the fetchers see it (webproxy.caching.CacheLayer)."""

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange,
                     target: Target, lazy_headers: Headers | Callable[[], Headers],
                     opener: Opener) -> bool | None: ...


class HttpForwarder:
    def __init__(self, env: Env, answers: Answers, upstream: Upstream, resolve: Resolver,
                 parents: ParentPath | None = None) -> None:
        self.env = env
        self.answers = answers
        self.upstream = upstream
        self.resolve = resolve
        self.parents = parents if parents is not None else ParentPath(env, upstream, resolve)
        self.cache: CacheHandler | None = None  # set when the cache is on

    def request_headers(self, req: Request, target: Target, client_ip: str) -> Headers:
        """End-to-end request fields for the origin, with Host from the URL and our Via."""
        headers = [(k, v) for k, v in strip_hop_by_hop(req.headers) if k.lower() not in ("host", "expect")]
        if req.method in ("TRACE", "OPTIONS"):
            mf = get_header(headers, "max-forwards")
            if mf is not None and mf.strip().isdigit():
                headers = [(k, v) for k, v in headers if k.lower() != "max-forwards"]
                headers.append(("Max-Forwards", str(int(mf.strip()) - 1)))
        headers.insert(0, ("Host", target.authority))
        headers.append(self.answers.via(req.version))
        if self.env.cfg.server["x_forwarded_for"]:
            prior = get_header(headers, "x-forwarded-for")
            headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-for"]
            headers.append(("X-Forwarded-For", f"{prior}, {client_ip}" if prior else client_ip))
        return headers

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange, target: Target,
                     cacheable: bool = True) -> bool:
        refused = await fetch_refusal(self.env, self.resolve, req, target, conn.client_ip)
        if refused is not None:
            return self.answers.deny(rw, ex, *refused)
        if max_forwards_reached(req):
            return self.answer_max_forwards(req, rw, ex)
        cache = self.cache
        if cache is not None and cacheable:
            async def opener(method: str, hdrs: Headers) -> OriginResponse:
                return await self.fetch(req, ex, target, hdrs, method, conn)

            # The forwarded fields are only built when something goes upstream: a hit never needs them.
            handled = await cache.handle(conn, req, rw, ex, target,
                                         lambda: self.request_headers(req, target, conn.client_ip), opener)
            if handled is not None:
                return handled
        return await self.forward(req, rw, ex, target, self.request_headers(req, target, conn.client_ip))

    async def fetch(self, req: Request, ex: Exchange, target: Target, headers: Headers,
                    method: str | None = None, conn: ClientConnection | None = None) -> HttpOriginResponse:
        """Send the request upstream (streaming the client's body) and return the response head.
        Interim 1xx responses go on to `conn` as they arrive when the client speaks HTTP/1.1."""
        body: AsyncIterator[bytes] | None = req.body.stream() if req.body is not None else None
        interim = interim_writer(conn) if conn is not None and req.version == "1.1" else None
        oresp = await self.open(method or req.method, target, headers, body, interim)
        ex.hierarchy = oresp.hierarchy or logcodes.hier_direct(oresp.peer or target.host)
        return oresp

    async def open(self, method: str, target: Target, headers: Headers,
                   body: AsyncIterator[bytes] | None = None,
                   informational: Informational | None = None) -> HttpOriginResponse:
        upstream = self.upstream
        upstream.active += 1
        sent = time.monotonic()
        try:
            plan = self.parents.plan(target.host, intercepted=target.connect is not None)
            if plan.direct_only:
                resp = HttpOriginResponse(await upstream.request(method, target, headers, body, informational))
            else:
                async def direct() -> HttpOriginResponse:
                    return HttpOriginResponse(await upstream.request(method, target, headers, body, informational))

                resp, resp.hierarchy = await self.parents.fetch(plan, method, target, headers, direct,
                                                                body, informational)
        finally:
            upstream.active -= 1
        TALLY.fetched(time.monotonic() - sent)
        return resp

    def opener_for(self, target: Target) -> Opener:
        """Fetches with no client request behind them (background refresh): exactly the fields
        given (stored Vary fields, validators) plus Host and Via."""
        async def http_opener(method: str, headers: Headers) -> OriginResponse:
            fields = [(k, v) for k, v in headers if k.lower() not in ("host", "via")]
            fields.insert(0, ("Host", target.authority))
            fields.append(self.answers.via("1.1"))
            return await self.open(method, target, fields)

        return http_opener

    async def forward(self, req: Request, rw: ResponseWriter, ex: Exchange, target: Target, headers: Headers) -> bool:
        """Plain pass-through: fetch and stream back, nothing stored."""
        ex.code = logcodes.MISS
        try:
            resp = await self.fetch(req, ex, target, headers, conn=rw.conn)
        except UpstreamError as e:
            return self.answers.upstream_error(req, rw, ex, e)
        return await self.answers.relay(req, rw, ex, resp)

    def answer_max_forwards(self, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        ex.code = logcodes.MISS
        ex.status = 200
        if req.method == "OPTIONS":
            rw.start(200, "OK", [("Allow", ALLOW_METHODS), self.answers.via(req.version)], 0)
            return rw.end()
        lines = [f"{req.method} {req.target} HTTP/{req.version}"]
        lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in TRACE_SECRET_FIELDS]
        body = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        ex.ctype = "message/http"
        rw.start(200, "OK", [("Content-Type", "message/http")], len(body))
        rw.write(body)
        return rw.end()


def interim_writer(conn: ClientConnection) -> Informational:
    """Pass 1xx interim responses on to an HTTP/1.1 client, in order, before the final one
    (RFC 9110 15.2: a proxy forwards them; HTTP/1.0 clients get none, as they cannot parse them).
    They are never stored: the cache only ever sees the final response."""

    # Only while this request is the one being answered and its final head is not out: a
    # background revalidation may still be fetching when the connection has moved on.
    serving = conn.served

    def interim(status: int, reason: str, headers: Headers) -> None:
        if conn.served == serving and not conn.response_started and not conn.closed:
            conn.write(serialize_head(status, reason or reason_phrase(status), strip_hop_by_hop(headers)))

    return interim
