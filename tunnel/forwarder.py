"""The standalone TCP port forwarder: one listen address, several upstreams, limits and an ACL.

Per accepted client: check the allowed networks and the limits, pick upstreams in balance order,
connect to the first that answers (failover), relay, then write one log line for the bridge.
The decisions (admit, upstream order, log line) are pure functions below; `Forwarder` is the I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tunnel.acceptor import Acceptor
from tunnel.connect import DialError, Resolver, open_upstream
from tunnel.listeners import ClientCounts, limit_refusal
from tunnel.relay import DEFAULT_BUFFER, RelayResult, relay

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


@dataclass
class ForwarderSettings:
    listen: tuple[str, int]
    upstreams: list[tuple[str, int]]
    balance: str = "round-robin"  # or "least-connections"
    max_connections: int = 1024  # 0 = unlimited
    max_connections_per_client: int = 0  # 0 = unlimited
    when_full: str = "refuse"  # or "wait" (leave new clients in the listen backlog)
    allow_clients: list[Network] = field(default_factory=lambda: list(LOOPBACK))
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0  # 0 = none
    half_close_timeout: float = 60.0  # 0 = none; a bridge with one side finished, idle this long, ends
    engine: str | None = None  # relay engine; None = tunnel.relay.DEFAULT_ENGINE
    buffer_size: int = DEFAULT_BUFFER  # per direction

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> ForwarderSettings:
        """Build from one checked `[[tunnel]]` config entry (webproxy.config LIST_SCHEMA)."""
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in entry.items() if k in known})


# -- decisions ----------------------------------------------------------------------------------

def client_ip(addr: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return _parse_ip(addr[0])


@lru_cache(maxsize=4096)
def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def admit(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: Sequence[Network],
          active: int, active_from_client: int, s: ForwarderSettings) -> str | None:
    """None to accept this client, or the reason to turn it away (for the log line)."""
    if not any(ip in net for net in allow):
        return "denied"
    return limit_refusal(active, active_from_client, s.max_connections, s.max_connections_per_client)


def upstream_order(n: int, active: Sequence[int], next_rr: int, balance: str) -> list[int]:
    """Indexes of the upstreams in the order to try them: the chosen one first, then the rest
    (failover). Least-connections breaks ties round-robin so equal upstreams share the load."""
    rotation = [(next_rr + i) % n for i in range(n)]
    if balance == "least-connections":
        return sorted(rotation, key=lambda i: active[i])  # stable: ties keep rotation order
    return rotation


def fmt_addr(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def log_line(client: Any, upstream: str, result: RelayResult | None, ended: str | None = None,
             kind: str = "tunnel") -> str:
    """One line per bridge: client, upstream, bytes each way (up = client to upstream), duration, end."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if result is None:
        return (f"{stamp} {kind} client={fmt_addr(client)} upstream={upstream} up=0 down=0 "
                f"duration=0.000s end={ended}")
    return (f"{stamp} {kind} client={fmt_addr(client)} upstream={upstream} "
            f"up={result.client_to_upstream} down={result.upstream_to_client} "
            f"duration={result.duration:.3f}s end={ended or result.ended}")


# Settings a running forwarder takes on at once (new bridges; open ones keep what they started with).
LIVE_KEYS = ("allow_clients", "balance", "max_connections", "max_connections_per_client", "when_full",
             "connect_timeout", "idle_timeout", "half_close_timeout")


def reload_plan(old: ForwarderSettings, new: ForwarderSettings) -> tuple[dict[str, Any], list[str]]:
    """A config reload for one forwarder: (the live settings that changed, with their new values;
    the names of changed settings that need a restart: the listen socket, upstreams, engine)."""
    live = {k: getattr(new, k) for k in LIVE_KEYS if getattr(new, k) != getattr(old, k)}
    restart = [k for k in old.__dataclass_fields__
               if k not in LIVE_KEYS and k not in ("engine", "buffer_size") and getattr(new, k) != getattr(old, k)]
    return live, restart


