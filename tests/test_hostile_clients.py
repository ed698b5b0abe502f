"""Hostile request framing (issue "Hardening", items 1-5): smuggling shapes are refused and the
connection closed, codings are never silently dropped, trailers never become headers, the header
limit holds without a line end, and no parser error escapes: what came before is answered first."""

from __future__ import annotations

import socket
import time

from tests.support import MethodEchoOrigin, PeakRss, RawClient, header, read_all


def test_http10_transfer_encoding_is_refused_and_nothing_is_smuggled(proxy, origin):
    smuggled = f"GET {origin.url('/text/smuggled')} HTTP/1.1\r\nHost: x\r\n\r\n"
    before = origin.hits["/text/smuggled"]
    body = f"{len(smuggled):x}\r\n{smuggled}\r\n0\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(f"POST {origin.url('/echo/h10-te')} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
              f"Transfer-Encoding: chunked\r\n\r\n{body}{smuggled}".encode())
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 400 ") and reply.count(b"HTTP/1.1 ") == 1  # one answer, then closed
    assert b"Transfer-Encoding" in reply
    assert origin.hits["/text/smuggled"] == before and origin.hits["/echo/h10-te"] == 0


def test_a_coding_before_chunked_is_refused_with_501_not_forwarded_as_identity(proxy, origin):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    before = origin.hits["/upload"]
    s.sendall(f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
              "5\r\nhello\r\n0\r\n\r\n".encode())
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 501 ") and b"Connection: close" in reply
    assert origin.hits["/upload"] == before


def test_trailer_fields_never_reach_the_origin_as_headers(proxy, origin):
    c = RawClient(proxy.port)
    c.send(f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n0\r\nCookie: session=stolen\r\nX-Trailer: 1\r\n\r\n".encode())
    resp, body = c.response(b"POST")
    assert resp.status_code == 200 and body.endswith(b"hello")
    sent = dict((k.lower(), v) for k, v in origin.requests[-1]["headers"])
    assert b"cookie" not in sent and b"x-trailer" not in sent
    # and the connection goes on: the trailer did not confuse the framing
    c.send(f"GET {origin.url('/text/after')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert c.response()[1] == b"hello after\n"


def test_an_endless_header_line_gets_431_at_the_limit_with_bounded_memory(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(b"GET http://example.com/ HTTP/1.1\r\nHost: x\r\nX-Long: ")
    block = b"a" * (1 << 20)
    with PeakRss(proxy.proc.pid) as rss:
        sent = 0
        try:
            while sent < 64 << 20:  # 64 MiB without a line end
                s.sendall(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_all(s, timeout=5)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    assert sent < 8 << 20  # refused long before the client was done
    assert rss.growth_kb < 20 * 1024, f"RSS grew by {rss.growth_kb // 1024} MiB"


def test_a_1mib_unterminated_line_is_answered(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(b"GET http://example.com/ HTTP/1.1\r\nX: " + b"b" * (1 << 20))
    reply = read_all(s, timeout=5)
    assert reply.startswith(b"HTTP/1.1 431 ")


def test_a_flood_of_pipelined_extension_methods_is_answered_in_order(proxy):
    n = 1500
    o = MethodEchoOrigin()
    c = RawClient(proxy.port, timeout=30)
    c.send("".join(f"BREW http://127.0.0.1:{o.port}/{i} HTTP/1.1\r\nHost: x\r\n\r\n" for i in range(n)).encode())
    for i in range(n):
        resp, body = c.response(b"BREW")
        assert (resp.status_code, body) == (200, f"BREW /{i} HTTP/1.1".encode())
    assert "Traceback" not in proxy.stderr()
    o.sock.close()


def test_a_split_head_then_an_invalid_line_answers_the_valid_request_first(proxy, origin):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(f"GET {origin.url('/text/first')} HTTP/1.1\r\nHost: x\r\n".encode())
    time.sleep(0.1)
    s.sendall(b"\r\n\x01\x02 garbage HTTP/1.1\r\n\r\n")
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 200 ") and b"hello first\n" in reply
    assert b"HTTP/1.1 400 " in reply
    assert "Traceback" not in proxy.stderr() and "Fatal error" not in proxy.stderr()
    assert proxy.proc.poll() is None


def test_refused_answers_close_the_connection(proxy):
    c = RawClient(proxy.port)
    c.send(b"POST http://example.com/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br, chunked\r\n\r\n")
    resp, _ = c.response(b"POST")
    assert resp.status_code == 501 and header(resp, "connection") == "close"
    assert c.closed_by_peer()
