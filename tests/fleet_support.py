"""Fleet test support: HAProxy run from the shipped conf/haproxy-fleet.cfg (only its addresses, the
check interval and the Debian service lines swapped for a test's), and its runtime API."""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.support import ROOT, free_port, terminate

SHIPPED = ROOT / "conf" / "haproxy-fleet.cfg"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
PLACEHOLDER_NODES = ["192.0.2.11:3128", "192.0.2.12:3128", "192.0.2.13:3128"]
# Loopback addresses apart from HAProxy's own 127.0.0.1: the test config's fleet_clients are
# CLIENT_IP and ADMIN_IP, its fleet_admins ADMIN_IP.
CLIENT_IP = "127.0.0.5"
ADMIN_IP = "127.0.0.9"
OUTSIDER_IP = "127.0.0.7"


def _swap(text: str, old: str, new: str) -> str:
    """Replace `old` with `new`, once: the shipped file must still have the shape the test expects."""
    assert text.count(old) == 1, f"conf/haproxy-fleet.cfg no longer has exactly one {old!r}"
    return text.replace(old, new)


def fleet_config(listen_port: int, node_ports: list[int], stats_socket: Path, inter: str = "200ms") -> str:
    """The shipped config with the test's addresses (HAProxy's port, the nodes', the client and
    admin networks). Everything else (hashing, checks, timeouts, rules, forwardfor) is the shipped
    text."""
    assert len(node_ports) == len(PLACEHOLDER_NODES)
    text = SHIPPED.read_text()
    text = _swap(text, "    bind :3128 ", f"    bind 127.0.0.1:{listen_port} ")
    text = _swap(text, "    acl fleet_clients src 127.0.0.0/8 ::1 ", f"    acl fleet_clients src {CLIENT_IP} {ADMIN_IP} ")
    text = _swap(text, "    acl fleet_admins src 127.0.0.0/8 ::1 ", f"    acl fleet_admins src {ADMIN_IP} ")
    for placeholder, port in zip(PLACEHOLDER_NODES, node_ports, strict=True):
        text = _swap(text, f" {placeholder} ", f" 127.0.0.1:{port} ")
    # Production checks every 2 s; a test cannot wait 3 x 2 s for each state change.
    text = _swap(text, " inter 2s ", f" inter {inter} ")
    # The Debian service's lines: a foreground process with its log on stdout, a private socket.
    text = _swap(text, "    log /dev/log local0 ", "    log stdout format raw local0 ")
    for line in ("    chroot /var/lib/haproxy\n", "    user haproxy\n", "    group haproxy\n", "    daemon\n"):
        text = _swap(text, line, "")
    return _swap(text, " /run/haproxy/admin.sock ", f" {stats_socket} ")


class HAProxy:
    """`haproxy -db -f CFG` in the foreground on a free port; its log goes to `log_path`."""

    def __init__(self, tmp: Path, node_ports: list[int], inter: str = "200ms") -> None:
        self.port = free_port()
        self.socket_path = tmp / "haproxy.sock"
        self.config_path = tmp / "haproxy.cfg"
        self.config_path.write_text(fleet_config(self.port, node_ports, self.socket_path, inter))
        self.log_path = tmp / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HAProxy:
        assert HAPROXY is not None
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.proc.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"haproxy did not listen: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self, cmd: str) -> str:
        """One runtime-API command on the stats socket; its answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(cmd.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def server_status(self) -> dict[str, str]:
        """{server name: "UP" / "DOWN" / ...} for the fleet's backend, from `show stat` (CSV)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "fleet_nodes" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = re.sub(r" .*", "", row["status"])
        return out

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


def fleet_request(port: int, url: str, method: str = "GET", source: str = CLIENT_IP) -> tuple[int, dict[str, str], bytes]:
    """One request for `url` (absolute, or a path) sent to 127.0.0.1:port from `source`: (status,
    fields with lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15, source_address=(source, 0))
    try:
        conn.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", url.split("/")[2] if "://" in url else "fleet.test")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def served_by(fields: dict[str, str]) -> str:
    """The node named in `X-Cache: HIT from node2` (its server.name)."""
    return fields["x-cache"].rsplit(" ", 1)[-1]


def log_entries(lines: list[str], needle: str) -> list[tuple[str, str]]:
    """(client address, Squid code) of the access-log lines whose URL field is `needle`."""
    out = []
    for line in lines:
        f = line.split()
        if len(f) >= 7 and f[6] == needle:
            out.append((f[2], f[3].split("/")[0]))
    return out


class EchoPorts:
    """TCP listeners on several loopback ports, each answering a line with "PORT: line": CONNECT
    targets with distinct authorities."""

    def __init__(self, n: int) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            self.socks.append(s)
        self.ports = [s.getsockname()[1] for s in self.socks]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.2)
            for s in ready:
                conn, _ = s.accept()
                threading.Thread(target=self._echo, args=(conn, s.getsockname()[1]), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket, port: int) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                line = conn.makefile("rb").readline()
                conn.sendall(f"{port}: ".encode() + line)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()


def connect_through(port: int, authority: str, source: str = CLIENT_IP) -> bytes:
    """CONNECT `authority` through 127.0.0.1:port, send one line through the tunnel; the bytes
    that come back (the proxy's answer head, then the far end's reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                return head
            head += chunk
        s.sendall(b"ping\n")
        rest = head.split(b"\r\n\r\n", 1)[1]
        while not rest.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
        return head.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + rest
