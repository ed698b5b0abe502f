"""Fetching from origin servers over HTTP/1.1: our own client, built for a proxy.

`Upstream.request()` sends one request and returns the final response head; connections
(`webproxy.originconn`) are kept alive in a pool per (host, port), plus the TLS server name for
https:// (always verified: chain and name, see certs.origin_context), with the `[upstream]` limits
and idle expiry, and names are resolved by the process's shared resolver (`webproxy.dns`).

Nothing is added or changed on the way: the request target byte-for-byte, only the header fields
the caller passes (plus `Transfer-Encoding: chunked` when a body of unknown length must be framed),
no decompression, no cookies. Responses are checked strictly (`webproxy.originframing`): an
ambiguous or malformed head is a 502, never a guess.

Failures before the response head come back as `UpstreamError` with the status the client should
see (502/504) and a sentence naming the host; failures after it as `OriginError` from `read()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tunnel.connect import DialError
from tunnel.parentdial import TunnelRefused, dial_through_parent
from webproxy.dns import DNSError, Resolver
from webproxy.errors import UpstreamError
from webproxy.httpmsg import Headers, Target
from webproxy.originconn import (
    IDLE,
    MAX_HEAD,
    Informational,
    OriginConnection,
    StaleConnection,
    UpstreamResponse,
    serialize_request,
)
from webproxy.tlspolicy import verify_reason

__all__ = ["Informational", "Upstream", "UpstreamResponse"]

# (host, port) to dial; a third member: "parent" (a parent proxy's connections) or TLS_TAG + the
# server name an https:// origin is verified for.
PoolKey = tuple[str, int] | tuple[str, int, str] | tuple[str, int, str, str]


@dataclass(frozen=True, slots=True)
class ParentTunnel:
    """A parent proxy whose CONNECT carries our TLS to an https:// origin."""

    host: str
    port: int
    fields: tuple[tuple[str, str], ...]  # on the CONNECT: Proxy-Authorization for that parent
TLS_TAG = "tls "

# RFC 9110 9.2.2: a request that may be sent twice without a different effect.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class _Host:
    """The pool's record of one (host, port): idle connections (most recent last), live count."""

    __slots__ = ("idle", "live")

    def __init__(self) -> None:
        self.idle: list[OriginConnection] = []
        self.live = 0


