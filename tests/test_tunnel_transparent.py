"""Transparent mode for real: network namespaces, veth pairs, iptables REDIRECT and TPROXY.

    client ns 10.200.1.2 --veth-- 10.200.1.1 gateway ns 10.200.2.1 --veth-- 10.200.2.2 server ns
              fd00:200:1::2           fd00:200:1::1      fd00:200:2::1          fd00:200:2::2

Each gateway listener is one dual-stack socket ([::]:3129 for REDIRECT, [::]:3130 for TPROXY;
IPv4 clients arrive v4-mapped), so SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST, IP_TRANSPARENT and
IPV6_TRANSPARENT are all exercised.

The gateway namespace runs the transparent listener (a subprocess under `ip netns exec`) with the
rules from conf/iptables-*.sh; the client and the servers are sockets of this test process created
inside their namespaces. Nothing here touches the host's own network namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.netns_support import BannerEcho, in_ns, ns_socket, read_line, sh, skip_reason

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0
REDIRECT_PORT, TPROXY_PORT = 3129, 3130
PROXY_PORT = 3128  # stands for the proxy's explicit listener in the loop test
CLIENT, GW_C, GW_S, SERVER = "10.200.1.2", "10.200.1.1", "10.200.2.1", "10.200.2.2"
CLIENT6, GW_C6, GW_S6, SERVER6 = "fd00:200:1::2", "fd00:200:1::1", "fd00:200:2::1", "fd00:200:2::2"


_REASON = skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


GATEWAY_CODE = """
import asyncio, json, sys
from tunnel.transparent import TransparentListener

async def on_http(sock, initial, orig_dst, client):
    loop = asyncio.get_running_loop()
    body = json.dumps({"orig_dst": list(orig_dst), "client": client[0],
                       "initial": initial.decode("latin-1")}).encode()
    head = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body)
    await loop.sock_sendall(sock, head + body)
    sock.close()

