"""A client that half-closes (FIN) after its request still gets its answer, then the connection
closes (`printf 'GET ...' | socat -t5 - TCP:proxy:3128`): a FIN means "no more requests", not "abort".
Through a real proxy process, read with h11."""

from __future__ import annotations

import socket

import h11

from tests.support import read_all


def half_closed_exchange(port: int, data: bytes) -> list[h11.Response | bytes]:
    """Send `data`, shut our write side, read until the proxy closes: [Response, body, ...]."""
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        raw = read_all(s, 15)
    conn = h11.Connection(h11.CLIENT)
    out: list[h11.Response | bytes] = []
    conn.receive_data(raw)
    conn.receive_data(b"")
    body = b""
    while True:
        if conn.our_state is h11.IDLE or conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # closed where another response could have started: the end
            return out
        if isinstance(event, h11.Response):
            out.append(event)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append(body)
            body = b""
        elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
            return out


def test_request_then_fin_is_answered_then_closed(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}})
    url = origin.url("/text/hc")
    got = half_closed_exchange(p.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert [r.status_code for r in got if isinstance(r, h11.Response)] == [200]
    assert got[-1] == b"hello hc\n"
    line = p.access_lines(wait_for=1)[-1]
    assert "TCP_MISS/200" in line and "ABORTED" not in line


def test_pipelined_requests_then_fin_are_all_answered_in_order(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}})
    reqs = b"".join(f"GET {origin.url(f'/text/p{i}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(3))
    got = half_closed_exchange(p.port, reqs)
    assert [b for b in got if isinstance(b, bytes)] == [b"hello p0\n", b"hello p1\n", b"hello p2\n"]


def test_cache_hit_then_fin_is_answered(make_proxy, origin):
    p = make_proxy()
    url = origin.put("hcfresh", b"fresh body", Cache_Control="max-age=600")
    first = half_closed_exchange(p.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    second = half_closed_exchange(p.port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert first[-1] == second[-1] == b"fresh body"
    assert origin.full["hcfresh"] == 1


def test_fin_inside_a_request_head_closes_without_an_answer(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}})
    with socket.create_connection(("127.0.0.1", p.port), 10) as s:
        s.sendall(f"GET {origin.url('/text/cut')} HTTP/1.1\r\nHost: x\r\n".encode())
        s.shutdown(socket.SHUT_WR)
        assert read_all(s, 10) == b""
    assert origin.hits["/text/cut"] == 0


def test_malformed_request_then_fin_gets_its_400(make_proxy):
    p = make_proxy({"cache": {"enabled": False}})
    got = half_closed_exchange(p.port, b"GET http://x.test/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert [r.status_code for r in got if isinstance(r, h11.Response)] == [400]