class Upstream:
    """The origin-side HTTP client, shared by every client connection of one proxy process."""

    def __init__(self, cfg: dict[str, Any], resolver: Resolver | None = None, head_limit: int = MAX_HEAD,
                 tls: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        self.tls = tls  # for https:// origins; None: the system trust store (made when first needed)
        self.resolver = resolver if resolver is not None else Resolver(cfg["dns_ttl"])
        self.head_limit = head_limit
        self.loop = asyncio.get_running_loop()
        self.active = 0  # fetches in flight, read by the refresher's load check
        self.opened = 0  # connections opened, for stats and tests
        self._hosts: dict[PoolKey, _Host] = {}
        self._tunnels: dict[PoolKey, ParentTunnel] = {}  # https:// pools reached through a parent's CONNECT
        self._live = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(self, method: str, target: Target, headers: Headers,
                      body: AsyncIterator[bytes] | None = None,
                      informational: Informational | None = None,
                      parent: tuple[str, int] | None = None,
                      tunnel: ParentTunnel | None = None) -> UpstreamResponse:
        """Send the request to `target` (its `connect` address when set, else host and port) and
        return once the final response head is in. `headers` go out exactly as given; `body`
        is streamed (chunked unless the headers carry Content-Length). Interim 1xx responses go
        to `informational` as they arrive. `parent`: send it to that proxy instead, in absolute
        form (RFC 9112 3.2.2), over the parent's own pooled connections. `tunnel`: for an https://
        target, reach the origin through that parent's CONNECT and speak TLS to the origin inside
        it, so the parent never sees the request in clear. Raises UpstreamError."""
        if parent is None:
            key: PoolKey = _dial(target)
            if target.scheme == "https":
                key = (*key, TLS_TAG + target.host)  # a TLS connection, verified for this name: its own pool
                if tunnel is not None:
                    key = (*key, f"via {tunnel.host}:{tunnel.port}")
                    self._tunnels[key] = tunnel
            label = f"{target.host}:{target.port}"
            path = target.path
        else:
            host = f"[{parent[0]}]" if ":" in parent[0] else parent[0]
            key, label, path = (*parent, "parent"), f"parent proxy {host}:{parent[1]}", target.origin_url
        chunked = body is not None and not any(k.lower() == "content-length" for k, _ in headers)
        head = serialize_request(method, path, headers, chunked)
        conn = await self._acquire(key, label, fresh=False)
        try:
            return await conn.exchange(method, head, body, chunked, informational)
        except StaleConnection:
            # RFC 9112 9.3.1: a request on a connection the origin had already closed may be
            # retried once, on a new connection, when repeating it is harmless (idempotent and
            # without a body we have already consumed).
            if method not in IDEMPOTENT or body is not None:
                raise UpstreamError(502, f"{label} closed the connection without answering",
                                    "ERR_READ_ERROR") from None
        conn = await self._acquire(key, label, fresh=True)
        try:
            return await conn.exchange(method, head, body, chunked, informational)
        except StaleConnection:  # (cannot happen on a fresh connection; kept for the type)
            raise UpstreamError(502, f"{label} closed the connection without answering", "ERR_READ_ERROR") from None

    # ---- the pool -----------------------------------------------------------------------------
    async def _acquire(self, key: PoolKey, label: str, fresh: bool) -> OriginConnection:
        loop = self.loop
        while True:
            if self._closed:
                raise UpstreamError(502, "the proxy is shutting down", "ERR_CONNECT_FAIL")
            h = self._hosts.get(key)
            if h is None:
                h = self._hosts[key] = _Host()
            if h.idle and not fresh:
                now = loop.time()
                keepalive = self.cfg["keepalive_timeout"]
                while h.idle:
                    conn = h.idle.pop()
                    if (now - conn.idle_since < keepalive and conn.state == IDLE
                            and not conn.transport.is_closing()):  # type: ignore[union-attr]
                        conn.reused = True
                        return conn
                    conn.abort()  # expired (the sweeper had not come round yet)
                continue  # aborting may have dropped this host's record: look it up again
            limit = self.cfg["pool_size"]
            per_host = self.cfg["pool_size_per_host"]
            if (not limit or self._live < limit) and (not per_host or h.live < per_host):
                self._live += 1
                h.live += 1
                try:
                    conn = await self._open(key, label)
                except BaseException:
                    self._live -= 1
                    h.live -= 1
                    self._drop_host_if_unused(key, h)
                    self._wake_waiters()
                    raise
                return conn
            if self._evict_idle(h if per_host and h.live >= per_host else None):
                continue
            fut = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)

    async def _open(self, key: PoolKey, label: str) -> OriginConnection:
        # A parent's key is (host, port, "parent"); TLS: (host, port, "tls NAME"), and a fourth
        # member "via PARENT" when the TLS goes through that parent's CONNECT.
        host, port = key[0], key[1]
        tls: dict[str, Any] = {}
        if len(key) > 2 and key[2].startswith(TLS_TAG):
            if self.tls is None:
                self.tls = ssl.create_default_context()
            tls = {"ssl": self.tls, "server_hostname": key[2][len(TLS_TAG):]}
        # Never dropped (one small entry per https origin and parent), so a key naming a parent
        # can never fall back to dialing the origin directly.
        tunnel = self._tunnels[key] if len(key) > 3 else None
        timeout = self.cfg["connect_timeout"] or None
        last: OSError | None = None
        try:
            async with asyncio.timeout(timeout):
                if tunnel is not None:
                    try:
                        sock, _ = await dial_through_parent(tunnel.host, tunnel.port, host, port,
                                                            fields=list(tunnel.fields), timeout=timeout or 3600.0,
                                                            resolve=self.resolver.resolve)
                    except (DialError, TunnelRefused) as e:
                        raise tunnel_failure(e, f"{tunnel.host}:{tunnel.port}", host, port) from None
                    # (nothing can follow a 200 before our ClientHello: a TLS server speaks second)
                    return await self._connect(key, label, tls, sock=sock)
                for _family, ip in await self.resolver.addresses(host, port):
                    try:
                        return await self._connect(key, label, tls, host=ip, port=port)
                    except OSError as e:
                        last = e
        except TimeoutError:
            raise UpstreamError(504, f"timed out connecting to {label}", "ERR_CONNECT_FAIL") from None
        except DNSError as e:
            raise UpstreamError(502, f"cannot resolve {label}: DNS lookup failed ({e.strerror or e})",
                                "ERR_DNS_FAIL") from None
        raise UpstreamError(502, f"cannot connect to {label}: {_why(last)}", "ERR_CONNECT_FAIL")

    async def _connect(self, key: PoolKey, label: str, tls: dict[str, Any], **where: Any) -> OriginConnection:
        """One connection (`host`/`port`, or an already connected `sock`), TLS when `tls` says so.
        A TLS failure is the 502 naming why; other OSErrors are the caller's to try elsewhere."""
        conn = OriginConnection(self, key, label)
        try:
            await self.loop.create_connection(lambda: conn, **where, **tls)
        except ssl.SSLCertVerificationError as e:
            raise UpstreamError(502, f"cannot verify the TLS certificate of {label}: {verify_reason(e)}",
                                "ERR_SECURE_CONNECT_FAIL") from None
        except ssl.SSLError as e:
            raise UpstreamError(502, f"TLS handshake with {label} failed: {e.reason or e}",
                                "ERR_SECURE_CONNECT_FAIL") from None
        self.opened += 1
        return conn

    def give_back(self, conn: OriginConnection) -> None:
        keepalive = self.cfg["keepalive_timeout"]
        h = self._hosts.get(conn.key)
        if self._closed or keepalive <= 0 or h is None:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        h.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(keepalive, self._sweep)
        self._wake_waiters()

    def forget(self, conn: OriginConnection) -> None:
        """Give back the slot of a connection that is gone (exactly once per connection)."""
        if not conn.counted:
            return
        conn.counted = False
        self._live -= 1
        h = self._hosts.get(conn.key)
        if h is not None:
            h.live -= 1
            if conn in h.idle:
                h.idle.remove(conn)
            self._drop_host_if_unused(conn.key, h)
        self._wake_waiters()

    def _drop_host_if_unused(self, key: PoolKey, h: _Host) -> None:
        if h.live <= 0 and self._hosts.get(key) is h:
            del self._hosts[key]

    def _evict_idle(self, only: _Host | None) -> bool:
        """Close the longest-idle connection (of `only`, else of any host) to make room."""
        candidates = [only] if only is not None else list(self._hosts.values())
        oldest: OriginConnection | None = None
        for h in candidates:
            if h.idle and (oldest is None or h.idle[0].idle_since < oldest.idle_since):
                oldest = h.idle[0]
        if oldest is None:
            return False
        oldest.abort()
        return True

    def _wake_waiters(self) -> None:
        # Everyone waiting looks again: a freed slot may fit some waiters and not others.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def _sweep(self) -> None:
        self._sweeper = None
        keepalive = self.cfg["keepalive_timeout"]
        now = self.loop.time()
        earliest = None
        for h in list(self._hosts.values()):
            for conn in list(h.idle):
                if keepalive <= 0 or now - conn.idle_since >= keepalive:
                    conn.abort()
                elif earliest is None or conn.idle_since < earliest:
                    earliest = conn.idle_since
        if earliest is not None:
            self._sweeper = self.loop.call_at(earliest + keepalive, self._sweep)

    def stats(self) -> dict[str, int]:
        return {"live": self._live, "idle": sum(len(h.idle) for h in self._hosts.values()),
                "opened": self.opened}

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for h in list(self._hosts.values()):
            for conn in list(h.idle):
                conn.abort()
        self._wake_waiters()


def _dial(target: Target) -> PoolKey:
    """(host, port) to connect to: the intercepted destination in transparent mode."""
    if target.connect is None:
        return target.host, target.port
    host, _, port = target.connect.rpartition(":")
    return host.strip("[]"), int(port)


def tunnel_failure(e: DialError | TunnelRefused, parent: str, host: str, port: int) -> UpstreamError:
    """A parent's CONNECT that failed, as the client should see it. Unreachable: the next hop may
    be tried (ERR_CONNECT_FAIL); refused: the parent is alive and said no (its status, named)."""
    if isinstance(e, DialError):  # e.status: 504 for a timeout, else 502
        return UpstreamError(e.status, f"cannot connect to parent proxy: {e}", "ERR_CONNECT_FAIL")
    hint = "; check username/password in [[upstream.parent]]" if e.status == 407 else ""
    return UpstreamError(502, f"parent proxy {parent} refused CONNECT {host}:{port}: {e}{hint}", "ERR_CANNOT_FORWARD")


def _why(e: BaseException | None) -> str:
    if e is None:
        return "no address to connect to"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return text if text else type(e).__name__
