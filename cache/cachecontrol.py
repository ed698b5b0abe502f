"""Cache-Control parsing (RFC 9111 5.2), tolerant of what real servers send.

All field lines are combined. Directive names are case-insensitive; arguments may be tokens or
quoted strings (5.2: recipients accept both forms). A directive seen twice is remembered in
`duplicated` so freshness can treat a repeated max-age/s-maxage as invalid (4.2.1: "either the
first occurrence should be used or the response should be considered stale": we choose stale,
the safe reading).

A list that does not parse as `#( token [ "=" ( token / quoted-string ) ] )` (RFC 9111 5.2, list
syntax RFC 9110 5.6.1: empty members and OWS around them are fine, and so is whitespace around
"=", which is unambiguous) sets `malformed`; a shared cache does not store such a response
(cache.storable), since it cannot tell what was meant: `private="unterminated` was meant private.
The members that do parse are still read, and a malformed member that starts with a directive
name still counts as that directive (its argument unusable), so a request's `no-store;` is not lost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cache.model import Headers, get_all

# 1.2.2: a delta-seconds too large to represent is taken as 2^31.
DELTA_MAX = 2147483648

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEMBER = re.compile(rf'[ \t]*({_TOKEN})(?:[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN})))?[ \t]*(?:,|$)')
_EMPTY = re.compile(r"[ \t]*(?:,|$)")  # an empty list member (RFC 9110 5.6.1.2: accepted)
_NAME = re.compile(rf"[ \t]*({_TOKEN})[ \t]*(=?)")


class Invalid:
    """Marker for a directive argument that is present but unusable."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = Invalid()


@dataclass
class Directives:
    values: dict[str, str | None] = field(default_factory=dict)
    duplicated: set[str] = field(default_factory=set)
    malformed: bool = False  # some member did not parse (see the module docstring)

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
    pos, end = 0, len(value)
    while pos < end:
        m = _EMPTY.match(value, pos)
        if m and m.end() > pos:
            pos = m.end()
            continue
        m = _MEMBER.match(value, pos)
        if m:
            pos = m.end()
            name = m.group(1).lower()
            arg = m.group(2) if m.group(2) is not None else m.group(3)
            if m.group(2) is not None:
                arg = re.sub(r"\\(.)", r"\1", arg)
        else:
            # Not a directive: note it, and keep its name (if it starts with one) with the raw,
            # unusable rest as argument, up to the next comma.
            d.malformed = True
            nxt = value.find(",", pos)
            nxt = end if nxt < 0 else nxt
            named = _NAME.match(value, pos, nxt)
            pos = nxt + 1
            if named is None:
                continue
            name = named.group(1).lower()
            arg = value[named.end() : nxt].strip() if named.group(2) else None
        _add(d, name, arg)
    return d


def _add(d: Directives, name: str, arg: str | None) -> None:
    if name in d.values:
        d.duplicated.add(name)
        if d.values[name] != arg and name in ("no-cache", "private"):
            # Merge field-name lists; an unqualified one wins (most restrictive).
            a, b = d.values[name], arg
            d.values[name] = None if a is None or b is None else f"{a}, {b}"
        return
    d.values[name] = arg


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
