"""The origin-response framing rules (webproxy.originframing), without sockets: which body follows
a head (RFC 9112 6.3) and which heads are refused as ambiguous or malformed."""

from __future__ import annotations

import pytest

from webproxy.originframing import CHUNKED, CLOSE, LENGTH, NO_BODY, BadResponse, response_framing


@pytest.mark.parametrize("method,status,headers,expected", [
    ("GET", 200, [("Content-Length", "10")], (LENGTH, 10)),
    ("GET", 200, [("content-length", " 0 ")], (LENGTH, 0)),
    ("GET", 200, [("Transfer-Encoding", "chunked")], (CHUNKED, None)),
    ("GET", 200, [("Transfer-Encoding", "Chunked")], (CHUNKED, None)),
    ("GET", 200, [], (CLOSE, None)),
    ("GET", 200, [("Content-Length", "7"), ("Content-Length", "7")], (LENGTH, 7)),  # RFC 9110 8.6
    ("GET", 200, [("Content-Length", "7, 7")], (LENGTH, 7)),
    # RFC 9112 6.3 rule 1: no body whatever the fields say; a declared length is still news.
    ("HEAD", 200, [("Content-Length", "1000")], (NO_BODY, 1000)),
    ("HEAD", 200, [("Transfer-Encoding", "chunked")], (NO_BODY, None)),
    ("GET", 204, [], (NO_BODY, None)),
    ("GET", 304, [("Content-Length", "50")], (NO_BODY, 50)),
    ("GET", 103, [("Link", "</style.css>; rel=preload")], (NO_BODY, None)),
    ("GET", 100, [], (NO_BODY, None)),
])
def test_body_framing(method, status, headers, expected):
    assert response_framing(method, status, headers) == expected


@pytest.mark.parametrize("status,headers,why", [
    (200, [("Content-Length", "3"), ("Transfer-Encoding", "chunked")], "both Content-Length and Transfer-Encoding"),
    (200, [("Transfer-Encoding", "chunked"), ("Content-Length", "3")], "both Content-Length and Transfer-Encoding"),
    (200, [("Content-Length", "3"), ("Content-Length", "4")], "conflicting Content-Length"),
    (200, [("Content-Length", "3, 4")], "conflicting Content-Length"),
    (200, [("Content-Length", "abc")], "invalid Content-Length"),
    (200, [("Content-Length", "-1")], "invalid Content-Length"),
    (200, [("Content-Length", "+5")], "invalid Content-Length"),
    (200, [("Content-Length", "")], "invalid Content-Length"),
    (200, [("Content-Length", "99999999999999999999999")], "invalid Content-Length"),
    (200, [("Content-Length", "١٢")], "invalid Content-Length"),  # non-ASCII digits
    (200, [("Transfer-Encoding", "gzip")], "unsupported transfer coding"),
    (200, [("Transfer-Encoding", "gzip, chunked")], "unsupported transfer coding"),
    (200, [("Transfer-Encoding", "chunked, chunked")], "unsupported transfer coding"),
    (200, [("X-Split", "a\rb")], "bare CR or LF"),
    (200, [("X-Split", "a\nInjected: yes")], "bare CR or LF"),
    (101, [("Upgrade", "websocket")], "switched protocols"),
    (99, [], "invalid status code"),
    (600, [], "invalid status code"),
])
def test_ambiguous_or_malformed_heads_are_refused(status, headers, why):
    with pytest.raises(BadResponse) as e:
        response_framing("GET", status, headers)
    assert why in str(e.value)


def test_a_head_response_is_still_checked():
    # HEAD has no body, but a smuggling-shaped head is refused all the same.
    with pytest.raises(BadResponse):
        response_framing("HEAD", 200, [("Content-Length", "3"), ("Transfer-Encoding", "chunked")])
