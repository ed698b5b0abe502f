"""Stand-ins for the far side of a parent-proxy chain: a raw-socket parent proxy that records every
request head exactly as it arrives (request line, fields, which connection), and a TCP echo server
to tunnel to."""

from __future__ import annotations

import socket
import threading
from typing import Any


class ThreadedServer:
    """A loopback listener serving each connection on a thread: subclasses write `handle`."""

    def __init__(self) -> None:
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
            threading.Thread(target=self._serve, args=(c, n), daemon=True).start()

    def _serve(self, c: socket.socket, n: int) -> None:
        with c:
            c.settimeout(10)
            try:
                self.handle(c, n)
            except OSError:
                return

    def handle(self, c: socket.socket, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class FakeParent(ThreadedServer):
    """A parent proxy on loopback speaking just enough HTTP/1.1: every request head is recorded in
    `requests` (connection number, request line, fields lower-cased). Answers:
    - CONNECT: `connect_answer` (default "200 Connection established"), then echoes the tunnel;
    - a target containing "/need-auth": 407 with Proxy-Authenticate;
    - anything else: 200, keep-alive, body "parent saw: <request line>", Cache-Control max-age=300."""

    def __init__(self, connect_answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n") -> None:
        self.connect_answer = connect_answer
        self.requests: list[dict[str, Any]] = []
        super().__init__()

    def handle(self, c: socket.socket, n: int) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = c.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            line, *rest = head.decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in rest)}
            self.requests.append({"conn": n, "line": line, "fields": fields})
            if line.startswith("CONNECT "):
                c.sendall(self.connect_answer)
                if not self.connect_answer.startswith(b"HTTP/1.1 200"):
                    return
                if buf:
                    c.sendall(buf)
                while chunk := c.recv(65536):
                    c.sendall(chunk)
                return
            if "/need-auth" in line:
                c.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                          b"Proxy-Authenticate: Basic realm=\"parent\"\r\nContent-Length: 0\r\n\r\n")
                continue
            body = f"parent saw: {line}".encode("latin-1")
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=300\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def lines(self) -> list[str]:
        return [r["line"] for r in self.requests]


class EchoServer(ThreadedServer):
    """A TCP server that says `banner` first (if any), then echoes whatever it receives."""

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        super().__init__()

    def handle(self, c: socket.socket, n: int) -> None:
        if self.banner:
            c.sendall(self.banner)
        while chunk := c.recv(65536):
            c.sendall(chunk)


def connect_through(port: int, authority: str, payload: bytes, timeout: float = 10) -> tuple[bytes, bytes]:
    """CONNECT `authority` through the proxy on `port`, send `payload` once established; returns
    (the proxy's answer head, what came back through the tunnel up to the echoed payload, or
    whatever arrived before the connection closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return buf, b""
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            while chunk := s.recv(65536):
                rest += chunk
            return head, rest
        s.sendall(payload)
        while not rest.endswith(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head, rest


class GopherServer(ThreadedServer):
    """A gopher server (RFC 1436) on a raw socket: every selector gets `text` (as a type-0 item's
    body ends: ".\r\n") and the connection closes. `selectors` records what was asked."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.selectors: list[str] = []
        super().__init__()

    def handle(self, c: socket.socket, n: int) -> None:
        buf = b""
        while b"\r\n" not in buf:
            chunk = c.recv(4096)
            if not chunk:
                return
            buf += chunk
        self.selectors.append(buf.split(b"\r\n", 1)[0].decode("latin-1"))
        c.sendall(self.text + b".\r\n")


class AnonymousFtp:
    """pyftpdlib serving `root` to anonymous users, on its own thread."""

    def __init__(self, root: str) -> None:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import ThreadedFTPServer

        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(root)
        handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
        self.server = ThreadedFTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"handle_exit": False}, daemon=True).start()

    def close(self) -> None:
        self.server.close_all()
