"""The far side of a parent-proxy chain: a raw-socket parent proxy that records every request head
exactly as it arrives (request line, fields, which connection), a real Squid parent with proxy
authentication, and origins to reach through them (TCP echo, gopher, anonymous FTP)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.support import free_port, terminate


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


SQUID = "/usr/sbin/squid"
SQUID_BASIC_AUTH = "/usr/lib/squid/basic_ncsa_auth"


def squid_skip_reason() -> str | None:
    if not os.path.exists(SQUID) or not os.path.exists(SQUID_BASIC_AUTH) or not shutil.which("openssl"):
        return "needs Squid with basic_ncsa_auth and openssl (tests/run.sh installs squid-openssl)"
    if os.geteuid() != 0:
        return "Squid is started as root (it drops to the proxy user)"
    return None


class SquidParent:
    """A real Squid as the parent proxy: no cache, Basic proxy authentication for `user`:`password`
    (basic_ncsa_auth), CONNECT allowed to `connect_ports` only, its access log in `access_log`.
    Its directory is outside pytest's private tmp: Squid works as the proxy user."""

    def __init__(self, user: str, password: str, connect_ports: list[int]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="webproxy-squid-parent-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.access_log = self.dir / "access.log"
        digest = subprocess.run(["openssl", "passwd", "-apr1", password], capture_output=True, text=True,
                                check=True).stdout.strip()
        (self.dir / "passwd").write_text(f"{user}:{digest}\n")
        ports = " ".join(str(p) for p in connect_ports)
        (self.dir / "squid.conf").write_text(f"""
http_port 127.0.0.1:{self.port}
visible_hostname squid-parent
cache_effective_user proxy
pid_filename {self.dir}/squid.pid
cache_log {self.dir}/cache.log
access_log stdio:{self.access_log} squid
cache_store_log none
coredump_dir {self.dir}
icp_port 0
htcp_port 0
pinger_enable off
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
cache deny all
cache_mem 0 MB
auth_param basic program {SQUID_BASIC_AUTH} {self.dir}/passwd
auth_param basic children 1
auth_param basic realm parent-test
acl CONNECT method CONNECT
acl tunnel_ports port {ports}
acl authed proxy_auth REQUIRED
http_access deny CONNECT !tunnel_ports
http_access allow authed
http_access deny all
""")
        for p in [self.dir, *self.dir.iterdir()]:
            shutil.chown(p, "proxy", "proxy")
        self.proc = subprocess.Popen([SQUID, "-N", "-n", f"wptest{os.getpid()}", "-f", str(self.dir / "squid.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "cache.log").read_text(errors="replace") if (self.dir / "cache.log").exists() else ""
                raise RuntimeError(f"squid exited {self.proc.returncode}: {log[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        self.close()
        raise RuntimeError("squid did not start listening within 20 s")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def close(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
