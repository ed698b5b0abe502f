"""The lookup decision (RFC 9111 4): given a request, the stored response that matched its URL
(or None), the time and the policy, what the front end does next. Pure: no I/O.

    d = decide(request, stored, now, policy)
    MISS                    fetch from the origin; store the answer if storable.is_storable
    HIT                     serve d.stored with head_for(d, now) (status 200, 206, 304 or 416)
    REVALIDATE              fetch with conditional.revalidation_request_headers(...); then
                            conditional.revalidation_outcome(...)
    STALE_WHILE_REVALIDATE  serve as HIT now and revalidate in the background
    ONLY_IF_CACHED_MISS     answer 504 (only-if-cached could not be satisfied)
    PASS                    forward without using or storing the cache (unsafe methods, several
                            ranges, If-Match...); run invalidation afterwards for unsafe methods
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from cache import cachecontrol, ranges, vary
from cache.cachecontrol import parse_delta
from cache.conditional import not_modified, not_modified_headers, validation_headers
from cache.freshness import age_header_value, current_age, directives, freshness_lifetime, serve_headers
from cache.model import Headers, Policy, Request, StoredResponse, get_one


class Action(StrEnum):
    MISS = "MISS"
    HIT = "HIT"
    REVALIDATE = "REVALIDATE"
    STALE_WHILE_REVALIDATE = "STALE_WHILE_REVALIDATE"
    ONLY_IF_CACHED_MISS = "ONLY_IF_CACHED_MISS"
    PASS = "PASS"


@dataclass(slots=True)
class Decision:
    action: Action
    stored: StoredResponse | None = None
    status: int = 200  # what to answer when serving from the cache (200, 206, 304, 416, 504)
    byte_range: ranges.ByteRange | None = None  # for 206: the body slice to send
    validation_headers: Headers = field(default_factory=list)  # for REVALIDATE / background refresh
    reason: str = ""


# Request fields that change a decision; most requests carry none of them, and then the
# directive parsing and conditional checks below are skipped.
_RELEVANT = frozenset(
    {"cache-control", "pragma", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "range"}
)
_NO_DIRECTIVES = cachecontrol.Directives()


def _present(request: Request) -> set[str] | frozenset[str]:
    if not request.headers:
        return frozenset()
    return {k.lower() for k, _ in request.headers} & _RELEVANT


def is_plain(request: Request) -> bool:
    """A GET that carries none of the fields that change a decision (no Cache-Control, Pragma,
    conditionals or Range): most requests, and the only kind `plain_hit_until` speaks for."""
    return request.method == "GET" and not _present(request)


def plain_hit_until(stored: StoredResponse, policy: Policy) -> float:
    """Until when `decide` answers a plain request (is_plain) with HIT 200 from `stored`: its
    age grows one second per second, so it is fresh until a fixed time (RFC 9111 4.2). 0 when
    never: not a 200, a Vary (the answer depends on the request's fields), or no-cache (always
    revalidated, 5.2.2.4). Remembered per stored response and policy: the hit path asks this
    instead of running the whole decision for every request."""
    memo = stored.memo.get("plain_hit_until")
    if memo is not None and memo[0] is policy:
        return memo[1]
    until = 0.0
    if stored.status == 200 and not vary.names_of(stored):
        cc = directives(stored)
        if not ("no-cache" in cc and cc.arg("no-cache") is None):
            ref = stored.response_time
            until = ref + freshness_lifetime(stored, policy) - current_age(stored, ref)
    stored.memo["plain_hit_until"] = (policy, until)
    return until


def decide(request: Request, stored: StoredResponse | None, now: float, policy: Policy) -> Decision:
    method = request.method.upper()
    if method not in ("GET", "HEAD"):
        return Decision(Action.PASS, reason="method")
    present = _present(request)
    if "cache-control" in present or "pragma" in present:
        req = cachecontrol.request_directives(request.headers)
    else:
        req = _NO_DIRECTIVES
    only_if_cached = "only-if-cached" in req
    if stored is not None and not vary.matches(stored, request.headers):
        stored = None
    if stored is None:
        if only_if_cached:
            return Decision(Action.ONLY_IF_CACHED_MISS, status=504, reason="not cached")
        return Decision(Action.MISS, reason="not cached")
    if "if-match" in present or "if-unmodified-since" in present:
        return Decision(Action.PASS, stored, reason="write precondition")

    cc = directives(stored)
    if "no-cache" in req:
        return _revalidate(stored, only_if_cached, "request no-cache")
    if "no-cache" in cc and cc.arg("no-cache") is None:
        return _revalidate(stored, only_if_cached, "response no-cache")

    age = current_age(stored, now)
    lifetime = freshness_lifetime(stored, policy)
    fresh = lifetime > age
    acceptable = fresh
    # RFC 8246: a fresh immutable response satisfies a reload (max-age=0), not a forced one (no-cache).
    max_age = req.seconds("max-age")
    if isinstance(max_age, int) and age > max_age and not (fresh and "immutable" in cc):
        acceptable = False
    min_fresh = req.seconds("min-fresh")
    if isinstance(min_fresh, int) and lifetime - age < min_fresh:
        acceptable = False
    if acceptable:
        return respond(request, stored, reason="fresh", present=present)

    staleness = age - lifetime
    # s-maxage implies proxy-revalidate for a shared cache (5.2.2.10).
    forbid_stale = "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
    if not fresh and not forbid_stale and "max-stale" in req:
        limit = req.arg("max-stale")
        ok = limit is None or (isinstance(parse_delta(limit), int) and staleness <= parse_delta(limit))
        if ok and not isinstance(min_fresh, int):
            return respond(request, stored, reason="max-stale")
    if only_if_cached:
        return Decision(Action.ONLY_IF_CACHED_MISS, stored, status=504, reason="stale")
    swr = cc.seconds("stale-while-revalidate")
    # An explicit stale-while-revalidate is honoured with s-maxage (the usual CDN pairing), but not
    # against must-revalidate/proxy-revalidate, nor when the client asked for fresher than stored.
    if (
        not fresh
        and isinstance(swr, int)
        and staleness <= swr
        and "must-revalidate" not in cc
        and "proxy-revalidate" not in cc
        and max_age is None
        and min_fresh is None
    ):
        served = respond(request, stored, reason="stale-while-revalidate")
        if served.action is Action.HIT:
            return Decision(
                Action.STALE_WHILE_REVALIDATE, stored, served.status, served.byte_range,
                validation_headers(stored), "stale-while-revalidate",
            )
    return _revalidate(stored, False, "stale")


def _revalidate(stored: StoredResponse, only_if_cached: bool, reason: str) -> Decision:
    if only_if_cached:
        return Decision(Action.ONLY_IF_CACHED_MISS, stored, status=504, reason=reason)
    return Decision(Action.REVALIDATE, stored, validation_headers=validation_headers(stored), reason=reason)


def respond(request: Request, stored: StoredResponse, reason: str = "", present: set[str] | frozenset[str] | None = None) -> Decision:
    """How to answer `request` from `stored` once it may be used: 304 for a matching client
    conditional, 206/416 for a single Range on a complete 200, PASS for several ranges, else 200."""
    if present is None:
        present = _present(request)
    if not present:
        return Decision(Action.HIT, stored, stored.status, reason=reason)
    if not_modified(request, stored):
        return Decision(Action.HIT, stored, 304, reason=reason)
    value = get_one(request.headers, "range")
    if value is not None and request.method.upper() == "GET" and stored.status == 200 and stored.body_size is not None:
        if_range = get_one(request.headers, "if-range")
        if if_range is None or ranges.if_range_matches(if_range, stored):
            r = ranges.parse_range(value, stored.body_size)
            if r == ranges.MULTIPLE:
                return Decision(Action.PASS, stored, reason="multiple ranges")
            if r == ranges.UNSATISFIABLE:
                return Decision(Action.HIT, stored, 416, reason=reason)
            if isinstance(r, ranges.ByteRange):
                return Decision(Action.HIT, stored, 206, r, reason=reason)
        # If-Range mismatch: the client's copy is outdated, send the whole current one (13.1.5).
    return Decision(Action.HIT, stored, stored.status, reason=reason)


# Framing fields are the cache's own to write (the stored body's length). Content-Range is not one:
# on a stored response it is a field like any other, stored and returned (RFC 9111 3.1), and only
# replaced where the cache answers a range itself (206, 416).
_NO_LENGTH = {"content-length", "transfer-encoding"}


def head_for(decision: Decision, now: float) -> tuple[int, str, Headers]:
    """Status, reason and fields to send when serving `decision.stored` at `now` (Age recomputed,
    Content-Length from the stored body size, Content-Range for 206/416). The body to send is the
    whole stored body, or decision.byte_range of it for 206, nothing for 304/416 and HEAD."""
    stored = decision.stored
    assert stored is not None
    age = ("Age", age_header_value(stored, now))
    if decision.status == 304:
        return 304, "Not Modified", not_modified_headers(serve_headers(stored, now))
    size = stored.body_size or 0
    base = stored.memo.get("no_length")
    if base is None:
        drop = _NO_LENGTH | {"age"}
        base = stored.memo["no_length"] = [(k, v) for k, v in stored.headers if k.lower() not in drop]
    base = [*base, age]
    if decision.status == 206:
        r = decision.byte_range
        assert r is not None
        base = [(k, v) for k, v in base if k.lower() != "content-range"]
        return 206, "Partial Content", base + [("Content-Range", r.content_range(size)), ("Content-Length", str(r.length))]
    if decision.status == 416 and stored.status != 416:  # our answer to an unsatisfiable range
        keep = [(k, v) for k, v in base if k.lower() in ("date", "age", "etag", "last-modified", "cache-control")]
        return 416, "Range Not Satisfiable", keep + [("Content-Range", f"bytes */{size}"), ("Content-Length", "0")]
    if stored.status == 204 or stored.status == 304 or stored.status < 200:
        return stored.status, stored.reason, base
    return stored.status, stored.reason, base + [("Content-Length", str(size))]
