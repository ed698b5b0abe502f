"""Cache-Control parsing (RFC 9111 5.2), tolerant of what real servers send.

All field lines are combined. Directive names are case-insensitive; arguments may be tokens or
quoted strings (5.2: recipients accept both forms). A directive seen twice is remembered in
`duplicated` so freshness can treat a repeated max-age/s-maxage as invalid (4.2.1: "either the
first occurrence should be used or the response should be considered stale": we choose stale,
the safe reading). Malformed members are skipped rather than failing the whole header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cache.model import Headers, get_all

# 1.2.2: a delta-seconds too large to represent is taken as 2^31.
DELTA_MAX = 2147483648

_MEMBER = re.compile(
    r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"|([^,"\s]*)))?\s*(?:,|$)'
)


class Invalid:
    """Marker for a directive argument that is present but unusable."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = Invalid()


@dataclass
class Directives:
    values: dict[str, str | None] = field(default_factory=dict)
    duplicated: set[str] = field(default_factory=set)

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def arg(self, name: str) -> str | None:
        return self.values.get(name)

    def seconds(self, name: str) -> int | None | Invalid:
        """A delta-seconds argument: int, None when absent, INVALID when malformed or repeated."""
        if name not in self.values:
            return None
        if name in self.duplicated:
            return INVALID
        return parse_delta(self.values[name])

    def field_names(self, name: str) -> set[str] | None:
        """The field-name list of a qualified no-cache/private (lower-case), None if unqualified."""
        arg = self.values.get(name)
        if not arg:
            return None
        names = {n.strip().lower() for n in arg.split(",") if n.strip()}
        return names or None


def parse_delta(arg: str | None) -> int | Invalid:
    if arg is None or not arg.isdigit() or not arg.isascii():
        return INVALID
    return min(int(arg), DELTA_MAX)


def parse_value(value: str) -> Directives:
    d = Directives()
    pos = 0
    while pos < len(value):
        m = _MEMBER.match(value, pos)
        if not m or m.end() == pos:
            # Skip a malformed member up to the next comma.
            nxt = value.find(",", pos)
            if nxt < 0:
                break
            pos = nxt + 1
            continue
        pos = m.end()
        name = m.group(1).lower()
        arg = m.group(2) if m.group(2) is not None else m.group(3)
        if m.group(2) is not None:
            arg = re.sub(r"\\(.)", r"\1", arg)
        if name in d.values:
            d.duplicated.add(name)
            if d.values[name] != arg and name in ("no-cache", "private"):
                # Merge field-name lists; an unqualified one wins (most restrictive).
                a, b = d.values[name], arg
                d.values[name] = None if a is None or b is None else f"{a}, {b}"
            continue
        d.values[name] = arg
    return d


def parse(headers: Headers, name: str = "cache-control") -> Directives:
    """Directives from every `name` field line of `headers`."""
    return parse_value(", ".join(get_all(headers, name)))


def request_directives(headers: Headers) -> Directives:
    """Request directives; `Pragma: no-cache` counts as no-cache only without Cache-Control (5.4)."""
    lines = get_all(headers, "cache-control")
    d = parse_value(", ".join(lines))
    if not lines:
        pragma = ", ".join(get_all(headers, "pragma")).lower()
        if any(p.strip() == "no-cache" for p in pragma.split(",")):
            d.values["no-cache"] = None
    return d
