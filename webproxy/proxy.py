"""What the proxy does with one parsed request: access checks, then CONNECT, an http:// or ftp://
fetch, or a page about the proxy itself. Every path ends in exactly one access-log line.
"""

from __future__ import annotations

import html
import time
import traceback
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from webproxy import __version__
from webproxy.acl import domain_denied
from webproxy.frontend import ClientConnection, ClientGone, Reject, Request, ResponseWriter
from webproxy.httpmsg import (
    BadTarget,
    Headers,
    Target,
    get_header,
    has_via_loop,
    parse_absolute,
    strip_hop_by_hop,
)
from webproxy.origin import HttpOriginResponse, OriginError, OriginResponse
from webproxy.upstream import UpstreamError

if TYPE_CHECKING:
    from webproxy.server import ProxyServer

# Schemes a client might send in absolute form that we know but do not fetch ourselves.
_KNOWN_UNSUPPORTED = {"https", "ws", "wss", "wais", "news", "nntp", "telnet"}


class Exchange:
    """The access-log fields of one request, filled in as it is handled."""

    __slots__ = ("code", "status", "hierarchy", "ctype", "url")

    def __init__(self, url: str) -> None:
        self.code = "TAG_NONE"
        self.status = 0
        self.hierarchy = "HIER_NONE/-"
        self.ctype: str | None = None
        self.url = url


