"""The client side's HTTP/1 rules (webproxy.http1), with no socket: request framing, the
keep-alive decision, response framing, and the connection's lifecycle."""

from __future__ import annotations

import pytest

from webproxy import http1
from webproxy.http1 import ConnState, Framing, Refusal


@pytest.mark.parametrize("headers, refusal", [
    ([("Content-Length", "5")], None),
    ([("Transfer-Encoding", "chunked")], None),
    ([("Transfer-Encoding", "gzip, chunked")], 501),  # never forwarded as if it were identity
    ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], 400),
    ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    ([("Content-Length", "5"), ("content-length", "5")], None),  # repeated, same value: one length
    ([("Content-Length", "-5")], 400),
    ([("Content-Length", "0x10")], 400),
    ([("Transfer-Encoding", "chunked, gzip")], 400),
    ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], 400),
    ([("Transfer-Encoding", "br, chunked")], 501),
])
def test_request_framing_refuses_the_smuggling_shapes(headers, refusal):
    got = http1.request_framing_refusal(headers)
    assert (got.status if got else None) == refusal


def test_transfer_encoding_in_http10_is_faulty_framing():
    assert http1.request_framing_refusal([("Transfer-Encoding", "chunked")], "1.0").status == 400
    assert http1.request_framing_refusal([("Content-Length", "3")], "1.0") is None


def test_only_100_continue_is_an_expectation_we_meet():
    assert http1.expectation_refusal(" 100-Continue ") is None
    assert http1.expectation_refusal("x-magic") == Refusal(417, "this proxy does not support the expectation 'x-magic'")


@pytest.mark.parametrize("version, headers, parser, keep", [
    ("1.1", [], True, True),
    ("1.1", [("Proxy-Connection", "close")], True, False),
    ("1.0", [], False, False),
    ("1.0", [("Proxy-Connection", "keep-alive")], False, True),
    ("1.0", [("Connection", "keep-alive")], True, True),
    ("1.1", [("Proxy-Connection", "keep-alive")], False, False),  # Connection: close said so already
])
def test_keep_alive_wish_reads_connection_and_proxy_connection(version, headers, parser, keep):
    assert http1.wants_keep_alive(version, headers, parser) is keep


@pytest.mark.parametrize("method, status, version, length, framing", [
    ("GET", 200, "1.1", 10, Framing.LENGTH),
    ("GET", 200, "1.1", None, Framing.CHUNKED),
    ("GET", 200, "1.0", None, Framing.CLOSE),
    ("HEAD", 200, "1.1", None, Framing.NO_BODY),
    ("GET", 204, "1.1", None, Framing.NO_BODY),
    ("GET", 304, "1.0", 10, Framing.NO_BODY),
    ("GET", 103, "1.1", None, Framing.NO_BODY),
])
def test_response_framing(method, status, version, length, framing):
    assert http1.response_framing(method, status, version, length) is framing


def test_a_head_answer_carries_the_length_a_get_would_except_for_204():
    assert http1.length_field_for_bodiless(200, 10) and not http1.length_field_for_bodiless(204, 0)
    assert not http1.length_field_for_bodiless(200, None)


@pytest.mark.parametrize("kw, keep", [
    ({}, True),
    ({"wants": False}, False),
    ({"draining": True}, False),
    ({"served": 100, "max_requests": 100}, False),
    ({"served": 99, "max_requests": 100}, True),
    ({"served": 10**6, "max_requests": 0}, True),  # 0: no limit
    ({"framing": Framing.CLOSE}, False),
    ({"body_unread": True}, False),
    ({"forced_close": True}, False),
])
def test_when_a_connection_stays_open(kw, keep):
    args = {"wants": True, "draining": False, "served": 1, "max_requests": 100} | kw
    assert http1.keep_open(**args) is keep


def test_connection_field_says_only_what_the_version_needs():
    assert http1.connection_field("1.1", True) == b"\r\n"
    assert http1.connection_field("1.1", False) == b"Connection: close\r\n\r\n"
    assert http1.connection_field("1.0", True) == b"Connection: keep-alive\r\n\r\n"
    assert http1.connection_field("1.0", False) == b"Connection: close\r\n\r\n"


def test_connection_lifecycle_transitions():
    s = ConnState.IDLE
    for nxt in (ConnState.BUSY, ConnState.IDLE, ConnState.BUSY, ConnState.DRAINING, ConnState.CLOSED):
        s = http1.next_state(s, nxt)
    assert s is ConnState.CLOSED
    assert http1.next_state(ConnState.BUSY, ConnState.DETACHED) is ConnState.DETACHED
    with pytest.raises(ValueError):
        http1.next_state(ConnState.CLOSED, ConnState.BUSY)
    with pytest.raises(ValueError):
        http1.next_state(ConnState.DETACHED, ConnState.IDLE)


@pytest.mark.parametrize("in_message,waiting,expected", [
    (False, True, True),  # a complete request, then FIN: answer it, then close
    (True, True, False),  # FIN inside a head or body: the request is cut off
    (False, False, False),  # FIN with nothing to answer
    (True, False, False),
])
def test_answer_after_eof_only_for_complete_waiting_requests(in_message, waiting, expected):
    assert http1.answer_after_eof(in_message, waiting) is expected
