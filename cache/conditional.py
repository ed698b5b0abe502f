"""Validation (RFC 9111 4.3): the conditional request a cache sends, what to do with the answer,
and client conditionals answered from a stored response (RFC 9110 13)."""

from __future__ import annotations

from dataclasses import dataclass

from cache import cachecontrol
from cache.freshness import current_age, directives, freshness_lifetime
from cache.httpdate import parse_http_date
from cache.model import HOP_BY_HOP, Headers, Policy, Request, StoredResponse, get_all, get_one, without
from cache.storable import expected_length

# Client fields that would turn our validation or fill into something we cannot store.
CLIENT_CONDITIONALS = {"if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range", "range"}


def validation_headers(stored: StoredResponse) -> Headers:
    """The validators to send (4.3.1): If-None-Match from the ETag, else If-Modified-Since from
    Last-Modified. Empty when the stored response has neither (then the fetch is unconditional)."""
    etag = stored.etag
    if etag:
        return [("If-None-Match", etag)]
    lm = stored.last_modified
    if lm and parse_http_date(lm) is not None:
        return [("If-Modified-Since", lm)]
    return []


def revalidation_request_headers(request_headers: Headers, stored: StoredResponse) -> Headers:
    """The client's request fields with its own conditionals and Range replaced by our
    validators, so the answer is a 304 or a full response the cache can store."""
    return without(request_headers, CLIENT_CONDITIONALS) + validation_headers(stored)


# --- client conditionals answered from the cache ------------------------------------------------


def _etags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def weak_match(a: str, b: str) -> bool:
    """Weak comparison (RFC 9110 8.8.3.2): the opaque tags match, W/ ignored."""
    return a.removeprefix("W/").strip() == b.removeprefix("W/").strip()


def not_modified(request: Request, stored: StoredResponse) -> bool:
    """Whether a client's If-None-Match / If-Modified-Since lets us answer 304 (RFC 9110 13.2.2):
    If-None-Match decides when present; If-Modified-Since only applies to GET and HEAD."""
    if request.method.upper() not in ("GET", "HEAD") or not 200 <= stored.status < 300:
        # Preconditions are evaluated only when the response would be 2xx (13.2.1).
        return False
    inm = get_all(request.headers, "if-none-match")
    if inm:
        tags = _etags(", ".join(inm))
        if "*" in tags:
            return True
        etag = stored.etag
        return etag is not None and any(weak_match(t, etag) for t in tags)
    ims = parse_http_date(get_one(request.headers, "if-modified-since"))
    if ims is None:
        return False
    lm = parse_http_date(stored.last_modified)
    if lm is None:
        lm = parse_http_date(get_one(stored.headers, "date"))
    if lm is None:
        lm = stored.response_time  # 4.3.2: the time the response was received
    return lm <= ims


# A 304 carries the fields a 200 would have that describe it (RFC 9110 15.4.5); content fields go.
_NOT_IN_304 = {"content-length", "content-range", "content-type", "content-encoding", "transfer-encoding"}


def not_modified_headers(headers: Headers) -> Headers:
    """The fields of a 304 built from the fields of the stored response (Age included)."""
    return [(k, v) for k, v in headers if k.lower() not in _NOT_IN_304]


# --- what to do with the origin's answer --------------------------------------------------------

# Fields a 304 must not change in the stored response (3.2): the body's framing, and fields the
# cache itself removes.
_KEEP_ON_UPDATE = {"content-length", "content-encoding", "content-range"} | HOP_BY_HOP | {"set-cookie", "set-cookie2"}


def merge_304(stored: StoredResponse, response_headers: Headers, request_time: float, response_time: float) -> StoredResponse:
    """The stored response updated by a 304 (3.2): every field the 304 carries replaces the
    stored field of that name (others are kept), and the request/response times are the
    validation's, so freshness starts again from the new Date/Age."""
    incoming = [(k, v) for k, v in response_headers if k.lower() not in _KEEP_ON_UPDATE]
    replaced = {k.lower() for k, _ in incoming}
    merged = [(k, v) for k, v in stored.headers if k.lower() not in replaced] + incoming
    return stored.with_(headers=merged, request_time=request_time, response_time=response_time)


