"""Network-namespace support for transparent-gateway tests: three namespaces joined by veth pairs,
the shipped iptables scripts (conf/iptables-redirect.sh, conf/iptables-tproxy.sh) in the gateway,
real `webproxy run` processes there, and in the server namespace an HTTP origin and a
server-speaks-first banner service that both record who connected.

    client ns 10.202.1.2 --veth-- 10.202.1.1 gateway ns 10.202.2.1 --veth-- 10.202.2.2 server ns

Nothing here touches the host's own network namespace; deleting the namespaces removes everything.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support import read_all, write_config

ROOT = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
CLIENT, GW_C, GW_S, SERVER = "10.202.1.2", "10.202.1.1", "10.202.2.1", "10.202.2.2"
WAIT = 20.0


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip") or not shutil.which("iptables"):
        return "needs iproute2 and iptables"
    probe = f"wpprobe{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "ip netns is unavailable here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def in_ns(ns: str, *cmd: str) -> None:
    sh("ip", "netns", "exec", ns, *cmd)


def ns_socket(ns: str, family: int = socket.AF_INET) -> socket.socket:
    """A socket living in namespace `ns`: created by a thread that joined it (setns is per thread)."""
    out: list[Any] = []

    def make() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/var/run/netns/{ns}") as f:
            if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                out.append(OSError(ctypes.get_errno(), "setns failed"))
                return
        out.append(socket.socket(family, socket.SOCK_STREAM))

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


class BannerService:
    """Server-speaks-first, like SSH: greets with a banner naming the peer it sees, then echoes.
    `peers` lists every peer address that connected."""

    def __init__(self, ns: str, ports: list[int]) -> None:
        self.socks = []
        self.peers: list[str] = []
        for port in ports:
            s = ns_socket(ns)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(128)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                c, addr = ls.accept()
            except OSError:
                return
            self.peers.append(addr[0])
            threading.Thread(target=self._serve, args=(c, addr), daemon=True).start()

    @staticmethod
    def _serve(c: socket.socket, addr: Any) -> None:
        with c:
            try:
                c.sendall(f"SSH-2.0-test peer={addr[0]}\r\n".encode())
                while data := c.recv(65536):
                    c.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        for s in self.socks:
            s.close()


ORIGIN_CODE = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import threading

hits_path = sys.argv[1]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open(hits_path, "a") as f:
            f.write(f"{self.path} {self.headers.get('Host', '-')} {self.client_address[0]}\n")
        body = f"page {self.path} for {self.headers.get('Host')}\n".encode()
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

servers = [ThreadingHTTPServer(("0.0.0.0", int(p)), H) for p in sys.argv[2:]]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""


class GatewayProxy:
    """One `webproxy run` in the gateway namespace, with its own config file, logs and stderr."""

    def __init__(self, ns: str, tmp: Path, name: str, sections: dict[str, dict[str, Any]]) -> None:
        self.ns = ns
        self.dir = tmp / name
        self.dir.mkdir()
        self.log = self.dir / "access.log"
        self.err = self.dir / "stderr.log"
        self.sections = {
            "log": {"access_log": str(self.log), "level": "info"},
            "cache": {"directory": str(self.dir / "cache")},
            "refresh": {"enabled": False},
            **sections,
        }
        self.config = self.write_config()
        self._errf = open(self.err, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "webproxy", "run", "-c", str(self.config)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=self._errf)
        deadline = time.monotonic() + WAIT
        while "listening on" not in self.err.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.err.read_text()
            time.sleep(0.05)

    def write_config(self) -> Path:
        return write_config(self.dir / "webproxy.toml", self.sections)

    def reconfigure(self, section: str, **keys: Any) -> None:
        """Change the config file and SIGHUP the proxy; waits for it to say it reloaded."""
        before = self.err.read_text().count("reloaded ")
        self.sections[section] = {**self.sections.get(section, {}), **keys}
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)
        self.wait_stderr(lambda text: text.count("reloaded ") > before)

    def wait_stderr(self, check: Any, what: str = "") -> str:
        deadline = time.monotonic() + WAIT
        while True:
            text = self.err.read_text()
            if (check(text) if callable(check) else check in text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or check!r} not in the proxy's stderr: {text[-1500:]}")
            time.sleep(0.05)

    def access_log(self, needle: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            text = self.log.read_text() if self.log.exists() else ""
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in the access log: {text[-1500:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._errf.close()


class Topology:
    """client / gateway / server namespaces, routed through the gateway."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tag = secrets.token_hex(3)
        self.client, self.gateway, self.server = f"hc{tag}", f"hg{tag}", f"hs{tag}"
        self.client_if = f"hc{tag}b"
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proxies: list[GatewayProxy] = []
        self.banner: BannerService | None = None
        self.hits = tmp / "origin-hits.txt"
        self.hits.write_text("")
        for ns in (self.client, self.gateway, self.server):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        c, g, s = self.client, self.gateway, self.server
        sh("ip", "link", "add", f"hc{tag}a", "netns", c, "type", "veth", "peer", "name", f"hc{tag}b", "netns", g)
        sh("ip", "link", "add", f"hs{tag}a", "netns", s, "type", "veth", "peer", "name", f"hs{tag}b", "netns", g)
        for ns, dev, addr in ((c, f"hc{tag}a", CLIENT), (g, f"hc{tag}b", GW_C), (g, f"hs{tag}b", GW_S),
                              (s, f"hs{tag}a", SERVER)):
            in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            in_ns(ns, "ip", "link", "set", dev, "up")
        in_ns(c, "ip", "route", "add", "default", "via", GW_C)
        in_ns(s, "ip", "route", "add", "default", "via", GW_S)
        in_ns(g, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def iptables(self, script: str, proxy_port: int, ports: str) -> None:
        """Run a shipped script (`redirect` or `tproxy`) in the gateway namespace."""
        env = {"PROXY_PORT": str(proxy_port), "CLIENT_IF": self.client_if, "PORTS": ports}
        in_ns(self.gateway, "env", *[f"{k}={v}" for k, v in env.items()], "sh",
              str(ROOT / f"conf/iptables-{script}.sh"), "start")

    def start_origin(self, http_ports: list[int], banner_ports: list[int]) -> None:
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.server, sys.executable, "-c", ORIGIN_CODE,
                                            str(self.hits), *map(str, http_ports)]))
        self.banner = BannerService(self.server, banner_ports)
        deadline = time.monotonic() + WAIT
        for port in http_ports:
            while subprocess.run(["ip", "netns", "exec", self.gateway, "curl", "-s", "-o", "/dev/null",
                                  f"http://{SERVER}:{port}/"], capture_output=True).returncode != 0:
                assert time.monotonic() < deadline, "origin did not start"
                time.sleep(0.1)
        self.hits.write_text("")

    def proxy(self, name: str, sections: dict[str, dict[str, Any]]) -> GatewayProxy:
        p = GatewayProxy(self.gateway, self.tmp, name, sections)
        self.proxies.append(p)
        return p

    def origin_hits(self) -> list[list[str]]:
        """[path, host, peer] for every request the origin answered."""
        return [line.split(" ") for line in self.hits.read_text().splitlines()]

    def connect(self, host: str, port: int, timeout: float = WAIT) -> socket.socket:
        s = ns_socket(self.client)
        s.settimeout(timeout)
        s.connect((host, port))
        return s

    def close(self) -> None:
        for p in self.proxies:
            p.stop()
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.banner is not None:
            self.banner.close()
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def read_line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        try:
            chunk = s.recv(1)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def read_until_closed(s: socket.socket) -> bytes:
    """Everything until the peer closes, under the socket's own timeout."""
    return read_all(s, s.gettimeout())


class BannerEcho:
    """Server-speaks-first, like SSH: greets with a banner naming the peer it sees, then echoes."""

    def __init__(self, ns: str, ports: list[int]):
        self.socks = []
        for port in ports:
            s = ns_socket(ns, socket.AF_INET6)  # dual-stack: serves IPv4 and IPv6
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            s.listen(64)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, ls):
        while True:
            try:
                c, addr = ls.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c, addr), daemon=True).start()

    @staticmethod
    def _serve(c, addr):
        with c:
            try:
                peer = addr[0].removeprefix("::ffff:")
                c.sendall(f"SSH-2.0-test peer={peer}\r\n".encode())
                while data := c.recv(65536):
                    c.sendall(data)
            except OSError:
                pass

    def close(self):
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
