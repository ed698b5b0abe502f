"""Facts about IP addresses that need the machine's own view: is it one of ours, its plain form."""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache


@lru_cache(maxsize=256)
def is_local_address(ip: str) -> bool:
    """Can we bind this address without IP_TRANSPARENT? Then it belongs to this machine (the
    wildcards 0.0.0.0 and :: included: a connect to them reaches this machine too)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


@lru_cache(maxsize=4096)
def norm_ip(ip: str) -> str:
    """An address as one spelling: no brackets or zone, IPv4-mapped IPv6 as plain IPv4."""
    addr = ipaddress.ip_address(ip.strip("[]").split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return str(addr)
