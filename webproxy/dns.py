"""Name resolution for every outgoing connection (HTTP, FTP, CONNECT tunnels, transparent mode,
port forwarders): one resolver per process on aiodns (c-ares, no thread per lookup), with a TTL
cache and one lookup in flight per name however many requests want it.

IP literals are answered without a lookup. When aiodns cannot be used here (not installed, or
c-ares cannot start), the event loop's getaddrinfo is used instead. The answer keeps the shape
aiohttp's resolvers gave, which the tunnel and transparent code read: a list of dicts with
"hostname", "host" (the address), "port", "family", "proto" and "flags".
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

Address = dict[str, Any]
# (host, port) -> [(family, ip), ...]; raises OSError when the name does not resolve.
Lookup = Callable[[str, int], Awaitable[list[tuple[int, str]]]]

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
MAX_CACHED = 4096  # names; a proxy asked for many distinct hosts must not grow without bound


class DNSError(OSError):
    """The name does not resolve; str() is one line for a person."""


@lru_cache(maxsize=1024)
def ip_literal(host: str) -> tuple[int, str] | None:
    """(family, address) when `host` is an IP address (IPv6 with or without brackets), else None."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))


def _entries(host: str, port: int, found: list[tuple[int, str]]) -> list[Address]:
    return [{"hostname": host, "host": ip, "port": port, "family": family, "proto": 0, "flags": _NUMERIC}
            for family, ip in dict.fromkeys(found)]


async def _getaddrinfo(host: str, port: int) -> list[tuple[int, str]]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DNSError(e.errno, e.strerror or "lookup failed") from None
    return [(family, sockaddr[0]) for family, _, _, _, sockaddr in infos]


def _aiodns_lookup() -> Lookup | None:
    try:
        import aiodns

        resolver = aiodns.DNSResolver(loop=asyncio.get_running_loop())
    except Exception:  # not installed, or c-ares cannot start here (no resolv.conf, ...)
        return None

    async def lookup(host: str, port: int) -> list[tuple[int, str]]:
        try:
            res = await resolver.getaddrinfo(host, port=port, type=socket.SOCK_STREAM)
        except aiodns.error.DNSError as e:
            text = e.args[1] if len(e.args) > 1 else str(e)
            raise DNSError(e.args[0] if e.args else 0, str(text)) from None
        return [(node.family, node.addr[0].decode("ascii")) for node in res.nodes]

    return lookup


class Resolver:
    """`await resolve(host, port)` -> addresses; `ttl` seconds of caching (0: every call looks up).
    `lookup` replaces aiodns/getaddrinfo (tests count lookups through it)."""

    def __init__(self, ttl: float, lookup: Lookup | None = None) -> None:
        self.ttl = ttl
        self._lookup = lookup
        self._cache: dict[str, tuple[float, list[tuple[int, str]]]] = {}
        self._flights: dict[str, asyncio.Future[list[tuple[int, str]]]] = {}
        self.lookups = 0  # names actually looked up (cache misses), for stats and tests

    async def addresses(self, host: str, port: int = 0) -> list[tuple[int, str]]:
        """[(family, ip), ...] for `host`, in the resolver's order; DNSError when there is none."""
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        loop = asyncio.get_running_loop()
        cached = self._cache.get(host)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        flight = self._flights.get(host)
        if flight is not None:
            return await asyncio.shield(flight)
        flight = self._flights[host] = loop.create_future()
        try:
            found = await self._look_up(host, port)
        except BaseException as e:
            exc = e if isinstance(e, Exception) else DNSError(0, "lookup cancelled")
            flight.set_exception(exc)
            flight.exception()  # retrieved: a lone flight must not log "never retrieved"
            raise
        else:
            flight.set_result(found)
            if self.ttl > 0:
                self._cache[host] = (loop.time() + self.ttl, found)
                if len(self._cache) > MAX_CACHED:
                    self._prune(loop.time())
            return found
        finally:
            del self._flights[host]

    async def _look_up(self, host: str, port: int) -> list[tuple[int, str]]:
        self.lookups += 1
        if self._lookup is None:
            self._lookup = _aiodns_lookup() or _getaddrinfo
        try:
            found = await self._lookup(host, port)
        except DNSError:
            raise
        except OSError as e:
            raise DNSError(e.errno or 0, e.strerror or str(e)) from None
        if not found:
            raise DNSError(0, "the name has no addresses")
        return list(dict.fromkeys(found))

    def _prune(self, now: float) -> None:
        """Drop expired answers; past the cap even so, the oldest half (insertion order)."""
        for name in [n for n, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[name]
        if len(self._cache) > MAX_CACHED:
            for name in list(self._cache)[: len(self._cache) // 2]:
                del self._cache[name]

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[Address]:
        """The addresses in aiohttp's resolver shape (tunnels, transparent mode)."""
        found = await self.addresses(host, port)
        if family != socket.AF_UNSPEC:
            found = [a for a in found if a[0] == family]
            if not found:
                raise DNSError(0, "the name has no address of the requested family")
        return _entries(host, port, found)

    async def address(self, host: str, port: int = 0) -> str:
        """One address for FTP control connections: IPv4 when the name has one, since PASV
        (RFC 959) can only name IPv4 data addresses and FTP connects to a single address."""
        found = await self.addresses(host, port)
        return next((ip for family, ip in found if family == socket.AF_INET), found[0][1])

    def clear(self) -> None:
        """Forget every cached answer (a lookup in flight still completes)."""
        self._cache.clear()
