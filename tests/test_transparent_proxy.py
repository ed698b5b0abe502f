"""The whole proxy as a transparent gateway, for real: `webproxy run` inside a gateway namespace
with the shipped REDIRECT rules; a client namespace that knows nothing of the proxy; an origin
namespace. HTTP is served (and cached) by the proxy, anything else reaches its destination
byte-for-byte, and a forged Host cannot poison the cache.

    client ns 10.201.1.2 --veth-- 10.201.1.1 gateway ns 10.201.2.1 --veth-- 10.201.2.2 server ns
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns_support import BannerEcho, in_ns, ns_socket, read_line, sh, skip_reason
from tests.support import write_config

_REASON = skip_reason()

pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

ROOT = Path(__file__).resolve().parent.parent
CLIENT, GW_C, GW_S, SERVER = "10.201.1.2", "10.201.1.1", "10.201.2.1", "10.201.2.2"

ORIGIN_CODE = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

hits_path = sys.argv[2]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open(hits_path, "a") as f:
            f.write(self.path + " " + self.headers.get("Host", "-") + "\n")
        body = f"page {self.path} for {self.headers.get('Host')}\n".encode()
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    tag = secrets.token_hex(3)
    c, g, s = f"wtc{tag}", f"wtg{tag}", f"wts{tag}"
    created: list[str] = []
    procs: list[subprocess.Popen] = []
    banner = None
    try:
        for ns in (c, g, s):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", f"tc{tag}a", "netns", c, "type", "veth", "peer", "name", f"tc{tag}b", "netns", g)
        sh("ip", "link", "add", f"ts{tag}a", "netns", s, "type", "veth", "peer", "name", f"ts{tag}b", "netns", g)
        for ns, dev, addr in ((c, f"tc{tag}a", CLIENT), (g, f"tc{tag}b", GW_C), (g, f"ts{tag}b", GW_S),
                              (s, f"ts{tag}a", SERVER)):
            in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            in_ns(ns, "ip", "link", "set", dev, "up")
        in_ns(c, "ip", "route", "add", "default", "via", GW_C)
        in_ns(s, "ip", "route", "add", "default", "via", GW_S)
        in_ns(g, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        env = {"PROXY_PORT": "3129", "CLIENT_IF": f"tc{tag}b", "PORTS": "80,22"}
        in_ns(g, "env", *[f"{k}={v}" for k, v in env.items()], "sh", str(ROOT / "conf/iptables-redirect.sh"), "start")

        hits = tmp / "origin-hits.txt"
        hits.write_text("")
        procs.append(subprocess.Popen(["ip", "netns", "exec", s, sys.executable, "-c", ORIGIN_CODE, "80", str(hits)]))
        banner = BannerEcho(s, [22])

        log = tmp / "access.log"
        err = tmp / "stderr.log"
        cfg = write_config(tmp / "webproxy.toml", {
            "server": {"listen": ["127.0.0.1:3128"]},
            "access": {"allow_clients": ["127.0.0.0/8", "10.201.0.0/16"]},
            "log": {"access_log": str(log)},
            "cache": {"directory": str(tmp / "cache")},
            "refresh": {"enabled": False},
            "transparent": {"listen": ["0.0.0.0:3129"], "mode": "redirect", "sniff_timeout": 0.5},
        })
        errf = open(err, "wb")  # noqa: SIM115
        proxy = subprocess.Popen(["ip", "netns", "exec", g, sys.executable, "-m", "webproxy", "run", "-c", str(cfg)],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=errf)
        procs.append(proxy)
        deadline = time.monotonic() + 20
        while "listening on" not in err.read_text() and time.monotonic() < deadline:
            assert proxy.poll() is None, err.read_text()
            time.sleep(0.05)
        # the origin must be up too
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "netns", "exec", g, "curl", "-s", "-o", "/dev/null", f"http://{SERVER}/"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        hits.write_text("")
        yield {"client": c, "gateway": g, "hits": hits, "log": log, "err": err, "proxy": proxy}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if banner is not None:
            banner.close()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def client_curl(gw, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", gw["client"], "curl", "-sS", "-m", "20", *args],
                          capture_output=True, timeout=30)


def origin_hits(gw) -> list[str]:
    return gw["hits"].read_text().splitlines()


def wait_log(gw, needle: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = gw["log"].read_text() if gw["log"].exists() else ""
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in access log: {text[-500:]}")


def test_http_through_the_transparent_path_is_cached(gateway):
    r1 = client_curl(gateway, "-i", f"http://{SERVER}/logo.png")
    r2 = client_curl(gateway, "-i", f"http://{SERVER}/logo.png")
    assert r1.stdout.endswith(f"page /logo.png for {SERVER}\n".encode()), r1
    assert r2.stdout.endswith(f"page /logo.png for {SERVER}\n".encode())
    assert b"x-cache: miss" in r1.stdout.lower() and b"x-cache: hit" in r2.stdout.lower()
    assert [h.split()[0] for h in origin_hits(gateway)].count("/logo.png") == 1
    log = wait_log(gateway, "TCP_MEM_HIT/200")
    assert f"{CLIENT} TCP_MEM_HIT/200" in log and f"http://{SERVER}/logo.png" in log


def test_forged_host_is_fetched_from_the_original_destination_and_not_cached(gateway):
    for _ in range(2):
        r = client_curl(gateway, "-H", "Host: bank.example", f"http://{SERVER}/forged")
        assert r.stdout == b"page /forged for bank.example\n"
    assert origin_hits(gateway).count("/forged bank.example") == 2


def test_non_http_protocol_is_relayed_byte_for_byte_to_its_destination(gateway):
    s = ns_socket(gateway["client"])
    s.settimeout(20)
    s.connect((SERVER, 22))
    banner = read_line(s)
    assert banner == f"SSH-2.0-test peer={GW_S}\r\n".encode()
    payload = os.urandom(300_000)
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        assert chunk
        got += chunk
    assert got == payload
    s.close()


def test_connection_to_the_proxys_own_listener_is_refused(gateway):
    # The client dials the gateway's redirected port 80 on the gateway itself: its original
    # destination is the gateway, not a server; the proxy must not loop into itself.
    before = len(origin_hits(gateway))
    r = client_curl(gateway, f"http://{GW_C}:3129/")
    # refused: closed (reset, or FIN if the client's bytes had not arrived yet) without any response
    assert r.returncode in (52, 56) and r.stdout == b"", r
    assert len(origin_hits(gateway)) == before
    assert gateway["proxy"].poll() is None
