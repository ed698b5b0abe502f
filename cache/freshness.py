"""Freshness and age (RFC 9111 4.2), for a shared cache. All times are seconds since the epoch
and `now` is always a parameter."""

from __future__ import annotations

from cache import cachecontrol
from cache.cachecontrol import DELTA_MAX, INVALID
from cache.httpdate import parse_http_date
from cache.model import Headers, Policy, StoredResponse, get_all, get_one
from cache.storable import HEURISTIC_STATUSES


def directives(stored: StoredResponse) -> cachecontrol.Directives:
    """The response's Cache-Control, parsed once per stored object."""
    d = stored.memo.get("cc")
    if d is None:
        d = stored.memo["cc"] = cachecontrol.parse(stored.headers)
    return d


def date_value(stored: StoredResponse) -> float:
    """The Date field, or the time of receipt when absent or invalid (HTTP 6.6.1)."""
    v = stored.memo.get("date")
    if v is None:
        d = parse_http_date(get_one(stored.headers, "date"))
        v = stored.memo["date"] = stored.response_time if d is None else d
    return v


def age_value(headers: Headers) -> int:
    """Age field (5.1): the first member of a list, ignored (0) when invalid."""
    lines = get_all(headers, "age")
    if not lines:
        return 0
    first = lines[0].split(",")[0].strip()
    if not first.isdigit() or not first.isascii():
        return 0
    return min(int(first), DELTA_MAX)


def current_age(stored: StoredResponse, now: float) -> float:
    """4.2.3 current_age."""
    corrected_initial_age = stored.memo.get("initial_age")
    if corrected_initial_age is None:
        apparent_age = max(0.0, stored.response_time - date_value(stored))
        response_delay = stored.response_time - stored.request_time
        corrected_age_value = age_value(stored.headers) + response_delay
        corrected_initial_age = stored.memo["initial_age"] = max(apparent_age, corrected_age_value)
    resident_time = now - stored.response_time
    return corrected_initial_age + resident_time


def age_header_value(stored: StoredResponse, now: float) -> str:
    """The Age to send with a stored response served at `now` (whole seconds, capped as 1.2.2)."""
    return str(min(DELTA_MAX, max(0, int(current_age(stored, now)))))


def serve_headers(stored: StoredResponse, now: float) -> list[tuple[str, str]]:
    """The stored fields with the stored Age replaced by the current one."""
    base = stored.memo.get("no_age")
    if base is None:
        base = stored.memo["no_age"] = [(k, v) for k, v in stored.headers if k.lower() != "age"]
    return [*base, ("Age", age_header_value(stored, now))]


def expires_lifetime(headers: Headers, stored_date: float) -> float | None:
    """Expires minus Date; 0 when Expires is invalid or given twice with different values
    (5.3: invalid dates mean "already expired"); None when absent."""
    lines = get_all(headers, "expires")
    if not lines:
        return None
    if len({v.strip() for v in lines}) > 1:
        return 0.0
    expires = parse_http_date(lines[0])
    if expires is None:
        return 0.0
    return max(0.0, expires - stored_date)


def heuristic_allowed(stored: StoredResponse, cc: cachecontrol.Directives | None = None) -> bool:
    """4.2.2: only without explicit freshness, and only for heuristically cacheable status codes
    or responses marked `public`."""
    cc = cc if cc is not None else directives(stored)
    if "max-age" in cc or "s-maxage" in cc or get_one(stored.headers, "expires") is not None:
        return False
    return stored.status in HEURISTIC_STATUSES or "public" in cc


def heuristic_lifetime(stored: StoredResponse, policy: Policy) -> float:
    """A fraction of the time since Last-Modified (4.2.2), capped by policy.heuristic_max."""
    lm = parse_http_date(stored.last_modified)
    if lm is None:
        return 0.0
    since = date_value(stored) - lm
    if since <= 0:
        return 0.0
    return min(policy.heuristic_max, since * policy.heuristic_fraction)


def freshness_lifetime(stored: StoredResponse, policy: Policy) -> float:
    """4.2.1, shared cache: s-maxage, then max-age, then Expires - Date, then the heuristic.
    A malformed or repeated s-maxage/max-age makes the response stale (lifetime 0)."""
    key = ("lifetime", policy)
    v = stored.memo.get(key)
    if v is None:
        v = stored.memo[key] = _freshness_lifetime(stored, policy)
    return v


def _freshness_lifetime(stored: StoredResponse, policy: Policy) -> float:
    cc = directives(stored)
    for name in ("s-maxage", "max-age"):
        secs = cc.seconds(name)
        if secs is INVALID:
            return 0.0
        if secs is not None:
            return float(secs)
    expires = expires_lifetime(stored.headers, date_value(stored))
    if expires is not None:
        return expires
    if heuristic_allowed(stored, cc):
        return heuristic_lifetime(stored, policy)
    return 0.0


def is_fresh(stored: StoredResponse, now: float, policy: Policy) -> bool:
    return freshness_lifetime(stored, policy) > current_age(stored, now)


def stale_at(stored: StoredResponse, policy: Policy) -> float:
    """The wall-clock time at which `stored` becomes stale (used to rank entries for eviction)."""
    return stored.response_time + freshness_lifetime(stored, policy) - current_age(stored, stored.response_time)
