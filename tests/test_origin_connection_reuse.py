"""Origin connections kept alive by the proxy, seen from a client: a pooled connection the origin
closed just as a request arrived is retried once for a GET (the client never notices) and not for
a POST (which may have had an effect: the client gets a 502)."""

from __future__ import annotations

import pytest

from tests.rawserver import RawOrigin, response
from tests.support import RawClient


@pytest.fixture
def origin_closing_second_request():
    # Answers the first request of each connection and closes at the second, as an origin whose
    # keep-alive timeout runs out just as the next request arrives.
    o = RawOrigin(lambda req, n: response(200, b"answered", "Cache-Control: no-store") if n == 0 else None).start()
    yield o
    o.stop()


def test_get_is_retried_transparently_on_a_new_connection(proxy, origin_closing_second_request):
    o = origin_closing_second_request
    c = RawClient(proxy.port)
    for _ in range(3):
        c.send(f"GET {o.url('/page')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp, body = c.response()
        assert resp.status_code == 200 and body == b"answered", proxy.stderr()
    # Requests 2 and 3 each met a connection the origin closed, and each went out once more.
    assert len(o.requests) == 5 and o.connections == 3
    c.close()


def test_post_is_not_retried_and_the_client_gets_502(proxy, origin_closing_second_request):
    o = origin_closing_second_request
    c = RawClient(proxy.port)
    c.send(f"GET {o.url('/page')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert c.response()[0].status_code == 200
    c.send(f"POST {o.url('/form')} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\na=1".encode())
    resp, body = c.response(b"POST")
    assert resp.status_code == 502
    assert f"127.0.0.1:{o.port} closed the connection without answering".encode() in body
    assert len(o.requests) == 2 and o.requests[1].startswith(b"POST /form")
    c.close()
