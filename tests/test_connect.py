"""CONNECT through the running proxy: TLS passes through untouched (curl verifies a certificate made
by trustme), bytes pipelined after the CONNECT head are kept, half-close works, errors are clear,
and no file descriptor is left behind."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest
import trustme
from aiohttp import web

from tests.support import curl, fd_count, read_all


class TlsOrigin:
    def __init__(self, tmp_path) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.ca_path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.ctx)
        self.hits = 0
        self.port = 0
        ready = threading.Event()

        async def hello(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text="secret over tls\n")

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_get("/", hello)
            self.runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ctx)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Echo:
    """A plain TCP echo server; answers EOF with a trailer so half-close can be checked."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    @staticmethod
    def serve(c: socket.socket) -> None:
        with c:
            try:
                while data := c.recv(65536):
                    c.sendall(data)
                c.sendall(b"<eof seen>")
            except OSError:
                pass


@pytest.fixture
def tls_origin(tmp_path):
    o = TlsOrigin(tmp_path)
    yield o
    o.stop()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.sock.close()


def connect_proxy(make_proxy, *ports):
    return make_proxy({"cache": {"enabled": False}, "access": {"connect_ports": [443, *ports]}})


def test_curl_https_through_connect_tunnel(make_proxy, tls_origin):
    p = connect_proxy(make_proxy, tls_origin.port)
    r = curl("-x", p.url, "--cacert", str(tls_origin.ca_path), f"https://localhost:{tls_origin.port}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"secret over tls\n"
    line = p.access_lines(wait_for=1)[-1]
    assert "TCP_TUNNEL/200" in line and f"CONNECT localhost:{tls_origin.port}" in line
    assert int(line.split()[4]) > len(b"secret over tls\n")  # bytes sent to the client, TLS included


def test_connect_to_a_port_not_allowed_is_403(proxy, tls_origin):
    r = curl("-x", proxy.url, "-k", f"https://localhost:{tls_origin.port}/")
    assert r.returncode != 0
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(f"CONNECT 127.0.0.1:{tls_origin.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 403") and b"access.connect_ports" in reply
    assert tls_origin.hits == 0


def test_bytes_pipelined_after_connect_head_are_forwarded(make_proxy, echo):
    p = connect_proxy(make_proxy, echo.port)
    s = socket.create_connection(("127.0.0.1", p.port), 10)
    s.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\nhello tunnel".encode())
    s.shutdown(socket.SHUT_WR)
    data = read_all(s)
    assert data == b"HTTP/1.1 200 Connection established\r\n\r\nhello tunnel<eof seen>"


def test_half_close_through_connect_still_delivers_the_reply(make_proxy, echo):
    p = connect_proxy(make_proxy, echo.port)
    s = socket.create_connection(("127.0.0.1", p.port), 10)
    s.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    payload = bytes(range(256)) * 8000
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    assert read_all(s) == payload + b"<eof seen>"


def test_connect_to_refused_port_is_502(make_proxy):
    p = connect_proxy(make_proxy, 9)
    s = socket.create_connection(("127.0.0.1", p.port), 10)
    s.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 502") and b"127.0.0.1:9" in reply


def test_connect_dns_failure_is_502(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(b"CONNECT no-such-host.invalid:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 502") and b"no-such-host.invalid" in reply


def test_connect_without_port_is_400(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port), 10)
    s.sendall(b"CONNECT example.com HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_all(s).startswith(b"HTTP/1.1 400")


def test_many_tunnels_leave_no_file_descriptors_behind(make_proxy, echo):
    p = connect_proxy(make_proxy, echo.port)
    before = fd_count(p.proc.pid)
    for i in range(150):
        s = socket.create_connection(("127.0.0.1", p.port), 10)
        s.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\nping".encode())
        if i % 3 == 0:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # an abrupt reset mid-tunnel
            continue
        s.shutdown(socket.SHUT_WR)
        assert read_all(s).endswith(b"ping<eof seen>")
        s.close()
    for _ in range(100):
        if fd_count(p.proc.pid) <= before:
            break
        threading.Event().wait(0.05)
    assert fd_count(p.proc.pid) <= before