class Proxy:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._via: dict[tuple[str, str], tuple[str, str]] = {}

    @property
    def cfg(self) -> Any:
        return self.server.cfg

    # ---- entry point --------------------------------------------------------------------------
    async def handle(self, conn: ClientConnection, req: Request) -> bool:
        """Answer one request; returns whether the connection may serve another."""
        rw = ResponseWriter(conn, req)
        ex = Exchange(req.target)
        keep = False
        try:
            keep = await self._dispatch(conn, req, rw, ex)
        except ClientGone:
            if not ex.code.endswith("_ABORTED"):
                ex.code = ("TCP_MISS" if ex.code == "TAG_NONE" else ex.code) + "_ABORTED"
            keep = False
        except Reject as e:
            keep = self._error(rw, ex, e.status, e.message, close=True)
        except Exception as e:  # never let one request take the process (or the connection) down silently
            self.server.log_error(f"internal error handling {req.method} {req.target[:200]}: {e!r}\n"
                                  + traceback.format_exc(limit=12))
            if not conn.response_started and not conn.closed:
                keep = self._error(rw, ex, 500, "internal proxy error; see the proxy's error log", close=True)
            else:
                conn.abort()
                keep = False
        finally:
            self.server.access(conn, req, ex, rw.nbytes)
        return keep

    async def _dispatch(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        if conn.denied:
            ex.code = "TCP_DENIED"
            return self._error(rw, ex, 403, f"access denied: your address {conn.client_ip} may not use this proxy", close=True)
        if req.method == "CONNECT":
            return await self.server.connect(conn, req, rw, ex)
        if req.target.startswith("/") or req.target == "*":
            return await self.origin_form(conn, req, rw, ex)
        try:
            target = parse_absolute(req.target)
        except BadTarget as e:
            return self._error(rw, ex, 400, str(e))
        if target.scheme == "http":
            return await self.http(conn, req, rw, ex, target)
        if target.scheme == "ftp":
            return await self.server.ftp(conn, req, rw, ex, target)
        if target.scheme == "gopher" and self.server.gopher_layer is not None:
            return await self.server.gopher_layer.handle(conn, req, rw, ex, target)
        if target.scheme in _KNOWN_UNSUPPORTED:
            return self._error(rw, ex, 501, f"this proxy does not fetch {target.scheme}:// URLs itself; "
                               "for https use CONNECT (set the proxy for https in your client)")
        return self._error(rw, ex, 400, f"unsupported URL scheme {target.scheme!r}")

    # ---- checks shared by every fetch ---------------------------------------------------------
    def check_target(self, req: Request, rw: ResponseWriter, ex: Exchange, target: Target) -> bool | None:
        """Domain filter and loop detection; returns the keep-alive answer when refused, else None."""
        why = domain_denied(target.host, self.cfg.access)
        if why:
            ex.code = "TCP_DENIED"
            return self._error(rw, ex, 403, f"access denied: {why}")
        if has_via_loop(req.headers, self.cfg.server["name"]):
            ex.code = "TCP_DENIED"
            return self._error(rw, ex, 508, f"forwarding loop detected: this request for {target.host} "
                               "has already passed through this proxy")
        return None

    def _error(self, rw: ResponseWriter, ex: Exchange, status: int, message: str, close: bool = False,
               extra: Headers | None = None) -> bool:
        ex.status = status
        ex.ctype = "text/plain"
        if rw.conn.response_started or rw.conn.closed:
            rw.conn.abort()
            return False
        return rw.simple(status, message, extra=extra, close=close)

    # ---- http:// -----------------------------------------------------------------------------
    def request_headers(self, req: Request, target: Target, conn: ClientConnection) -> Headers | None:
        """End-to-end request headers for the origin, with Host from the URL and our Via;
        None when Max-Forwards says this hop must answer itself."""
        headers = [(k, v) for k, v in strip_hop_by_hop(req.headers) if k.lower() not in ("host", "expect")]
        if req.method in ("TRACE", "OPTIONS"):
            mf = get_header(headers, "max-forwards")
            if mf is not None and mf.strip().isdigit():
                n = int(mf.strip())
                if n == 0:
                    return None
                headers = [(k, v) for k, v in headers if k.lower() != "max-forwards"]
                headers.append(("Max-Forwards", str(n - 1)))
        headers.insert(0, ("Host", target.authority))
        headers.append(self.via(req.version))
        if self.cfg.server["x_forwarded_for"]:
            prior = get_header(headers, "x-forwarded-for")
            headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-for"]
            headers.append(("X-Forwarded-For", f"{prior}, {conn.client_ip}" if prior else conn.client_ip))
        return headers

    async def http(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange, target: Target,
                   cacheable: bool = True) -> bool:
        if self.server.is_self(target.host, target.port):
            req.target = target.path  # http://proxy:3128/ names this proxy: answer it, do not loop
            return await self.origin_form(conn, req, rw, ex)
        refused = self.check_target(req, rw, ex, target)
        if refused is not None:
            return refused
        headers: Headers | None = None
        if req.method in ("TRACE", "OPTIONS"):
            headers = self.request_headers(req, target, conn)
            if headers is None:
                return self.answer_max_forwards(req, rw, ex)
        cache = self.server.cache_layer
        if cache is not None and cacheable:
            async def opener(method: str, hdrs: Headers) -> OriginResponse:
                return await self.fetch(req, ex, target, hdrs, method)

            # The forwarded headers are only built when something goes upstream: a hit never needs them.
            handled = await cache.handle(conn, req, rw, ex, target,
                                         lambda: headers or self.request_headers(req, target, conn), opener)
            if handled is not None:
                return handled
        if headers is None:
            headers = self.request_headers(req, target, conn)
            assert headers is not None
        return await self.forward(req, rw, ex, target, headers)

    async def fetch(self, req: Request, ex: Exchange, target: Target, headers: Headers,
                    method: str | None = None) -> HttpOriginResponse:
        """Send the request upstream (streaming the client's body) and return the response head."""
        body: AsyncIterator[bytes] | None = req.body.stream() if req.body is not None else None
        oresp = await self.open(method or req.method, target, headers, body)
        ex.hierarchy = f"HIER_DIRECT/{oresp.peer or target.host}"
        return oresp

    async def open(self, method: str, target: Target, headers: Headers,
                   body: AsyncIterator[bytes] | None = None) -> HttpOriginResponse:
        upstream = self.server.upstream
        upstream.active += 1
        try:
            resp = await upstream.request(method, target.fetch_url, headers, body, f"{target.host}:{target.port}")
        finally:
            upstream.active -= 1
        return HttpOriginResponse(resp)

    def via(self, version: str) -> tuple[str, str]:
        name = self.cfg.server["name"]
        cached = self._via.get((version, name))
        if cached is None:
            cached = self._via[(version, name)] = ("Via", f"{version} {name} (webproxy/{__version__})")
        return cached

    async def forward(self, req: Request, rw: ResponseWriter, ex: Exchange, target: Target, headers: Headers) -> bool:
        """Plain pass-through: fetch and stream back, nothing stored."""
        ex.code = "TCP_MISS"
        try:
            resp = await self.fetch(req, ex, target, headers)
        except UpstreamError as e:
            return self._upstream_error(req, rw, ex, e)
        return await self.relay_response(req, rw, ex, resp)

    async def relay_response(self, req: Request, rw: ResponseWriter, ex: Exchange, resp: OriginResponse,
                             sink: Any = None, extra: Headers | None = None) -> bool:
        """Stream an origin response to the client (and to `sink`, a cache fill, when given).
        `sink` gets write(chunk) for every chunk, then commit() after a complete body or abort()."""
        ex.status = resp.status
        ex.ctype = resp.header("content-type")
        headers = [*resp.headers, self.via(resp.version), *(extra or [])]
        clean = False
        try:
            rw.start(resp.status, resp.reason, headers, resp.length)
            if not rw.no_body:
                received = 0
                async for chunk in resp.chunks():
                    if sink is not None:
                        sink.write(chunk)
                        received += len(chunk)
                        if received == resp.length:
                            # Publish before the client has the last byte: its next request (maybe to
                            # another worker process) must find the entry.
                            sink.commit()
                            sink = None
                    await rw.send(chunk)
            clean = True
            if sink is not None:
                sink.commit()
                sink = None
            return rw.end()
        except OriginError as e:
            # The head is out: the only honest signal left is to cut the connection, so the client
            # sees a truncated body instead of a complete-looking wrong one.
            self.server.log_error(f"origin failed mid-body for {req.target[:200]}: {e}")
            if not ex.code.endswith("_ABORTED"):
                ex.code += "_ABORTED"
            rw.conn.abort()
            return False
        finally:
            if sink is not None:
                sink.abort()
            await resp.close(clean)

    def _upstream_error(self, req: Request, rw: ResponseWriter, ex: Exchange, e: UpstreamError) -> bool:
        if req.body is not None and isinstance(req.body.error, Reject):
            r = req.body.error
            return self._error(rw, ex, r.status, r.message, close=True)
        if req.body is not None and isinstance(req.body.error, ClientGone):
            raise req.body.error
        self.server.log_error(f"{e.status} for {req.method} {req.target[:200]}: {e.message}", "info")
        return self._error(rw, ex, e.status, e.message)

    def answer_max_forwards(self, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        """TRACE or OPTIONS with Max-Forwards: 0 is answered by this hop (RFC 9110 7.6.2)."""
        ex.code = "TCP_MISS"
        ex.status = 200
        if req.method == "OPTIONS":
            rw.start(200, "OK", [("Allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE, CONNECT"),
                                 self.via(req.version)], 0)
            return rw.end()
        # Echo what we received, minus credentials (RFC 9110 9.3.8 says TRACE must not leak them).
        secret = {"authorization", "proxy-authorization", "cookie"}
        lines = [f"{req.method} {req.target} HTTP/{req.version}"]
        lines += [f"{k}: {v}" for k, v in req.headers if k.lower() not in secret]
        body = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        ex.ctype = "message/http"
        rw.start(200, "OK", [("Content-Type", "message/http")], len(body))
        rw.write(body)
        return rw.end()

    # ---- requests for the proxy itself ----------------------------------------------------------
    async def origin_form(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        host = get_header(req.headers, "host")
        if has_via_loop(req.headers, self.cfg.server["name"]):
            ex.code = "TCP_DENIED"
            return self._error(rw, ex, 508, f"forwarding loop detected: this request for {host} "
                               "has already passed through this proxy")
        if conn.transparent_dst is not None:
            return await self.server.transparent_http(conn, req, rw, ex, host)
        if req.method in ("GET", "HEAD") and req.target in ("/", "/status"):
            ex.code = "TCP_MISS"
            ex.status = 200
            ex.ctype = "text/html"
            body = self.status_page().encode()
            rw.start(200, "OK", [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")], len(body))
            rw.write(body)
            return rw.end()
        return self._error(rw, ex, 400, f"this is a proxy server, not a web server: {req.target[:200]!r} "
                           f"(Host: {host or 'none'}) is not an absolute URL. Configure your client to use "
                           "this address as its HTTP proxy, e.g. curl -x http://HOST:PORT http://example.com/")

    def status_page(self) -> str:
        s = self.server
        rows = [
            ("version", __version__),
            ("uptime", f"{int(time.time() - s.started)} s"),
            ("client connections open", str(s.counter.total)),
            ("requests served", str(s.requests)),
        ]
        rows += s.status_rows()
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return (f"<!doctype html><html><head><title>webproxy</title></head><body><h1>webproxy</h1>"
                f"<p>This is an HTTP proxy. Point your client at it; it does not serve pages itself.</p>"
                f"<table>{cells}</table></body></html>\n")
