"""The SOCKS5 listener inside a running webproxy: config, access rules, access-log lines, limits,
no fd leaks; and the reply codes that need real routes (in a network namespace of our own)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.socks_support import TcpEcho, UdpEcho, open_session, parse_udp_packet, request_reply, udp_packet
from tests.support import ROOT, ProxyProcess, curl, fd_count, free_port, write_config

CONNECT, BIND, UDP = 1, 2, 3


@pytest.fixture(scope="module")
def echo():
    e = TcpEcho()
    yield e
    e.close()


def socks_proxy(make_proxy, **socks) -> tuple[ProxyProcess, int]:
    port = free_port()
    socks.setdefault("deny_networks", [])  # the test targets live on loopback
    p = make_proxy({"socks": {"listen": [f"127.0.0.1:{port}"], **socks}, "cache": {"enabled": False}})
    return p, port


def test_access_log_has_one_squid_line_per_session(make_proxy, origin):
    p, port = socks_proxy(make_proxy)
    r = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{origin.port}/text/logged")
    assert r.stdout == b"hello logged\n"
    line = p.access_lines(wait_for=1)[-1]
    # time elapsed client code/status bytes method URL user hierarchy/peer type
    fields = line.split()
    assert len(fields) == 10, line
    assert fields[2] == "127.0.0.1" and fields[3] == "TCP_TUNNEL/200"
    assert int(fields[4]) > len(b"hello logged\n") + 60  # both directions: request and response
    assert fields[5] == "SOCKS5-CONNECT" and fields[6] == f"localhost:{origin.port}"
    assert fields[7] == "-" and fields[8] == "HIER_DIRECT/127.0.0.1"
    assert int(fields[1]) >= 0


def test_udp_and_refused_sessions_are_logged(make_proxy, echo):
    p, port = socks_proxy(make_proxy, allow_ports=[echo.port])
    udp = UdpEcho()
    try:
        ctl, rep, rhost, rport = open_session(port, UDP, "0.0.0.0", 0)
        assert rep == 0
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(5)
        c.sendto(udp_packet("127.0.0.1", udp.port, b"x"), (rhost, rport))  # port not allowed: dropped
        c.sendto(udp_packet("127.0.0.1", echo.port, b"x"), (rhost, rport))  # allowed, nothing listens
        time.sleep(0.2)
        assert udp.senders == []
        c.close()
        ctl.close()
    finally:
        udp.close()
    assert request_reply(port, CONNECT, "127.0.0.1", 22) == 0x02
    lines = p.access_lines(wait_for=2)  # in the order the sessions ended
    udp_line = next(line for line in lines if " SOCKS5-UDP " in line)
    denied = next(line for line in lines if " SOCKS5-CONNECT " in line)
    assert "TCP_TUNNEL/200" in udp_line and f" SOCKS5-UDP 127.0.0.1:{echo.port} " in udp_line
    assert "TCP_DENIED/403" in denied and " SOCKS5-CONNECT 127.0.0.1:22 " in denied


def test_allow_clients_governs_socks(make_proxy, echo):
    _, port = socks_proxy(make_proxy)
    assert request_reply(port, CONNECT, "127.0.0.1", echo.port) == 0
    p2 = make_proxy({"socks": {"listen": [f"127.0.0.1:{(port2 := free_port())}"], "deny_networks": []},
                     "access": {"allow_clients": ["10.0.0.0/8"]}, "cache": {"enabled": False}})
    assert request_reply(port2, CONNECT, "127.0.0.1", echo.port) == 0x02
    assert "TCP_DENIED/403" in p2.access_lines(wait_for=1)[-1]


def test_domain_filter_governs_socks_names(make_proxy, echo):
    p, port = socks_proxy(make_proxy)
    p.stop()
    p2 = make_proxy({"socks": {"listen": [f"127.0.0.1:{port}"], "deny_networks": []},
                     "access": {"deny_domains": ["localhost"]}, "cache": {"enabled": False}})
    assert request_reply(port, CONNECT, "localhost", echo.port) == 0x02
    r = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{echo.port}/")
    assert r.returncode != 0
    assert "TCP_DENIED/403" in p2.access_lines(wait_for=1)[-1]


def test_default_socks_config_refuses_the_proxy_host(make_proxy, echo):
    port = free_port()
    make_proxy({"socks": {"listen": [f"127.0.0.1:{port}"]}, "cache": {"enabled": False}})
    assert request_reply(port, CONNECT, "127.0.0.1", echo.port) == 0x02
    assert request_reply(port, CONNECT, "localhost", echo.port) == 0x02


def test_socks_is_off_by_default(proxy):
    # nothing about SOCKS in the log (the start line names the config path, which may say "socks")
    assert "socks" not in proxy.stderr().lower().replace("test_socks_is_off_by_default", "")
    from webproxy.config import from_dict

    assert from_dict({}).socks["listen"] == []


@pytest.mark.parametrize("socks, needle", [
    ({"listen": ["127.0.0.1:1080"], "deny_networks": ["10.0.0.0/33"]}, "socks.deny_networks"),
    ({"listen": ["127.0.0.1:1080"], "commands": ["connect", "ping"]}, "socks.commands"),
    ({"listen": "nope"}, "socks.listen"),
    ({"idle_timeout": -1}, "socks.idle_timeout"),
])
def test_socks_config_mistakes_are_one_line_and_exit_2(tmp_path, socks, needle):
    path = write_config(tmp_path / "bad.toml", {"socks": socks})
    r = subprocess.run([sys.executable, "-m", "webproxy", "run", "--check", "-c", str(path)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_socks_port_in_use_is_one_line_and_exit_2(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        p = ProxyProcess(tmp_path, {"socks": {"listen": [f"127.0.0.1:{busy.getsockname()[1]}"]}})
        with pytest.raises(RuntimeError, match="exited 2"):
            p.start()
        assert "socks.listen" in p.stderr() and "Traceback" not in p.stderr()
        p.stop()
    finally:
        busy.close()


def test_fd_count_is_flat_after_300_sessions_with_resets(make_proxy, echo):
    p, port = socks_proxy(make_proxy)
    udp = UdpEcho()
    assert p.proc is not None

    def once(i: int) -> None:
        kind = i % 5
        if kind == 0:  # a complete echo
            s, rep, _, _ = open_session(port, CONNECT, "127.0.0.1", echo.port)
            s.sendall(b"x" * 1000)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
            s.close()
        elif kind == 1:  # the client resets mid-stream
            s, rep, _, _ = open_session(port, CONNECT, "127.0.0.1", echo.port)
            s.sendall(b"y" * 5000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        elif kind == 2:  # reset during the negotiation
            s = socket.create_connection(("127.0.0.1", port), 5)
            s.sendall(b"\x05\x01")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        elif kind == 3:  # a UDP association, one datagram, then a reset of its control connection
            s, rep, rhost, rport = open_session(port, UDP, "0.0.0.0", 0)
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.settimeout(5)
            c.sendto(udp_packet("127.0.0.1", udp.port, b"u"), (rhost, rport))
            assert parse_udp_packet(c.recv(100))[2] == b"echo:u"
            c.close()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        else:  # BIND, abandoned before anyone connects
            s, rep, _, _ = open_session(port, BIND, "127.0.0.1", 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    try:
        for i in range(10):  # warm up lazily opened fds (resolver, loop internals)
            once(i)
        time.sleep(0.5)
        before = fd_count(p.proc.pid)
        for i in range(300):
            once(i)
        deadline = time.monotonic() + 10
        while fd_count(p.proc.pid) > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fd_count(p.proc.pid) == before
        assert p.proc.poll() is None
        assert "Traceback" not in p.stderr()
    finally:
        udp.close()


# -- reply codes that need routes: a network namespace of our own --------------------------------

NS_CLIENT = """
import sys
sys.path.insert(0, {root!r})
from tests.socks_support import request_reply
print(request_reply({port}, 1, sys.argv[1], int(sys.argv[2]), timeout=20))
"""


@pytest.fixture(scope="module")
def netns_proxy(tmp_path_factory):
    """webproxy in a namespace with loopback, one unreachable route (10.13.0.0/16), a link where
    nobody answers (10.15.0.0/24) and no default route (so DNS cannot get out either)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    ns = f"wp13s{os.getpid()}"

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    tmp = tmp_path_factory.mktemp("nsproxy")
    port = 1080
    cfg = write_config(tmp / "webproxy.toml", {
        "server": {"listen": ["127.0.0.1:3128"]}, "cache": {"enabled": False},
        "log": {"access_log": str(tmp / "access.log")}, "upstream": {"connect_timeout": 1.5},
        "socks": {"listen": [f"127.0.0.1:{port}"], "deny_networks": []}})
    proc = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "unreachable", "10.13.0.0/16")
        # A veth pair whose far end has no address: SYNs to 10.15.0.2 go out and are never answered.
        sh("ip", "netns", "exec", ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", "10.15.0.1/24", "dev", "v0")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "v0", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "v1", "up")
        sh("ip", "netns", "exec", ns, "ip", "neigh", "add", "10.15.0.2", "lladdr", "02:00:00:00:00:02", "dev", "v0")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "webproxy", "run", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "stderr.log", "wb"), env=env)  # noqa: SIM115
        deadline = time.monotonic() + 20
        while "listening on" not in (tmp / "stderr.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "stderr.log").read_text()
            time.sleep(0.05)
        code = NS_CLIENT.format(root=str(ROOT), port=port)

        def reply(host: str, dport: int) -> int:
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, host, str(dport)],
                                 capture_output=True, text=True, timeout=40)
            assert out.returncode == 0, out.stderr
            return int(out.stdout)

        yield reply
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("host, code, meaning", [
    ("10.99.0.1", 0x03, "network unreachable (no route at all)"),
    ("10.13.0.1", 0x04, "host unreachable (an unreachable route)"),
    ("nowhere.example", 0x04, "host unreachable (the name does not resolve)"),
    ("10.15.0.2", 0x06, "TTL expired (nobody answers the connect in time)"),
    ("127.0.0.1", 0x05, "connection refused"),
])
def test_reply_codes_from_real_routes(netns_proxy, host, code, meaning):
    assert netns_proxy(host, 9) == code, meaning


def test_socks_listener_runs_in_every_worker(make_proxy, echo):
    port = free_port()
    p = make_proxy({"server": {"workers": 2}, "socks": {"listen": [f"127.0.0.1:{port}"], "deny_networks": []},
                    "cache": {"enabled": False}})
    for _ in range(6):
        assert request_reply(port, CONNECT, "127.0.0.1", echo.port) == 0
    assert "already in use" not in p.stderr()
