"""A response body much larger than memory, to a client that stops reading: the proxy stops
reading the origin after a bounded buffer instead of holding the body, and finishes the transfer
byte-exact once the client reads again."""

from __future__ import annotations

import socket
import time

from tests.support import PeakRss


def test_100_mib_body_to_a_stalled_client_keeps_the_proxy_small(proxy, origin):
    size = 100 * 1024 * 1024
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.connect(("127.0.0.1", proxy.port))
    s.settimeout(30)
    s.sendall(f"GET {origin.url(f'/stream/{size}?length=1')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    first = s.recv(65536)
    head, _, rest = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"content-length: {size}".encode() in head.lower()
    body = len(rest)
    with PeakRss(proxy.proc.pid) as rss:
        while body < 1024 * 1024:  # a little, then the client stalls
            body += len(s.recv(65536))
        time.sleep(3)
        stalled_growth = rss.growth_kb
        while body < size:
            data = s.recv(1 << 20)
            if not data:
                break
            body += len(data)
    s.close()
    assert body == size
    assert stalled_growth < 20 * 1024, f"RSS grew by {stalled_growth // 1024} MiB while the client stalled"
    assert rss.growth_kb < 30 * 1024, f"RSS grew by {rss.growth_kb // 1024} MiB"
