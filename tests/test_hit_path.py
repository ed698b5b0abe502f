"""Cache hits as a client sees them: hits answered at once stay in pipelined order among misses and
errors, and disk hits (sent with sendfile while the client keeps up) are byte-exact at any size and
never make the proxy buffer what a slow client has not read."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

from tests.support import PeakRss, RawClient, curl, header, read_all


@pytest.fixture
def cproxy(make_proxy):
    # memory_object_size 1 KiB: bodies above it are served from their files (the sendfile path)
    return make_proxy({"refresh": {"enabled": False}, "cache": {"memory_object_size": 1024}})


def fetch(proxy, url):
    out = curl("-x", proxy.url, "-s", "-D", "-", "-o", "-", url, timeout=120).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def test_pipelined_hits_misses_and_errors_are_answered_in_order(cproxy, origin):
    hot = origin.put("hot", b"hot body", Cache_Control="max-age=600")
    slow = origin.put("slow", b"slow body", delay=0.3)  # a miss that takes a while
    fetch(cproxy, hot)  # now a memory hit
    c = RawClient(cproxy.port)
    reqs = [f"GET {hot} HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET {slow} HTTP/1.1\r\nHost: x\r\n\r\n",
            f"GET {hot} HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET https://nowhere.test/ HTTP/1.1\r\nHost: x\r\n\r\n",  # 501, answered by the proxy
            f"GET {hot} HTTP/1.1\r\nHost: x\r\n\r\n",
            f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nping",
            f"GET {hot} HTTP/1.1\r\nHost: x\r\n\r\n"]
    c.send("".join(reqs).encode())
    got = []
    for method in (b"GET", b"GET", b"GET", b"GET", b"GET", b"POST", b"GET"):
        resp, body = c.response(method)
        got.append((resp.status_code, header(resp, "x-cache"), body[:9]))
    assert [g[0] for g in got] == [200, 200, 200, 501, 200, 200, 200]
    assert [g[2] for g in got if g[0] == 200 and g[1] and g[1].startswith("HIT")] == [b"hot body"] * 4
    assert got[1][2] == b"slow body" and got[5][0] == 200
    assert origin.full["hot"] == 1


@pytest.mark.parametrize("size", [1, 64 * 1024, 100 * 1024 * 1024], ids=["1B", "64KiB", "100MiB"])
def test_disk_hits_are_byte_exact(cproxy, origin, size):
    data = os.urandom(size)
    url = origin.put(f"obj{size}", data, Cache_Control="max-age=600")
    h1, b1 = fetch(cproxy, url)
    h2, b2 = fetch(cproxy, url)
    assert "MISS" in h1 and "X-Cache: HIT" in h2
    assert hashlib.sha256(b2).digest() == hashlib.sha256(data).digest() and len(b2) == size
    assert origin.full[f"obj{size}"] == 1
    # and once more over a kept-alive connection: the next response is framed right after sendfile
    c = RawClient(cproxy.port, timeout=60)
    c.send(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\nGET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for _ in range(2):
        resp, body = c.response()
        assert resp.status_code == 200 and len(body) == size and body[:64] == data[:64] and body[-64:] == data[-64:]


def test_a_slow_reader_of_a_large_hit_does_not_grow_the_proxy(cproxy, origin):
    size = 100 * 1024 * 1024
    url = origin.put("hitpath-big", os.urandom(size), Cache_Control="max-age=600")
    fetch(cproxy, url)
    s = socket.create_connection(("127.0.0.1", cproxy.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    with PeakRss(cproxy.proc.pid) as rss:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        got = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # read slowly: 64 KiB every 50 ms
            got += len(s.recv(64 * 1024))
            time.sleep(0.05)
    assert 0 < got < size // 2
    assert rss.growth_kb < 20 * 1024, f"RSS grew by {rss.growth_kb // 1024} MiB"
    rest = read_all(s, timeout=60)  # then the rest, complete
    assert got + len(rest) > size
    s.close()
