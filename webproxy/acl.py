"""Access control decisions: who may use the proxy, which domains and CONNECT ports are allowed,
and connection caps. Pure functions over the config; the front end applies the answers."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_allowed(ip: str, networks: Iterable[Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


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
