"""The HTTP/1 rules of the client side, as pure functions and data: how a request is framed, when
a connection stays open, how a response is framed, and the connection's lifecycle. No sockets:
`webproxy.frontend` carries these out, and `tests/test_http1.py` pins them without any I/O.

"When does this connection close?" is answered here and nowhere else: `keep_open`.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

Headers = list[tuple[str, str]]



class Refusal(NamedTuple):
    status: int
    message: str


# ---- request framing -----------------------------------------------------------------------------
def request_framing_refusal(headers: Headers, version: str = "1.1") -> Refusal | None:
    """The request-smuggling shapes llhttp may let through (RFC 9112 6.1, 6.3), else None."""
    cls = {v.strip() for k, v in headers if k.lower() == "content-length"}
    tes = [v for k, v in headers if k.lower() == "transfer-encoding"]
    if tes and version == "1.0":
        # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (a classic
        # smuggling shape: an old intermediary would read the body differently).
        return Refusal(400, "an HTTP/1.0 request cannot use Transfer-Encoding")
    if cls and tes:
        return Refusal(400, "the request has both Content-Length and Transfer-Encoding")
    if len(cls) > 1:
        return Refusal(400, "the request has conflicting Content-Length values")
    for v in cls:
        if not v.isdigit():
            return Refusal(400, f"bad Content-Length {v!r}")
    if tes:
        codings = [c.strip().lower() for t in tes for c in t.split(",")]
        if codings[-1] != "chunked" or codings.count("chunked") != 1:
            return Refusal(400, "Transfer-Encoding must end in a single 'chunked'")
        if len(codings) > 1:
            # A coding before chunked (gzip, chunked) would have to be decoded or passed on as it
            # is; this proxy does neither, so it refuses rather than forward the bytes as identity
            # (RFC 9112 6.1: 501 for a transfer coding the server does not implement), as Squid does.
            return Refusal(501, f"this proxy does not implement the transfer coding {', '.join(codings[:-1])!r}")
    return None


def content_length(headers: Headers) -> int | None:
    for k, v in headers:
        if k.lower() == "content-length":
            try:
                return int(v.strip())
            except ValueError:
                return None
    return None


def expectation_refusal(value: str) -> Refusal | None:
    """Only 100-continue is an expectation we meet (RFC 9110 10.1.1): anything else is 417."""
    if value.strip().lower() == "100-continue":
        return None
    return Refusal(417, f"this proxy does not support the expectation {value!r}")


def wants_keep_alive(version: str, headers: Headers, parser_keep_alive: bool) -> bool:
    """Whether the client asked for a persistent connection (RFC 9112 9.3). llhttp reads
    `Connection`; clients configured for a proxy may say it with the older `Proxy-Connection`
    instead (HTTP/1.0 keep-alive through a proxy), and `Proxy-Connection: close` always closes."""
    keep = parser_keep_alive
    for k, v in headers:
        if k.lower() == "proxy-connection":
            token = v.strip().lower()
            if token == "close":
                return False
            if token == "keep-alive" and version == "1.0":
                keep = True
    return keep


# ---- response framing ------------------------------------------------------------------------------
class Framing(Enum):
    NO_BODY = "no-body"  # HEAD, 1xx, 204, 304, or a head-only answer
    LENGTH = "length"  # Content-Length
    CHUNKED = "chunked"  # HTTP/1.1 client, length unknown
    CLOSE = "close"  # HTTP/1.0 client, length unknown: the end of the body is the end of the connection


def response_framing(method: str, status: int, version: str, length: int | None, has_body: bool = True) -> Framing:
    """How the body of a response to this request is delimited (RFC 9112 6.3)."""
    if not has_body or method == "HEAD" or status in (204, 304) or status < 200:
        return Framing.NO_BODY
    if length is not None:
        return Framing.LENGTH
    return Framing.CHUNKED if version == "1.1" else Framing.CLOSE


def length_field_for_bodiless(status: int, length: int | None) -> bool:
    """A HEAD (or head-only) answer still carries the Content-Length a GET would (RFC 9110 8.6),
    except where the status forbids one (1xx, 204)."""
    return length is not None and status >= 200 and status != 204


# ---- persistence -----------------------------------------------------------------------------------
def keep_open(wants: bool, draining: bool, served: int, max_requests: int, framing: Framing | None = None,
              body_unread: bool = False, forced_close: bool = False) -> bool:
    """Whether the client connection stays open after this answer: the client asked for it, the
    proxy is not shutting down, the per-connection request limit is not reached, the body is not
    close-delimited, and the request body was read to its end (else the framing of what follows
    is lost, RFC 9112 9.3)."""
    if not wants or draining or forced_close or body_unread or framing is Framing.CLOSE:
        return False
    return not (max_requests and served >= max_requests)


def answer_after_eof(in_message: bool, requests_waiting: bool) -> bool:
    """The client half-closed (FIN): answer what it sent, then close? Yes when complete requests
    are waiting and none is cut off: a FIN says "no more data from me" (RFC 9293 3.6), not "abort",
    so a request followed by FIN is answered (RFC 9112 9.6 leaves closing to the answer's end).
    A FIN inside a message (a head or body cut short) or with nothing to answer just closes."""
    return requests_waiting and not in_message


def connection_field(version: str, keep: bool) -> bytes:
    """The Connection line (and the blank line) ending a response head: HTTP/1.0 needs an explicit
    keep-alive, HTTP/1.1 an explicit close; otherwise nothing."""
    if version == "1.0":
        return b"Connection: keep-alive\r\n\r\n" if keep else b"Connection: close\r\n\r\n"
    return b"\r\n" if keep else b"Connection: close\r\n\r\n"


# ---- the client connection's lifecycle -------------------------------------------------------------
class ConnState(Enum):
    IDLE = "idle"  # open; nothing being answered (waiting for bytes or for the next pipelined request)
    BUSY = "busy"  # a request is being answered
    DRAINING = "draining"  # shutting down: the answer in progress finishes, then the connection closes
    DETACHED = "detached"  # the socket was handed to a tunnel (CONNECT); HTTP is over on it
    CLOSED = "closed"


TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.IDLE: frozenset({ConnState.BUSY, ConnState.DRAINING, ConnState.CLOSED}),
    ConnState.BUSY: frozenset({ConnState.IDLE, ConnState.DRAINING, ConnState.DETACHED, ConnState.CLOSED}),
    ConnState.DRAINING: frozenset({ConnState.CLOSED, ConnState.DETACHED}),
    ConnState.DETACHED: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset({ConnState.CLOSED}),
}


def next_state(current: ConnState, wanted: ConnState) -> ConnState:
    """The state after asking for `wanted`; an impossible move (a bug) raises ValueError."""
    if wanted is current or wanted in TRANSITIONS[current]:
        return wanted
    raise ValueError(f"client connection cannot go from {current.value} to {wanted.value}")
