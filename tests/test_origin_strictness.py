"""What a client of the proxy sees when an origin misbehaves (raw-socket origins writing exact
bytes): a malformed or ambiguous response head is a 502 with a short body naming the host and
nothing is stored; a body that ends early is never stored and the client's connection is closed
instead of being left hanging or handed a complete-looking body."""

from __future__ import annotations

import pytest

from tests.rawserver import response
from tests.support import RawClient, header

CACHEABLE = "Cache-Control: max-age=600"

MALFORMED = {
    "both Content-Length and Transfer-Encoding":
        f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\n\r\n",
    "differing Content-Length values":
        f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
    "invalid Content-Length": f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nContent-Length: five\r\n\r\nhello",
    "bare CR in a header value": f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nX-A: a\rb\r\nContent-Length: 5\r\n\r\nhello",
    "bare LF in a header value": f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nX-A: a\nb\r\nContent-Length: 5\r\n\r\nhello",
    "oversized header section":
        f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nX-Big: {'a' * 70000}\r\nContent-Length: 5\r\n\r\nhello",
    "invalid status line": f"HTTP/1.1 2x0 OK\r\n{CACHEABLE}\r\nContent-Length: 5\r\n\r\nhello",
}


@pytest.fixture
def caching_proxy(make_proxy):
    return make_proxy({})


def get(c: RawClient, url: str) -> None:
    c.send(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@pytest.mark.parametrize("shape", list(MALFORMED))
def test_malformed_response_is_502_naming_the_host_and_not_stored(caching_proxy, raw_origin, shape):
    o = raw_origin(lambda req, n: MALFORMED[shape].encode("latin-1"))
    c = RawClient(caching_proxy.port)
    for attempt in (1, 2):
        get(c, o.url("/thing"))
        resp, body = c.response()
        assert resp.status_code == 502, (shape, body)
        assert f"127.0.0.1:{o.port} sent an invalid response".encode() in body
        assert len(body) < 300 and b"Traceback" not in body
        assert header(resp, "cache-control") == "no-store"
        assert len(o.requests) == attempt  # the second request went to the origin again
    c.close()


def test_the_same_response_well_formed_is_stored(caching_proxy, raw_origin):
    """The control for the test above: its origins' answers would be cached if they were valid."""
    o = raw_origin(lambda req, n: response(200, b"hello", CACHEABLE))
    c = RawClient(caching_proxy.port)
    for _ in range(2):
        get(c, o.url("/thing"))
        resp, body = c.response()
        assert resp.status_code == 200 and body == b"hello"
    assert len(o.requests) == 1
    c.close()


@pytest.mark.parametrize("shape", ["Content-Length", "chunked"])
def test_body_ending_early_closes_the_client_connection_and_is_not_stored(caching_proxy, raw_origin, shape):
    head = (f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nContent-Length: 100\r\n\r\n" if shape == "Content-Length"
            else f"HTTP/1.1 200 OK\r\n{CACHEABLE}\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n")
    o = raw_origin(lambda req, n: [head.encode(), b"only ten b"], close_after=True)
    for attempt in (1, 2):
        c = RawClient(caching_proxy.port)
        get(c, o.url("/short"))
        data = b""
        while chunk := c.sock.recv(65536):  # the proxy must end the connection, not leave it hanging
            data += chunk
        head_out, _, body = data.partition(b"\r\n\r\n")
        assert head_out.startswith(b"HTTP/1.1 200")
        if shape == "Content-Length":
            assert b"content-length: 100" in head_out.lower() and body == b"only ten b"
        else:
            assert body.startswith(b"a\r\nonly ten b\r\n") and not body.endswith(b"0\r\n\r\n")
        assert len(o.requests) == attempt  # nothing stored: the second client goes to the origin too
        c.close()
    lines = caching_proxy.access_lines(wait_for=2)
    assert all("_ABORTED/200" in line for line in lines[-2:]), lines