def validator_matches(stored: StoredResponse, response_headers: Headers) -> bool:
    """Whether a 304 describes `stored` (4.3.4): same strong ETag when the 304 has one, else the
    same Last-Modified when it has one; a 304 without validators updates the stored response."""
    etag = get_one(response_headers, "etag")
    if etag is not None:
        return stored.etag is not None and weak_match(etag, stored.etag) and (
            etag.startswith("W/") or not stored.etag.startswith("W/")
        )
    lm = get_one(response_headers, "last-modified")
    if lm is not None:
        return parse_http_date(lm) == parse_http_date(stored.last_modified)
    return True


UPDATE = "update"  # 304 matching the stored response: merge_304, store, serve it
REPLACE = "replace"  # a full response: treat like a miss (store it if storable, serve it)
REFETCH = "refetch"  # a 304 for something else: fetch again without validators
SERVE_STALE = "serve_stale"  # the origin failed and serving stale is allowed
FORWARD_ERROR = "forward_error"  # the origin failed and stale may not be served: pass the error (or 502/504)


@dataclass(frozen=True)
class Outcome:
    action: str
    stored: StoredResponse | None = None


def stale_on_error_allowed(request: Request, stored: StoredResponse, now: float, policy: Policy) -> bool:
    """May `stored` be served stale because the origin failed (4.2.4, 4.3.3, RFC 5861)?
    Never when must-revalidate or proxy-revalidate says no; otherwise within the response's or
    the request's stale-if-error window, or at any staleness when the operator enabled
    serve_stale_on_error (which s-maxage, implying proxy-revalidate, also forbids)."""
    cc = directives(stored)
    if "must-revalidate" in cc or "proxy-revalidate" in cc or ("no-cache" in cc and cc.arg("no-cache") is None):
        return False
    staleness = current_age(stored, now) - freshness_lifetime(stored, policy)
    req = cachecontrol.request_directives(request.headers)
    for d in (cc, req):
        window = d.seconds("stale-if-error")
        if isinstance(window, int) and staleness <= window:
            return True
    return policy.serve_stale_on_error and "s-maxage" not in cc


def revalidation_outcome(
    request: Request,
    stored: StoredResponse,
    status: int | None,
    response_headers: Headers | None,
    request_time: float,
    response_time: float,
    policy: Policy,
) -> Outcome:
    """What the origin's answer to a revalidation means. `status` None: no answer at all."""
    if status is None or status >= 500:
        if stale_on_error_allowed(request, stored, response_time, policy):
            return Outcome(SERVE_STALE, stored)
        return Outcome(FORWARD_ERROR)
    if status == 304:
        headers = response_headers or []
        if not validator_matches(stored, headers):
            return Outcome(REFETCH)
        return Outcome(UPDATE, merge_304(stored, headers, request_time, response_time))
    return Outcome(REPLACE)


def freshen_with_head(
    stored: StoredResponse, response_headers: Headers, request_time: float, response_time: float
) -> StoredResponse | None:
    """4.3.5: a 200 answer to a HEAD sent upstream updates the stored GET response when its
    validators (those it carries) and Content-Length match; None when the stored response must
    be considered stale instead (the caller leaves it, or drops it)."""
    etag = get_one(response_headers, "etag")
    lm = get_one(response_headers, "last-modified")
    if etag is None and lm is None:
        return None
    if etag is not None and (stored.etag is None or etag.strip() != stored.etag.strip()):
        return None
    if lm is not None and parse_http_date(lm) != parse_http_date(stored.last_modified):
        return None
    length = expected_length(response_headers)
    if length is not None and length != stored.body_size:
        return None
    return merge_304(stored, response_headers, request_time, response_time)
