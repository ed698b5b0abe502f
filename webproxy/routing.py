"""Where a request goes: one pure classification (`route`) and one dispatch table (`Router`),
built once when the proxy starts. Every path ends in exactly one access-log line.

    client not allowed                  -> DENIED (403, close)
    [auth] on, not a SELF or BAD route  -> 407 / 403 (a user's rule) / 503 (directory down) first
    CONNECT on a redirected connection  -> BAD (400): it was going to its original destination
    any target on a redirected conn.    -> TRANSPARENT (fetched from the original destination,
                                           whatever the URL or Host names), LOOP if our Via is on it
    CONNECT host:port                   -> CONNECT
    inside an intercepted TLS tunnel    -> HTTP for https:// (the target made absolute first,
                                           tlspolicy.inner_url), BAD for anything else
    origin-form, via our own Via        -> LOOP (508)
    origin-form, or a URL naming us     -> SELF (status page)
    http:// ftp:// gopher:// (FETCHERS) -> the fetcher of that scheme
    a scheme we know but do not fetch   -> UNSUPPORTED (501);  anything else -> BAD (400)
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import Enum

from webproxy import logcodes
from webproxy.auth import ANONYMOUS, AuthGate, Refusal
from webproxy.authpolicy import Identity
from webproxy.connect import ConnectHandler
from webproxy.context import Env
from webproxy.errors import ClientGone, Reject
from webproxy.exchange import Answers, Exchange
from webproxy.forward import HttpForwarder, refusal
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.ftpgate import FtpGate
from webproxy.gophergate import GopherGate
from webproxy.httpmsg import (
    BadTarget,
    Target,
    get_header,
    has_via_loop,
    parse_absolute_cached,
    parse_authority,
)
from webproxy.selfpages import SelfPages
from webproxy.tlspolicy import inner_url
from webproxy.transparent import TransparentHttp

# Schemes a client might send in absolute form that we know but do not fetch ourselves.
KNOWN_UNSUPPORTED = frozenset({"https", "ws", "wss", "wais", "news", "nntp", "telnet"})


class Route(Enum):
    DENIED = "denied"
    CONNECT = "connect"
    LOOP = "loop"
    TRANSPARENT = "transparent"
    SELF = "self"
    HTTP = "http"
    FTP = "ftp"
    GOPHER = "gopher"
    UNSUPPORTED = "unsupported"
    BAD = "bad"


FETCHERS = {"http": Route.HTTP, "ftp": Route.FTP, "gopher": Route.GOPHER}
# Answered without credentials: the proxy's own pages (a browser fetches the PAC file before it
# knows of any proxy) and targets that cannot be parsed.
NO_AUTH = frozenset({Route.DENIED, Route.SELF, Route.BAD})


@dataclass(slots=True)
class Routed:
    route: Route
    target: Target | None = None
    message: str = ""  # for BAD and UNSUPPORTED


def route(method: str, target: str, denied: bool, transparent: bool, looped: bool,
          is_self: Callable[[str, int], bool], inner: bool = False) -> Routed:
    """Pure: which handler answers this request. `looped`: our own Via is on it already.
    `inner`: read inside an intercepted TLS tunnel (its target already made absolute https://)."""
    if denied:
        return Routed(Route.DENIED)
    if transparent:
        # An intercepted connection was going to its original destination: that is the only
        # authority, so neither an absolute URL nor CONNECT may aim the proxy elsewhere.
        if method == "CONNECT":
            return Routed(Route.BAD, message="CONNECT is not accepted on an intercepted connection")
        return Routed(Route.LOOP if looped else Route.TRANSPARENT)
    if method == "CONNECT":
        return Routed(Route.CONNECT)
    if target.startswith("/") or target == "*":
        return Routed(Route.LOOP if looped else Route.SELF)
    try:
        t = parse_absolute_cached(target)
    except BadTarget as e:
        return Routed(Route.BAD, message=str(e))
    fetcher = FETCHERS.get(t.scheme)
    if inner:
        # The only scheme inside a tunnel; the CONNECT that opened it passed the loop checks.
        if t.scheme != "https":
            return Routed(Route.BAD, t, "an intercepted tunnel carries https:// requests only")
        return Routed(Route.LOOP if looped else Route.HTTP, t)
    if fetcher is Route.HTTP and is_self(t.host, t.port):
        return Routed(Route.LOOP if looped else Route.SELF, t)
    if fetcher is not None:
        return Routed(fetcher, t)
    if t.scheme in KNOWN_UNSUPPORTED:
        return Routed(Route.UNSUPPORTED, t, f"this proxy does not fetch {t.scheme}:// URLs itself; "
                      "for https use CONNECT (set the proxy for https in your client)")
    return Routed(Route.BAD, t, f"unsupported URL scheme {t.scheme!r}")


AccessLogger = Callable[[ClientConnection, Request, Exchange, int], None]


class Router:
    def __init__(self, env: Env, answers: Answers, forwarder: HttpForwarder, connect: ConnectHandler,
                 ftp: FtpGate, gopher: GopherGate, transparent: TransparentHttp, pages: SelfPages,
                 access: AccessLogger, auth: AuthGate) -> None:
        self.env = env
        self.auth = auth
        self.answers = answers
        self.forwarder = forwarder
        self.access = access
        self.table: dict[Route, Callable[[ClientConnection, Request, ResponseWriter, Exchange, Routed],
                                         Awaitable[bool]]] = {
            Route.CONNECT: lambda c, r, w, e, _: connect.handle(c, r, w, e),
            Route.TRANSPARENT: lambda c, r, w, e, _: transparent.handle(c, r, w, e),
            Route.HTTP: lambda c, r, w, e, rt: forwarder.handle(c, r, w, e, rt.target),
            Route.FTP: lambda c, r, w, e, rt: ftp.handle(c, r, w, e, rt.target),
            Route.GOPHER: lambda c, r, w, e, rt: gopher.handle(c, r, w, e, rt.target),
        }
        self.pages = pages

    def _route(self, conn: ClientConnection, req: Request) -> Routed:
        routed = route(req.method, req.target, conn.denied, conn.transparent_dst is not None,
                       has_via_loop(req.headers, self.env.cfg.server["name"]), self.env.is_self,
                       conn.inherited is not None)
        return _dial_inherited(conn, routed)

    @staticmethod
    def _absolute(conn: ClientConnection, req: Request) -> str | None:
        """Inside an intercepted tunnel: make the target the absolute https:// URL (so the cache
        key and the access log name it whole); the reason when it cannot be."""
        inh = conn.inherited
        if inh is None:
            return None
        try:
            req.target = inner_url(req.method, req.target, get_header(req.headers, "host"), inh.host, inh.port)
        except BadTarget as e:
            return str(e)
        return None

    def answer_now(self, conn: ClientConnection, req: Request) -> bool:
        """The parser-callback path: a fresh hit from memory, answered and logged synchronously.
        False: the request goes to the serve task (`handle`) instead."""
        cache = self.forwarder.cache
        if cache is None or req.method != "GET" or conn.transparent_dst is not None or self._absolute(conn, req):
            return False
        looped = has_via_loop(req.headers, self.env.cfg.server["name"])
        routed = _dial_inherited(conn, route(req.method, req.target, conn.denied, False, looped, self.env.is_self,
                                             conn.inherited is not None))
        if routed.route is not Route.HTTP or routed.target is None or refusal(self.env, req, routed.target, looped):
            return False
        user = ANONYMOUS
        if self.auth.on:
            user = self.auth.known(conn.client_ip, get_header(req.headers, "proxy-authorization"), conn.user,
                                   routed.target.host, routed.target.port, memo=conn)
            if user is None:  # to be verified, or refused: the serve task answers
                return False
        rw = ResponseWriter(conn, req)
        ex = Exchange(req.target)
        ex.user = user.log_name
        try:
            keep = cache.answer_now(req, rw, ex, routed.target)
        except ClientGone:
            keep = False
            ex.code = logcodes.aborted(ex.code)
        if keep is None:
            return False
        self.access(conn, req, ex, rw.nbytes)
        conn.finish_now(keep)
        return True

    async def handle(self, conn: ClientConnection, req: Request) -> bool:
        """Answer one request; returns whether the connection may serve another."""
        bad = self._absolute(conn, req)
        rw = ResponseWriter(conn, req)
        ex = Exchange(req.target)
        keep = False
        try:
            if bad is not None:
                keep = self.answers.error(rw, ex, 400, bad, close=True)
            else:
                keep = await self._dispatch(conn, req, rw, ex)
        except ClientGone:
            ex.code = logcodes.aborted(ex.code)
            keep = False
        except Reject as e:
            keep = self.answers.error(rw, ex, e.status, e.message, close=True)
        except Exception as e:  # never let one request take the process (or the connection) down silently
            self.env.log_error(f"internal error handling {req.method} {req.target[:200]}: {e!r}\n"
                               + traceback.format_exc(limit=12))
            if not conn.response_started and not conn.closed:
                keep = self.answers.error(rw, ex, 500, "internal proxy error; see the proxy's error log", close=True)
            else:
                conn.abort()
                keep = False
        finally:
            self.access(conn, req, ex, rw.nbytes)
        return keep

    async def _dispatch(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        routed = self._route(conn, req)
        r = routed.route
        if r is Route.DENIED:
            return self.answers.deny(rw, ex, 403, f"access denied: your address {conn.client_ip} may not use "
                                     "this proxy", close=True)
        if self.auth.on and r not in NO_AUTH:
            who = await self._authenticate(conn, req, routed)
            if isinstance(who, Refusal):
                ex.code = logcodes.DENIED
                ex.user = who.user.log_name if who.user is not None else "-"
                # A request body is not read for a refusal: the connection cannot go on after it.
                return self.answers.error(rw, ex, who.status, who.message, close=req.body is not None,
                                          extra=who.headers)
            ex.user = who.log_name
            if r is Route.CONNECT and who is not ANONYMOUS:
                conn.user = who  # inner requests of an intercepted tunnel carry no credentials
        if r is Route.LOOP:
            host = routed.target.host if routed.target else get_header(req.headers, "host")
            return self.answers.deny(rw, ex, 508, f"forwarding loop detected: this request for {host} "
                                     "has already passed through this proxy")
        if r is Route.SELF:
            return self.pages.handle(req, rw, ex, routed.target.path if routed.target else req.target, conn.client_ip)
        if r is Route.BAD:
            return self.answers.error(rw, ex, 400, routed.message)
        if r is Route.UNSUPPORTED:
            return self.answers.error(rw, ex, 501, routed.message)
        return await self.table[r](conn, req, rw, ex, routed)

    async def _authenticate(self, conn: ClientConnection, req: Request, routed: Routed) -> Identity | Refusal:
        """Who sends this request (an Identity), or a Refusal. Proxy-Authorization is hop-by-hop
        (RFC 9110 11.7.2): the forwarders drop it, so it never reaches an origin."""
        host, port = "", 0
        if routed.target is not None:
            host, port = routed.target.host, routed.target.port
        elif routed.route is Route.CONNECT:
            try:
                host, port = parse_authority(req.target, 0)
            except BadTarget:
                pass  # the CONNECT handler answers 400 once the client is known
        elif conn.transparent_dst is not None:
            host, port = conn.transparent_dst
        header = get_header(req.headers, "proxy-authorization")
        connect, transparent = routed.route is Route.CONNECT, conn.transparent_dst is not None
        # Remembered credentials (the common case) are settled here, without the verifying path.
        who = None if transparent else self.auth.known(conn.client_ip, header, conn.user, host, port, connect, conn)
        return who if who is not None else await self.auth.check(conn.client_ip, header, conn.user, host, port,
                                                                 connect, transparent, conn)

def _dial_inherited(conn: ClientConnection, routed: Routed) -> Routed:
    """An intercepted tunnel that knows the address to dial (transparent mode: the original
    destination) fetches from there, whatever the name."""
    inh = conn.inherited
    if inh is not None and inh.connect is not None and routed.target is not None:
        routed.target = replace(routed.target, connect=inh.connect)
    return routed