class NoUpstream(Exception):
    """Every upstream failed; the message lists each one's reason."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- I/O ----------------------------------------------------------------------------------------

class Forwarder:
    def __init__(self, settings: ForwarderSettings, *, log: Callable[[str], None] | None = None,
                 resolve: Resolver | None = None) -> None:
        if not settings.upstreams:
            raise ValueError("a tunnel needs at least one upstream")
        self.s = settings
        self.log = log or _stderr
        self.resolve = resolve
        self.acceptor: Acceptor | None = None
        self.tasks: set[asyncio.Task] = set()
        self.counts = ClientCounts()
        self.per_upstream = [0] * len(settings.upstreams)
        self.next_rr = 0
        self.address: tuple[str, int] | None = None

    def start(self) -> None:
        """Bind and start accepting. Raises OSError (EADDRINUSE, EADDRNOTAVAIL, EACCES...)."""
        host, port = self.s.listen
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(sockaddr)
            lsock.listen(1024)
        except BaseException:
            lsock.close()
            raise
        self.address = lsock.getsockname()[:2]
        self.acceptor = Acceptor(lsock, self._on_accept)
        self.acceptor.resume()

    def reconfigure(self, new: ForwarderSettings) -> tuple[list[str], list[str]]:
        """Take on `new`'s live settings (reload_plan); returns (applied, needing a restart)."""
        live, restart = reload_plan(self.s, new)
        for k, v in live.items():
            setattr(self.s, k, v)
        acc = self.acceptor
        if acc is not None and acc.paused and not acc.closed:
            if not self.s.max_connections or self.active < self.s.max_connections or self.s.when_full != "wait":
                acc.resume()
        return list(live), restart

    async def close(self) -> None:
        """Stop accepting and end every bridge."""
        if self.acceptor is not None:
            self.acceptor.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _on_accept(self, sock: socket.socket, addr: Any) -> None:
        ip = client_ip(addr)
        reason = admit(ip, self.s.allow_clients, self.counts.total, self.counts.of(ip), self.s)
        if reason is not None:
            sock.close()
            self.log(log_line(addr, "-", None, reason))
            return
        self.counts.take(ip)
        if self.s.when_full == "wait" and self.s.max_connections and self.counts.total >= self.s.max_connections:
            self.acceptor.pause()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        task = asyncio.ensure_future(self._bridge(sock, addr, ip))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _release(self, ip: Any) -> None:
        self.counts.release(ip)
        if self.acceptor is not None and self.acceptor.paused and not self.acceptor.closed:
            if not self.s.max_connections or self.counts.total < self.s.max_connections:
                self.acceptor.resume()

    async def _connect_any(self) -> tuple[socket.socket, int]:
        ups = self.s.upstreams
        order = upstream_order(len(ups), self.per_upstream, self.next_rr, self.s.balance)
        self.next_rr = (self.next_rr + 1) % len(ups)
        errors = []
        for i in order:
            host, port = ups[i]
            self.per_upstream[i] += 1  # count the attempt, so least-connections sees it at once
            try:
                return await open_upstream(host, port, timeout=self.s.connect_timeout,
                                           resolve=self.resolve), i
            except DialError as e:
                self.per_upstream[i] -= 1
                errors.append(e)
            except BaseException:
                self.per_upstream[i] -= 1
                raise
        raise NoUpstream("; ".join(str(e) for e in errors))

    async def _bridge(self, sock: socket.socket, addr: Any, ip: Any) -> None:
        upstream_name = "-"
        try:
            try:
                upstream, i = await self._connect_any()
            except NoUpstream as e:
                sock.close()
                self.log(log_line(addr, "-", None, f"upstream-failed ({e})"))
                return
            upstream_name = fmt_addr(self.s.upstreams[i])
            try:
                result = await relay(sock, upstream, idle_timeout=self.s.idle_timeout or None,
                                     half_close_timeout=self.s.half_close_timeout or None,
                                     engine=self.s.engine, buffer_size=self.s.buffer_size)
            finally:
                self.per_upstream[i] -= 1
            self.log(log_line(addr, upstream_name, result))
        except asyncio.CancelledError:
            sock.close()
            self.log(log_line(addr, upstream_name, None, "cancelled"))
        except Exception as e:  # e.g. EMFILE creating the upstream socket: drop this client, keep serving
            sock.close()
            self.log(log_line(addr, upstream_name, None, f"error ({e})"))
        finally:
            self._release(ip)


async def serve_forwarders(entries: list[dict[str, Any]], *, log: Callable[[str], None] | None = None,
                           resolve: Resolver | None = None, engine: str | None = None,
                           started: Callable[[list[Forwarder]], None] | None = None) -> None:
    """Run one forwarder per checked `[[tunnel]]` entry until cancelled, then close them all.

    Binding errors (OSError) are raised before anything is served, after closing the ones bound.
    `started` is called with the running forwarders once all are listening.
    """
    forwarders = []
    try:
        for entry in entries:
            settings = ForwarderSettings.from_entry(entry)
            if engine is not None:
                settings.engine = engine
            f = Forwarder(settings, log=log, resolve=resolve)
            try:
                f.start()
            except OSError as e:
                e.listen = settings.listen  # which entry failed, for the caller's message
                raise
            forwarders.append(f)
        if started is not None:
            started(forwarders)
        await asyncio.Event().wait()
    finally:
        await asyncio.gather(*(f.close() for f in forwarders), return_exceptions=True)
