"""The shapes the cache rules work on: headers, a request, a stored response, the policy.

Headers stay a list of (name, value) pairs exactly as received (case preserved, values latin-1
decoded str) so a stored response is replayed as the origin sent it; lookups are case-insensitive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

Headers = list[tuple[str, str]]

# Facts about HTTP messages that the cache and the proxy both use; this is their one home.
# Always hop-by-hop, whatever Connection says (RFC 9110 7.6.1). Proxy-Authorization is for the
# proxy: consumed (or ignored) there and never passed on.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
     "proxy-authenticate", "proxy-authorization"}
)
DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "gopher": 70}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 9.2.1


def get_all(headers: Headers, name: str) -> list[str]:
    """Every value of `name`, in order (field lines are kept separate)."""
    name = name.lower()
    return [v for k, v in headers if k.lower() == name]


def get_one(headers: Headers, name: str) -> str | None:
    """The first value of `name`, or None."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def combined(headers: Headers, name: str) -> str | None:
    """All field lines of a list-valued header joined as one value (RFC 9110 5.3), or None."""
    values = get_all(headers, name)
    if not values:
        return None
    return ", ".join(v.strip() for v in values)


def without(headers: Headers, names: set[str]) -> Headers:
    """`headers` minus the (lower-case) `names`."""
    return [(k, v) for k, v in headers if k.lower() not in names]


@dataclass(slots=True)
class Request:
    method: str
    url: str
    headers: Headers = field(default_factory=list)


@dataclass(frozen=True)
class StoredResponse:
    """A response as the cache keeps it (the body lives in the store).

    `vary` maps each (lower-case) field name the response's Vary lists to the normalised value the
    original request carried (None when the request did not send it). `body_size` is the stored
    body length, None until the body is complete.
    """

    status: int
    reason: str
    headers: Headers
    request_time: float
    response_time: float
    vary: tuple[tuple[str, str | None], ...] = ()
    body_size: int | None = None

    # Derived values are computed once per object: a hot entry is the same object on every hit
    # (memory tier), so parsing its fields is not repeated per request.

    @cached_property
    def etag(self) -> str | None:
        return get_one(self.headers, "etag")

    @cached_property
    def last_modified(self) -> str | None:
        return get_one(self.headers, "last-modified")

    @cached_property
    def memo(self) -> dict[str, Any]:
        """Scratch space for values derived from this response (see freshness, vary)."""
        return {}

    def with_(self, **changes) -> StoredResponse:
        return replace(self, **changes)


@dataclass(frozen=True)
class Policy:
    """Knobs a cache operator sets (config section [cache])."""

    heuristic_fraction: float = 0.1
    heuristic_max: float = 86400.0
    serve_stale_on_error: bool = False
