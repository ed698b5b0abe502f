"""Parent proxies (Squid's `cache_peer HOST PORT 0 parent`, `never_direct`, `always_direct`): which
hops a request tries, in which order, and how long a failed parent is left alone. Pure: functions
of (host, the [upstream] config, the down-table, now); the I/O that follows the plan is in
`webproxy.parentpath`.

    host in upstream.always_direct            -> DIRECT only
    parents whose `domains` match (empty: all) -> the candidates
      parent_selection = "first-up"            -> in config order (Squid's FIRSTUP_PARENT; a single
                                                  candidate is logged DEFAULT_PARENT)
      parent_selection = "weighted"            -> weighted rendezvous hash of the host (Squid's CARP:
                                                  each site lives in one parent's cache, shares
                                                  follow `weight`, a lost parent moves only its own)
    the candidates that are up, in that order, then DIRECT unless upstream.never_direct
    (under never_direct the parents marked down are still tried last: better a fast refusal than
    a 502 for a parent that is back)
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from webproxy import logcodes
from webproxy.acl import _suffix_match, ip_of, names_listener
from webproxy.config import ConfigError

# A failed parent is skipped for `parent_down_time` seconds, doubled for each further failure in a
# row, up to this many times that (Squid re-probes dead peers on a similar back-off).
MAX_BACKOFF = 8


@dataclass(frozen=True, slots=True)
class Parent:
    host: str
    port: int
    domains: tuple[str, ...] = ()
    weight: int = 1
    # The Proxy-Authorization value for this parent: a secret, kept out of repr() and logs.
    authorization: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def fields(self) -> list[tuple[str, str]]:
        """Header fields this parent gets on every request (RFC 9110 11.7.2)."""
        return [("Proxy-Authorization", self.authorization)] if self.authorization else []


DIRECT = None  # the hop "go to the origin ourselves"
Hop = Parent | None


@dataclass(frozen=True, slots=True)
class Plan:
    hops: tuple[Hop, ...]
    code: str  # the hierarchy code a parent hop is logged under (FIRSTUP_PARENT, DEFAULT_PARENT, CARP)
    reason: str = ""  # why there is no hop at all (for the 502 body)

    @property
    def direct_only(self) -> bool:
        return self.hops == (DIRECT,)


ONLY_DIRECT = Plan((DIRECT,), logcodes.FIRSTUP_PARENT)


def parse_parents(up: Mapping[str, Any]) -> tuple[Parent, ...]:
    """The checked `[[upstream.parent]]` tables of the [upstream] section as Parents. Raises
    ConfigError."""
    if up["never_direct"] and not up["parent"]:
        raise ConfigError("config: 'upstream.never_direct' is set but no [[upstream.parent]] is configured; "
                          "add a parent or set never_direct = false")
    out = []
    for i, e in enumerate(up["parent"]):
        host, port = e["address"]
        where = f"config: 'upstream.parent[{i}]'"
        if port == 0:
            raise ConfigError(f"{where}: address {host}:0 has no port; write \"host:port\" (e.g. \"proxy.example:3128\")")
        if e["password"] and not e["username"]:
            raise ConfigError(f"{where}: a password without a username; set username too (or remove password)")
        if ":" in e["username"]:
            raise ConfigError(f"{where}: a username cannot contain ':' (RFC 7617 Basic credentials)")
        auth = None
        if e["username"]:
            token = base64.b64encode(f"{e['username']}:{e['password']}".encode()).decode("ascii")
            auth = f"Basic {token}"
        domains = tuple(d.lower().strip(".") for d in e["domains"] if d.strip("."))
        out.append(Parent(host.lower(), port, domains, e["weight"], auth))
    return tuple(out)


def self_parent(parents: Sequence[Parent], listen: Iterable[tuple[str, int]],
                is_local: Callable[[str], bool]) -> Parent | None:
    """The first parent that is this proxy itself (one of its listen addresses), else None.
    `is_local(ip)`: whether ip is an address of this host. Names other than localhost are not
    resolved here; the Via loop check catches those on the first request."""
    listen = list(listen)
    for p in parents:
        ip = "127.0.0.1" if p.host == "localhost" else p.host
        if ip_of(ip) is not None and names_listener(ip, p.port, listen, is_local(ip)):
            return p
    return None


def check(up: Mapping[str, Any], listen: Iterable[tuple[str, int]], is_local: Callable[[str], bool]) -> None:
    """Start-up and `run --check`: the parents parse, and none of them is this proxy (a request
    would loop until the Via check stopped it, and every miss would fail). Raises ConfigError."""
    me = self_parent(parse_parents(up), listen, is_local)
    if me is not None:
        raise ConfigError(f"config: 'upstream.parent' {me.name} is this proxy's own listen address "
                          "(server.listen); a parent must be another proxy")


def _score(host: str, p: Parent) -> float:
    """Weighted rendezvous hashing (Schindelhauer/Schomaker): -weight / ln(h), h uniform in (0, 1)."""
    if p.weight <= 0:
        return -math.inf
    digest = hashlib.blake2b(f"{p.name} {host}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -p.weight / math.log(h)


def select(host: str, up: Mapping[str, Any], parents: Sequence[Parent], down: Mapping[str, float],
           now: float, intercepted: bool = False) -> Plan:
    """The hops to try for a request to `host`, in order. `down`: parent name -> until when it is
    skipped. `intercepted`: a transparently redirected request, which goes only to its original
    destination."""
    if intercepted or not parents or _suffix_match(host, up["always_direct"]):
        return ONLY_DIRECT
    candidates = [p for p in parents if not p.domains or _suffix_match(host, p.domains)]
    if not candidates:
        if up["never_direct"]:
            names = ", ".join(p.name for p in parents)
            return Plan((), logcodes.FIRSTUP_PARENT,
                        f"no parent proxy serves {host} (upstream.never_direct is set and the "
                        f"parents {names} each list other domains)")
        return ONLY_DIRECT
    if up["parent_selection"] == "weighted":
        candidates.sort(key=lambda p: _score(host, p), reverse=True)
        code = logcodes.CARP
    else:
        code = logcodes.DEFAULT_PARENT if len(candidates) == 1 else logcodes.FIRSTUP_PARENT
    alive = [p for p in candidates if down.get(p.name, 0.0) <= now]
    if up["never_direct"]:
        dead = sorted((p for p in candidates if p not in alive), key=lambda p: down[p.name])
        return Plan((*alive, *dead), code)
    return Plan((*alive, DIRECT), code)


class DownTable:
    """Which parents failed recently and until when they are skipped. Explicit `now` (monotonic
    seconds), so the rule is tested without a clock."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self.strikes: dict[str, int] = {}

    def failed(self, name: str, now: float, down_time: float) -> float:
        """Mark `name` down; returns for how many seconds."""
        strikes = self.strikes.get(name, 0) + 1
        self.strikes[name] = strikes
        period = down_time * min(2 ** (strikes - 1), MAX_BACKOFF)
        self.until[name] = now + period
        return period

    def succeeded(self, name: str) -> None:
        if name in self.strikes:
            del self.strikes[name]
            self.until.pop(name, None)


def unreachable(host: str, failures: Sequence[tuple[Parent, str]], never_direct: bool) -> str:
    """The 502 body when every hop failed: each parent named with what went wrong."""
    tried = "; ".join(f"parent proxy {p.name}: {why}" for p, why in failures)
    rule = " (upstream.never_direct: not going direct)" if never_direct else ""
    return f"cannot reach {host} through any parent proxy{rule}: {tried}"
