"""Following a parent plan (`webproxy.parents.select`): try each hop in turn, mark a parent that
fails down for a while, and say which hop answered (the access log's hierarchy field).

Shared by every fetcher: http:// (absolute-form requests on the parent's pooled connections),
ftp:// and gopher:// (the same, as absolute URIs to an HTTP parent), and CONNECT (through the
parent's own CONNECT). A hop is left for the next one only when nothing of the request can have
reached the origin: the parent could not be reached, or (for a request safe to repeat) it closed
or timed out without answering.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tunnel.connect import DialError, Resolver
from tunnel.parentdial import TunnelRefused, dial_through_parent
from webproxy import logcodes
from webproxy.context import Env
from webproxy.errors import UpstreamError
from webproxy.httpmsg import Headers, Target, strip_hop_by_hop
from webproxy.origin import HttpOriginResponse, OriginResponse
from webproxy.parents import DIRECT, DownTable, Parent, Plan, parse_parents, select, unreachable
from webproxy.upstream import IDEMPOTENT, Informational, Upstream

T = TypeVar("T")
R = TypeVar("R", bound=OriginResponse)

# Failures after which the next hop may be tried (RFC 9110 9.2.2 for the ones past connecting):
# nothing was sent, or the parent said nothing and the request is safe to repeat.
NOT_SENT = frozenset({"ERR_CONNECT_FAIL", "ERR_DNS_FAIL"})
UNANSWERED = frozenset({"ERR_READ_ERROR", "ERR_READ_TIMEOUT"})


class ParentPath:
    def __init__(self, env: Env, upstream: Upstream, resolve: Resolver,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.env = env
        self.upstream = upstream
        self.resolve = resolve
        self.clock = clock
        self.down = DownTable()
        self._parsed: tuple[Any, tuple[Parent, ...]] = (None, ())

    def parents(self) -> tuple[Parent, ...]:
        """The parents of the live config, parsed once per config (SIGHUP may change them)."""
        raw = self.env.cfg.upstream
        if self._parsed[0] is not raw:
            self._parsed = (raw, parse_parents(raw))
        return self._parsed[1]

    def plan(self, host: str, intercepted: bool = False) -> Plan:
        up = self.env.cfg.upstream
        if not up["parent"]:
            return select(host, up, (), {}, 0.0)
        return select(host, up, self.parents(), self.down.until, self.clock(), intercepted)

    def _failed(self, p: Parent, why: str) -> None:
        # Logged when a parent goes down, not on every retry of one already down (never_direct
        # retries them on each request): one line per outage, as Squid's "Detected DEAD Parent".
        now = self.clock()
        was_down = p.name in self.down.strikes
        period = self.down.failed(p.name, now, self.env.cfg.upstream["parent_down_time"])
        if not was_down:
            self.env.log_error(f"parent proxy {p.name} failed ({why}); skipping it for {period:g} s", "info")

    def _answered(self, p: Parent) -> None:
        if p.name in self.down.strikes:
            self.env.log_error(f"parent proxy {p.name} is answering again", "info")
        self.down.succeeded(p.name)

    async def follow(self, host: str, plan: Plan, direct: Callable[[], Awaitable[T]],
                     via: Callable[[Parent], Awaitable[T]], retry_unanswered: bool) -> tuple[T, Parent | None]:
        """Try the plan's hops in order: `via(parent)` for a parent, `direct()` for DIRECT (always
        last). Returns the answer and the parent that gave it (None: direct). Raises the last
        hop's UpstreamError, or a 502 naming every parent when none could be reached."""
        failures: list[tuple[Parent, str]] = []
        for hop in plan.hops:
            if hop is DIRECT:
                return await direct(), None
            try:
                answer = await via(hop)
            except UpstreamError as e:
                if e.code not in NOT_SENT and not (retry_unanswered and e.code in UNANSWERED):
                    raise
                self._failed(hop, e.message)
                failures.append((hop, e.message))
                continue
            self._answered(hop)
            return answer, hop
        never_direct = self.env.cfg.upstream["never_direct"]
        raise UpstreamError(502, plan.reason or unreachable(host, failures, never_direct), "ERR_CONNECT_FAIL")

    # ---- http://, and ftp:// / gopher:// as absolute URIs to an HTTP parent -------------------------
    async def fetch(self, plan: Plan, method: str, target: Target, headers: Headers,
                    direct: Callable[[], Awaitable[R]], body: AsyncIterator[bytes] | None = None,
                    informational: Informational | None = None) -> tuple[R | HttpOriginResponse, str | None]:
        """The response along the plan, and its hierarchy field when a parent gave it (None:
        `direct()` did, and the caller logs the origin's address as it always has)."""
        async def via(p: Parent) -> HttpOriginResponse:
            return await self.request(p, method, target, headers, body, informational)

        resp, parent = await self.follow(target.host, plan, direct, via,  # type: ignore[arg-type]
                                         retry_unanswered=method in IDEMPOTENT and body is None)
        if parent is not None:  # on the response too: a background refresh logs it from there
            resp.hierarchy = logcodes.hier_parent(plan.code, parent.host)
        return resp, resp.hierarchy

    async def gateway(self, target: Target, method: str, headers: Headers, via: tuple[str, str],
                      direct: Callable[[], Awaitable[R]], named: Target | None = None) -> tuple[OriginResponse, str | None]:
        """An ftp:// or gopher:// fetch: `direct()` when the plan says so, else to an HTTP parent
        as the absolute URI of `named` (default `target`) with `headers` forwarded and our `via`;
        the parent's answer is an HTTP response, relayed and cached by HTTP's rules."""
        plan = self.plan(target.host)
        if plan.direct_only:
            return await direct(), None
        return await self.fetch(plan, method, named or target, forwarded_fields(headers, target, via), direct)

    async def request(self, parent: Parent, method: str, target: Target, headers: Headers,
                      body: AsyncIterator[bytes] | None = None,
                      informational: Informational | None = None) -> HttpOriginResponse:
        """One request through `parent`. A parent's 407 is about our credentials, not the client's:
        it is a 502 naming the parent (the client must not be asked for the parent's password)."""
        resp = await self.upstream.request(method, target, [*headers, *parent.fields()], body, informational,
                                           parent=(parent.host, parent.port))
        if resp.status == 407:
            resp.abort()
            what = "rejected our credentials" if parent.authorization else "requires credentials"
            raise UpstreamError(502, f"parent proxy {parent.name} {what} (407); "
                                "check username/password in [[upstream.parent]]", "ERR_CANNOT_FORWARD")
        return HttpOriginResponse(resp)

    # ---- CONNECT ---------------------------------------------------------------------------------
    async def tunnel(self, host: str, port: int, fields: Headers) -> tuple[socket.socket, bytes, str] | None:
        """(socket, bytes the parent sent past its answer, hierarchy) for a tunnel through a
        parent; None when the plan (or a failover) says go direct. Raises UpstreamError: every
        parent failed under never_direct (502), or a parent refused the CONNECT (502 with its
        status)."""
        plan = self.plan(host)
        if plan.direct_only:
            return None
        timeout = self.env.cfg.upstream["connect_timeout"]

        async def via(p: Parent) -> tuple[socket.socket, bytes]:
            try:
                return await dial_through_parent(p.host, p.port, host, port, fields=[*fields, *p.fields()],
                                                 timeout=timeout, resolve=self.resolve)
            except DialError as e:
                raise UpstreamError(e.status, f"cannot connect to parent proxy: {e}", "ERR_CONNECT_FAIL") from None
            except TunnelRefused as e:
                hint = "; check username/password in [[upstream.parent]]" if e.status == 407 else ""
                raise UpstreamError(502, f"parent proxy {p.name} refused CONNECT {host}:{port}: {e}{hint}",
                                    "ERR_CANNOT_FORWARD") from None

        async def direct() -> None:
            return None

        answer, parent = await self.follow(host, plan, direct, via, retry_unanswered=True)
        if answer is None or parent is None:
            return None
        sock, rest = answer
        return sock, rest, logcodes.hier_parent(plan.code, parent.host)


def forwarded_fields(headers: Headers, target: Target, via: tuple[str, str]) -> Headers:
    """What an HTTP parent gets for an ftp:// or gopher:// URL: the client's end-to-end fields
    (RFC 9110 7.6.1), Host from the URL, our Via appended."""
    fields = [(k, v) for k, v in strip_hop_by_hop(headers) if k.lower() not in ("host", "proxy-authorization")]
    return [("Host", target.authority), *fields, via]
