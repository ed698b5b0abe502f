"""Vary: secondary cache keys (RFC 9111 4.1).

A stored response is chosen only when every request field its Vary names matches the one the
original request carried. Values are normalised as 4.1 allows: field lines combined, whitespace
around list separators removed, and case folded for fields whose members are case-insensitive
tokens (so `gzip, br` and `GZIP,br` select the same variant).
"""

from __future__ import annotations

from cache.model import Headers, StoredResponse, get_all

# Fields whose values are lists of case-insensitive tokens (with parameters), safe to lower-case.
CASE_INSENSITIVE = {"accept-encoding", "accept-language", "accept-charset", "te", "connection"}


def vary_names(headers: Headers) -> list[str]:
    """The lower-case field names a response's Vary lists, in order, without duplicates.
    ["*"] when it contains "*"."""
    names: list[str] = []
    for line in get_all(headers, "vary"):
        for part in line.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part == "*":
                return ["*"]
            if part not in names:
                names.append(part)
    return names


def normalise(headers: Headers, name: str) -> str | None:
    """The normalised value of request field `name`, or None when absent."""
    lines = get_all(headers, name)
    if not lines:
        return None
    members = []
    for line in lines:
        for part in line.split(","):
            part = " ".join(part.split())
            if part:
                members.append(part.replace(" ;", ";").replace("; ", ";"))
    value = ",".join(members)
    return value.lower() if name in CASE_INSENSITIVE else value


def secondary_key(response_headers: Headers, request_headers: Headers) -> tuple[tuple[str, str | None], ...]:
    """The (name, normalised request value) pairs a stored response must match."""
    return tuple((n, normalise(request_headers, n)) for n in vary_names(response_headers) if n != "*")


def names_of(stored: StoredResponse) -> list[str]:
    """The field names `stored`'s Vary lists (["*"] for Vary: *), parsed once per stored response."""
    names = stored.memo.get("vary")
    if names is None:
        names = stored.memo["vary"] = vary_names(stored.headers)
    return names


def matches(stored: StoredResponse, request_headers: Headers) -> bool:
    """Whether `stored` may be used for a request with `request_headers` (4.1)."""
    names = names_of(stored)
    if not names:
        return True
    if names == ["*"]:
        return False
    recorded = dict(stored.vary)
    return all(normalise(request_headers, n) == recorded.get(n) for n in names)


def signature(pairs: tuple[tuple[str, str | None], ...]) -> str:
    """A stable string for a secondary key (used in store keys); absent and empty differ."""
    return "\x1f".join(f"{n}={'' if v is None else '=' + v}" for n, v in pairs)
