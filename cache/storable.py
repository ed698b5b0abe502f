"""May a response be stored (RFC 9111 section 3), and which of its fields are kept.

Decisions for a shared cache:
- Only GET responses are stored (HEAD is answered from a stored GET; POST responses with
  Content-Location are not reused, which 4.4 allows).
- 206 and 304 are never stored: partial content is not combined (3.3 is optional).
- `private`, with or without field names, is treated as unqualified: storing a response minus the
  named fields is allowed by 5.2.2.7 but rarely what the origin meant, and refusing is safe.
- Set-Cookie: a response that sets a cookie is stored only when the origin explicitly marks it
  shareable (`public` or `s-maxage`), and the stored copy never carries the Set-Cookie field, so one
  user's cookie is never replayed to another (what Varnish and most CDNs do; Squid replays it).
- `no-cache="field"` (5.2.2.4): the named fields are dropped from the stored copy, which makes the
  rest reusable without revalidation.
- A Cache-Control list that does not parse (cache.cachecontrol) is not stored: what it meant
  cannot be known, and guessing errs towards sharing (`private="x` was meant private).
- Interim (1xx) responses are never stored (RFC 9110 15.2: they are not the answer to the
  request), and never merged into a stored final response (cache.transaction).
"""

from __future__ import annotations

from cache import cachecontrol
from cache.model import HOP_BY_HOP, Headers, Request, StoredResponse, get_all, get_one
from cache.vary import secondary_key, vary_names

# 3: cacheable by default (heuristically cacheable, RFC 9110 15.1).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Status codes whose semantics this cache implements (for must-understand, 5.2.2.3).
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 400, 403, 500, 502, 503, 504}


def is_interim(status: int) -> bool:
    """1xx (RFC 9110 15.2): an interim response, passed on to the client and followed by the final
    response on the same request; never a response a cache stores or merges."""
    return status < 200


def has_explicit_freshness(cc: cachecontrol.Directives, headers: Headers) -> bool:
    return "max-age" in cc or "s-maxage" in cc or get_one(headers, "expires") is not None


def why_not_storable(request: Request, status: int, headers: Headers) -> str | None:
    """None when a shared cache may store this response, else the reason it may not."""
    if request.method.upper() != "GET":
        return "method"
    if is_interim(status):
        return "interim"
    if status in (206, 304):
        return "status"
    req = cachecontrol.request_directives(request.headers)
    if "no-store" in req:
        return "request no-store"
    cc = cachecontrol.parse(headers)
    if cc.malformed:
        return "malformed Cache-Control"
    if "must-understand" in cc:
        if status not in UNDERSTOOD_STATUSES:
            return "must-understand"
    elif "no-store" in cc:
        return "no-store"
    if "private" in cc:
        return "private"
    if get_one(request.headers, "authorization") is not None and not (
        "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    ):
        return "authorization"
    if get_one(headers, "set-cookie") is not None and not ("public" in cc or "s-maxage" in cc):
        return "set-cookie"
    if vary_names(headers) == ["*"]:
        return "vary *"  # never matches any request (4.1): storing it is pointless
    if not (has_explicit_freshness(cc, headers) or status in HEURISTIC_STATUSES or "public" in cc):
        return "status not cacheable without explicit freshness"
    return None


def is_storable(request: Request, status: int, headers: Headers) -> bool:
    return why_not_storable(request, status, headers) is None


def headers_to_store(headers: Headers) -> Headers:
    """The fields kept in the stored copy: no hop-by-hop fields (3.1), no Set-Cookie, none named
    by Connection or by a qualified no-cache."""
    drop = set(HOP_BY_HOP) | {"set-cookie", "set-cookie2"}
    for line in get_all(headers, "connection"):
        drop.update(p.strip().lower() for p in line.split(",") if p.strip())
    named = cachecontrol.parse(headers).field_names("no-cache")
    if named:
        drop.update(named)
    # Age stays: it is the age_value of 4.2.3. The Age sent to clients is recomputed on every hit
    # (freshness.serve_headers), never this stored one.
    return [(k, v) for k, v in headers if k.lower() not in drop]


def expected_length(headers: Headers) -> int | None:
    """The Content-Length a complete body must have, or None when the length is unknown or the
    field is unusable (several different values, not a number)."""
    values = {v.strip() for line in get_all(headers, "content-length") for v in line.split(",")}
    if len(values) != 1:
        return None
    (value,) = values
    return int(value) if value.isdigit() else None


def is_complete(headers: Headers, received: int) -> bool:
    """3.1 "incomplete responses": a body shorter (or longer) than its Content-Length."""
    expected = expected_length(headers)
    return expected is None or expected == received


def make_stored(
    request: Request, status: int, reason: str, headers: Headers, request_time: float, response_time: float
) -> StoredResponse:
    """The stored form of an origin response to `request` (fields filtered, Vary values recorded).
    request_time: when the request was sent upstream; response_time: when the head arrived."""
    return StoredResponse(
        status, reason, headers_to_store(headers), request_time, response_time,
        secondary_key(headers, request.headers), None,
    )
