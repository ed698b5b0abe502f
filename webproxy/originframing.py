"""How long an origin's response body is, and whether the response head is acceptable at all:
pure functions of (request method, status, header fields), no sockets.

A proxy that guesses where a response ends hands the next response (or an attacker's bytes) to the
wrong client, and a cache stores it. So every ambiguous shape is refused with 502 instead of being
repaired (RFC 9112 6.3 allows either; refusing is the one that cannot go wrong).
"""

from __future__ import annotations

from webproxy.httpmsg import Headers

# Body framing kinds (RFC 9112 6.3, in the order the rules apply to a response).
NO_BODY = 0  # HEAD, 1xx, 204, 304: the head is the whole message
CHUNKED = 1  # Transfer-Encoding: chunked
LENGTH = 2  # Content-Length
CLOSE = 3  # neither: the body runs until the origin closes the connection


class BadResponse(ValueError):
    """The origin's response cannot be relayed safely; str() says why, for the 502 body."""


def has_bare_cr_lf(value: str) -> bool:
    """A CR or LF inside a field value would split the header when written on (RFC 9110 5.5)."""
    return "\r" in value or "\n" in value


def response_framing(method: str, status: int, headers: Headers) -> tuple[int, int | None]:
    """(kind, length) of the body that follows this response head; BadResponse when the head is
    malformed or its framing ambiguous."""
    if not 100 <= status <= 599:
        raise BadResponse(f"invalid status code {status}")
    if status == 101:
        # We never forward Upgrade, so a switch was not asked for (RFC 9110 15.2.2).
        raise BadResponse("it switched protocols (101) although no upgrade was requested")
    lengths: set[str] = set()
    codings: list[str] = []
    for name, value in headers:
        if has_bare_cr_lf(value):
            raise BadResponse(f"bare CR or LF in the value of its {name[:60]} header")
        n = len(name)
        if n == 14 and name.lower() == "content-length":
            for item in value.split(","):
                lengths.add(item.strip())
        elif n == 17 and name.lower() == "transfer-encoding":
            codings += [c.strip().lower() for c in value.split(",") if c.strip()]
    if lengths and codings:
        # RFC 9112 6.1: the classic request/response smuggling shape; never guess which one wins.
        raise BadResponse("it sent both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise BadResponse("it sent conflicting Content-Length values")  # RFC 9110 8.6
    length = None
    if lengths:
        text = next(iter(lengths))
        if not text.isdigit() or not text.isascii() or len(text) > 18:
            raise BadResponse(f"invalid Content-Length {text[:40]!r}")
        length = int(text)
    if codings and codings != ["chunked"]:
        # Anything but plain chunked would reach the client with its coding removed from the head
        # (Transfer-Encoding is hop-by-hop), so the bytes would be misread; RFC 9112 6.3 rule 4.
        raise BadResponse(f"unsupported transfer coding {', '.join(codings)[:60]!r}")
    if method == "HEAD" or status < 200 or status in (204, 304):
        return NO_BODY, length  # RFC 9112 6.3 rule 1: no body, whatever the fields say (length is news)
    if codings:
        return CHUNKED, None
    if length is not None:
        return LENGTH, length
    return CLOSE, None