async def main(mode, port, spoof):
    host = "::"
    lst = TransparentListener([(host, port)], on_http=on_http, mode=mode, sniff_timeout=0.3,
                              connect_timeout=5, spoof_client_address=spoof,
                              own_listeners=[("0.0.0.0", %(proxy)d)], log=lambda l: print(l, flush=True))
    lst.start()
    print("READY", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"))
""".replace("%(proxy)d", str(PROXY_PORT))


def _pump(stream, q):
    for line in stream:
        q.put(line.rstrip("\n"))


def gateway_log(topo, mode: str, pattern: str) -> str:
    """The next line of the gateway's connection log (for `mode`) matching `pattern`."""
    seen = []
    while True:
        try:
            line = topo["logs"][mode].get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no {mode} log line matching {pattern!r}; saw {seen}") from None
        seen.append(line)
        if re.search(pattern, line):
            return line


@pytest.fixture(scope="module")
def topology():
    tag = secrets.token_hex(3)
    c, g, s = f"wpc{tag}", f"wpg{tag}", f"wps{tag}"
    created: list[str] = []
    procs: list[subprocess.Popen] = []
    logs: dict[str, queue.Queue] = {}
    server = None
    try:
        for ns in (c, g, s):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", f"vc{tag}a", "netns", c, "type", "veth", "peer", "name", f"vc{tag}b", "netns", g)
        sh("ip", "link", "add", f"vs{tag}a", "netns", s, "type", "veth", "peer", "name", f"vs{tag}b", "netns", g)
        for ns, dev, addr, addr6 in ((c, f"vc{tag}a", CLIENT, CLIENT6), (g, f"vc{tag}b", GW_C, GW_C6),
                                     (g, f"vs{tag}b", GW_S, GW_S6), (s, f"vs{tag}a", SERVER, SERVER6)):
            in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            in_ns(ns, "ip", "-6", "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            in_ns(ns, "ip", "link", "set", dev, "up")
        in_ns(c, "ip", "route", "add", "default", "via", GW_C)
        in_ns(s, "ip", "route", "add", "default", "via", GW_S)
        in_ns(c, "ip", "-6", "route", "add", "default", "via", GW_C6)
        in_ns(s, "ip", "-6", "route", "add", "default", "via", GW_S6)
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0", "net.ipv6.conf.all.forwarding=1"):
            in_ns(g, "sysctl", "-q", "-w", key)
        # The shipped scripts, run inside the gateway namespace.
        env = {"PROXY_PORT": str(REDIRECT_PORT), "CLIENT_IF": f"vc{tag}b", "PORTS": f"22,80,7000,{PROXY_PORT}",
               "IPV6": "1"}
        in_ns(g, "env", *[f"{k}={v}" for k, v in env.items()], "sh", str(ROOT / "conf/iptables-redirect.sh"), "start")
        env = {"PROXY_PORT": str(TPROXY_PORT), "CLIENT_IF": f"vc{tag}b", "PORTS": "2222,8080", "IPV6": "1"}
        in_ns(g, "env", *[f"{k}={v}" for k, v in env.items()], "sh", str(ROOT / "conf/iptables-tproxy.sh"), "start")

        server = BannerEcho(s, [22, 2222, 7000])
        for mode, port, spoof in (("redirect", REDIRECT_PORT, "0"), ("tproxy", TPROXY_PORT, "1")):
            p = subprocess.Popen(["ip", "netns", "exec", g, sys.executable, "-c", GATEWAY_CODE, mode, str(port), spoof],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            line = p.stdout.readline()
            assert line.strip() == "READY", p.stderr.read()
            logs[mode] = queue.Queue()
            threading.Thread(target=_pump, args=(p.stdout, logs[mode]), daemon=True).start()
        pids = {mode: p.pid for mode, p in zip(("redirect", "tproxy"), procs, strict=True)}
        yield {"client": c, "gateway": g, "server": s, "logs": logs, "pids": pids}
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(WAIT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if server is not None:
            server.close()
        for ns in created:  # deleting a namespace removes its veths and its iptables rules
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def client_connect(topo, host: str, port: int) -> socket.socket:
    s = ns_socket(topo["client"], socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(WAIT)
    s.connect((host, port))
    return s


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(65536):
        out += chunk
    return bytes(out)


def echo_roundtrip(s: socket.socket, size: int = 2 << 20) -> None:
    payload = os.urandom(size)
    got = bytearray()

    def reader():
        got.extend(recv_all(s))

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    t.join(WAIT)
    assert hashlib.sha256(bytes(got)).digest() == hashlib.sha256(payload).digest()


def http_get(topo, host: str, port: int, path: str) -> dict:
    with client_connect(topo, host, port) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: origin.test\r\n\r\n".encode())
        raw = recv_all(s)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), raw
    return json.loads(body)


def test_redirect_relays_server_speaks_first_protocol_byte_exact(topology):
    with client_connect(topology, SERVER, 22) as s:
        # Nothing is sent first: after the sniff timeout the gateway connects to the original
        # destination, whose banner shows the gateway's address (REDIRECT does not spoof).
        assert read_line(s) == f"SSH-2.0-test peer={GW_S}\r\n".encode()
        echo_roundtrip(s)


def test_redirect_relays_client_first_binary_protocol_byte_exact(topology):
    with client_connect(topology, SERVER, 7000) as s:
        s.sendall(b"\x16\x03\x01binary-hello")
        assert read_line(s).startswith(b"SSH-2.0-test")
        assert s.recv(64) == b"\x16\x03\x01binary-hello"
        echo_roundtrip(s)


def test_redirect_hands_http_request_to_front_end_with_original_destination(topology):
    seen = http_get(topology, SERVER, 80, "/hello?x=1")
    assert seen["orig_dst"] == [SERVER, 80]
    assert seen["client"] == CLIENT
    assert seen["initial"].startswith("GET /hello?x=1 HTTP/1.1\r\nHost: origin.test\r\n")


def test_redirect_over_ipv6_relays_raw_bytes_byte_exact(topology):
    with client_connect(topology, SERVER6, 22) as s:
        assert read_line(s) == f"SSH-2.0-test peer={GW_S6}\r\n".encode()
        echo_roundtrip(s)


def test_redirect_over_ipv6_hands_http_request_with_original_destination(topology):
    seen = http_get(topology, SERVER6, 80, "/six")
    assert seen["orig_dst"] == [SERVER6, 80]
    assert seen["client"] == CLIENT6


def test_redirect_refuses_connection_whose_destination_is_our_own_listener(topology):
    # The gateway's own address on the proxy port: relaying it would loop back into webproxy.
    with client_connect(topology, GW_C, PROXY_PORT) as s:
        try:
            assert recv_all(s) == b""
        except ConnectionResetError:
            pass
    gateway_log(topology, "redirect", rf"client={CLIENT}:\d+ upstream={GW_C}:{PROXY_PORT} .*end=refused-loop")


def test_tproxy_relays_raw_bytes_from_the_clients_own_address(topology):
    with client_connect(topology, SERVER, 2222) as s:
        # spoof_client_address: the server sees the client's address, not the gateway's.
        assert read_line(s) == f"SSH-2.0-test peer={CLIENT}\r\n".encode()
        echo_roundtrip(s)


def test_tproxy_over_ipv6_relays_raw_bytes_from_the_clients_own_address(topology):
    with client_connect(topology, SERVER6, 2222) as s:
        assert read_line(s) == f"SSH-2.0-test peer={CLIENT6}\r\n".encode()
        echo_roundtrip(s)


def test_tproxy_over_ipv6_hands_http_request_with_original_destination(topology):
    seen = http_get(topology, SERVER6, 8080, "/six-tproxy")
    assert seen["orig_dst"] == [SERVER6, 8080]
    assert seen["client"] == CLIENT6


def test_tproxy_hands_http_request_to_front_end_with_original_destination(topology):
    seen = http_get(topology, SERVER, 8080, "/via-tproxy")
    assert seen["orig_dst"] == [SERVER, 8080]
    assert seen["initial"].startswith("GET /via-tproxy HTTP/1.1\r\n")


def test_refused_original_destination_is_passed_on_to_the_client(topology):
    # Port 80 is redirected but the server host has nothing listening there; non-HTTP bytes
    # make the gateway try a raw relay, and the refusal reaches the client as a reset or EOF.
    with client_connect(topology, SERVER, 80) as s:
        s.sendall(b"\x00\x01not-http")
        try:
            assert recv_all(s) == b""
        except ConnectionResetError:
            pass
    line = gateway_log(topology, "redirect", rf"upstream={SERVER}:80 .*end=upstream-failed")
    assert "connection refused" in line


def test_raw_relays_are_logged_with_bytes_each_way(topology):
    with client_connect(topology, SERVER, 7000) as s:
        s.sendall(b"x" * 1000)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)
    assert got.endswith(b"x" * 1000)
    gateway_log(topology, "redirect", rf"transparent client={CLIENT}:\d+ upstream={SERVER}:7000 up=1000 "
                rf"down={len(got)} duration=\S+ end=closed")


def test_gateway_scripts_stop_removes_every_rule_they_added():
    ns = f"wpx{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        def state():
            out = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                                  "iptables-save | grep -v '^#'; ip rule show; ip route show table all"],
                                 capture_output=True, text=True, check=True).stdout
            return sorted(line for line in out.splitlines() if "WEBPROXY" in line or "fwmark" in line
                          or "table 100" in line)
        before = state()
        for script in ("iptables-redirect.sh", "iptables-tproxy.sh"):
            run = ("env", "CLIENT_IF=lan0", "PORTS=80,443", "sh", str(ROOT / "conf" / script))
            in_ns(ns, *run, "start")
            added = state()
            assert added != []
            in_ns(ns, *run, "start")  # idempotent: running it twice adds nothing more
            assert state() == added
            in_ns(ns, *run, "stop")
            assert state() == before == []
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _rst_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_gateway_keeps_no_fds_after_stress_with_resets_and_refusals(topology):
    pid = topology["pids"]["redirect"]
    assert "python" in Path(f"/proc/{pid}/cmdline").read_text()  # `ip netns exec` execs in place
    with client_connect(topology, SERVER, 7000) as s:  # warm-up, so lazily made objects are in the baseline
        s.sendall(b"warm")
        s.shutdown(socket.SHUT_WR)
        recv_all(s)
    gateway_log(topology, "redirect", rf"upstream={SERVER}:7000 .*end=closed")
    before = len(os.listdir(f"/proc/{pid}/fd"))

    logged = 0
    for i in range(150):
        kind = i % 5
        if kind == 0:  # raw relay, half-close
            with client_connect(topology, SERVER, 7000) as s:
                s.sendall(b"\x01" * 3000)
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s).endswith(b"\x01" * 3000)
        elif kind == 1:  # client resets in the middle of a relay
            s = client_connect(topology, SERVER, 7000)
            s.sendall(b"\x02" * 3000)
            _rst_close(s)
        elif kind == 2:  # client resets while the gateway is still sniffing (too little to tell yet)
            s = client_connect(topology, SERVER, 7000)
            s.sendall(b"GE")
            _rst_close(s)
        elif kind == 3:  # original destination refuses
            with client_connect(topology, SERVER, 80) as s:
                s.sendall(b"\x00not-http")
                try:
                    recv_all(s)
                except ConnectionResetError:
                    pass
        else:  # HTTP handed to the front end callback
            assert http_get(topology, SERVER, 80, f"/{i}")["orig_dst"] == [SERVER, 80]
            continue
        logged += 1
    for _ in range(logged):
        gateway_log(topology, "redirect", r" transparent client=")
    assert topology["logs"]["redirect"].empty()
    after = len(os.listdir(f"/proc/{pid}/fd"))
    assert after == before, f"gateway fds before {before}, after {after}"
