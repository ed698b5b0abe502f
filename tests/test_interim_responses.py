"""1xx interim responses through the proxy (RFC 9110 15.2): passed on to HTTP/1.1 clients in order
before the final response, never to HTTP/1.0 clients, never stored or merged into the final one."""

from __future__ import annotations

import socket

import pytest

from tests.rawserver import RawOrigin, response

EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
FINAL = response(200, b"the page", "Cache-Control: max-age=600", "Content-Type: text/plain")


@pytest.fixture
def hinting_origin():
    o = RawOrigin(lambda req, n: [b"HTTP/1.1 100 Continue\r\n\r\n", EARLY_HINTS, 0.2, FINAL]).start()
    yield o
    o.stop()


def exchange(port: int, request: bytes) -> bytes:
    """Every byte the proxy sends back for one request, up to the end of the final body."""
    s = socket.create_connection(("127.0.0.1", port), 10)
    s.settimeout(10)
    s.sendall(request)
    data = b""
    while not data.endswith(b"the page"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def test_103_then_200_reach_an_http11_client_in_order_and_the_cached_answer_has_no_103(make_proxy,
                                                                                       hinting_origin):
    p = make_proxy({})
    url = hinting_origin.url("/page")
    first = exchange(p.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n" + EARLY_HINTS + b"HTTP/1.1 200 OK\r\n"), first
    final_head = first[len(b"HTTP/1.1 100 Continue\r\n\r\n" + EARLY_HINTS):]
    assert b"Link:" not in final_head and final_head.endswith(b"\r\n\r\nthe page")
    second = exchange(p.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert second.startswith(b"HTTP/1.1 200 OK\r\n"), second
    assert b"103" not in second.split(b"\r\n", 1)[1] and b"Link:" not in second
    assert b"X-Cache: HIT" in second
    assert len(hinting_origin.requests) == 1


def test_no_interim_response_reaches_an_http10_client(make_proxy, hinting_origin):
    p = make_proxy({"cache": {"enabled": False}})
    data = exchange(p.port, f"GET {hinting_origin.url('/page')} HTTP/1.0\r\n\r\n".encode())
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
    assert b" 103 " not in data and b" 100 " not in data and b"Link:" not in data
    assert data.endswith(b"\r\n\r\nthe page")
