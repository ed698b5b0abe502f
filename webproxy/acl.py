"""Access control decisions: who may use the proxy, which domains and CONNECT ports are allowed,
and connection caps. Pure functions over the config; the front end applies the answers."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the kernel routes it: scope dropped, IPv4-mapped IPv6 as IPv4; None for a name."""
    try:
        addr = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_networks(ip: str, networks: Iterable[Network]) -> bool:
    """Whether an address (IPv4-mapped IPv6 read as IPv4) is in one of `networks`; a name is not."""
    addr = ip_of(ip)
    if addr is None:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


client_allowed = in_networks  # access.allow_clients / admin_clients
destination_denied = in_networks  # access.deny_destinations, on a resolved address


def _suffix_match(host: str, suffixes: Iterable[str]) -> bool:
    host = host.lower().rstrip(".")
    for suffix in suffixes:
        s = suffix.lower().strip(".")
        if host == s or host.endswith("." + s):
            return True
    return False


def domain_denied(host: str, access: dict[str, Any]) -> str | None:
    """Why `host` is refused by the domain filter, or None when it may be fetched.

    Deny wins over allow, as in the CERN proxy's Pass/Fail rules; an empty allow list allows all."""
    if _suffix_match(host, access["deny_domains"]):
        return f"the domain {host} is blocked by this proxy's deny list"
    if access["allow_domains"] and not _suffix_match(host, access["allow_domains"]):
        return f"the domain {host} is not on this proxy's allow list"
    return None


def names_listener(ip: str, port: int, listeners: Iterable[tuple[str, int]], is_local: bool) -> bool:
    """Whether connecting to ip:port reaches one of `listeners` (host, port), under any spelling
    of the address: an unspecified address (0.0.0.0, ::) connects to this host, and a listener on an
    unspecified address answers on every local address (`is_local`: ip is one of this host's)."""
    addr = ip_of(ip)
    if addr is None:
        return False
    for lhost, lport in listeners:
        if lport != port:
            continue
        laddr = ip_of(lhost) if lhost != "localhost" else ipaddress.ip_address("127.0.0.1")
        if laddr is None:
            continue
        if laddr.is_unspecified and (is_local or addr.is_unspecified or addr.is_loopback):
            return True
        if addr == laddr or (addr.is_unspecified and laddr.is_loopback and addr.version == laddr.version):
            return True
    return False


class ConnectionCounter:
    """Counts open client connections, total and per address, against the configured caps."""

    def __init__(self) -> None:
        self.total = 0
        self.per_client: dict[str, int] = {}

    def admit(self, ip: str, access: dict[str, Any]) -> str | None:
        """Count a new connection in, or say why it is refused (the caller then does not release)."""
        if access["max_connections"] and self.total >= access["max_connections"]:
            return f"the proxy is at its limit of {access['max_connections']} connections"
        n = self.per_client.get(ip, 0)
        if access["max_connections_per_client"] and n >= access["max_connections_per_client"]:
            return f"your address {ip} is at its limit of {access['max_connections_per_client']} connections"
        self.total += 1
        self.per_client[ip] = n + 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        n = self.per_client.get(ip, 1) - 1
        if n:
            self.per_client[ip] = n
        else:
            self.per_client.pop(ip, None)
