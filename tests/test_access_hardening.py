"""Who may reach what (issue "Hardening", items 6, 13, 14): no spelling of the proxy's own address
tunnels a client back into it, LAN clients cannot reach services on the proxy host's loopback,
refused clients are closed at once, and the status page is for admin clients only."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time

import pytest

from tests.netns_support import skip_reason
from tests.support import MethodEchoOrigin, RawClient, curl, free_port, read_all


@pytest.mark.parametrize("spelling", ["[::ffff:127.0.0.1]", "0.0.0.0", "127.0.0.1", "localhost"])
def test_connect_to_the_proxy_itself_by_any_spelling_is_a_loop(make_proxy, spelling):
    port = free_port()
    p = make_proxy({"server": {"listen": [f"127.0.0.1:{port}"]}, "access": {"connect_ports": [443, port]}})
    s = socket.create_connection(("127.0.0.1", port), 10)
    s.sendall(f"CONNECT {spelling}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 508 "), reply[:80]
    assert "TCP_DENIED/508" in p.access_lines(wait_for=1)[-1]


def test_connect_to_the_unspecified_ipv6_address_reaches_no_listener_of_ours(make_proxy):
    port = free_port()
    make_proxy({"server": {"listen": [f"[::1]:{port}"]}, "access": {"connect_ports": [port]}})
    s = socket.create_connection(("::1", port), 10)
    s.sendall(f"CONNECT [::]:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert read_all(s).startswith(b"HTTP/1.1 508 ")


def test_refused_client_is_answered_403_and_closed(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "access": {"allow_clients": ["10.99.0.0/16"]}})
    c = RawClient(p.port)
    c.send(f"GET {origin.url('/text/x')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp, _ = c.response()
    assert resp.status_code == 403 and c.closed_by_peer(wait=2)


def test_a_silent_refused_client_is_closed_long_before_the_idle_timeout(make_proxy):
    p = make_proxy({"access": {"allow_clients": ["10.99.0.0/16"], "max_connections": 3}})
    socks = [socket.create_connection(("127.0.0.1", p.port), 10) for _ in range(10)]
    t0 = time.monotonic()
    for s in socks:  # more than max_connections: refused clients do not count against it
        s.settimeout(10)
        assert s.recv(100) == b""
    assert time.monotonic() - t0 < 5


def test_status_page_is_for_admin_clients_only(make_proxy):
    p = make_proxy({"access": {"admin_clients": ["10.99.0.0/16"]}})
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{p.port}/status")
    assert r.stdout == b"403"
    q = make_proxy()
    r = curl("-s", f"http://127.0.0.1:{q.port}/status")
    assert b"webproxy" in r.stdout and b"requests served" in r.stdout


@pytest.fixture
def lan_client():
    """A namespace on a veth link to this host: a client on the LAN, 10.203.1.2 -> 10.203.1.1."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    ns, here, there = f"wpa{tag}", f"wpa{tag}h", f"wpa{tag}t"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        run("ip", "addr", "add", "10.203.1.1/24", "dev", here)
        run("ip", "link", "set", here, "up")
        run("ip", "netns", "exec", ns, "ip", "addr", "add", "10.203.1.2/24", "dev", there)
        run("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
        run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield lambda *args: subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", *args],
                                           capture_output=True, timeout=30)
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_lan_clients_cannot_reach_the_proxy_hosts_loopback_services(make_proxy, origin, lan_client):
    port, local_port = free_port(), free_port()
    make_proxy({"cache": {"enabled": False},
                    "server": {"listen": [f"10.203.1.1:{port}", f"127.0.0.1:{local_port}"]},
                    "access": {"allow_clients": ["10.203.1.0/24", "127.0.0.0/8"],
                               "connect_ports": [origin.port]}})
    before = origin.hits["/text/private"]
    r = lan_client("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://10.203.1.1:{port}",
                   origin.url("/text/private"))
    assert r.stdout == b"403"
    r = lan_client("-o", "/dev/null", "-w", "%{http_code}", "-x", f"http://10.203.1.1:{port}",
                   f"http://localhost:{origin.port}/text/private")
    assert r.stdout == b"403"
    r = lan_client("-p", "-o", "/dev/null", "-w", "%{http_connect}", "-x", f"http://10.203.1.1:{port}",
                   origin.url("/text/private"))
    assert r.stdout == b"403"
    assert origin.hits["/text/private"] == before
    # a client on the proxy host itself is not restricted by deny_destinations
    assert curl("-x", f"http://127.0.0.1:{local_port}", origin.url("/text/private")).stdout == b"hello private\n"


def test_a_target_ending_in_a_question_mark_is_forwarded_byte_exact(proxy):
    o = MethodEchoOrigin()
    c = RawClient(proxy.port)
    c.send(f"GET http://127.0.0.1:{o.port}/q? HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert c.response()[1] == b"GET /q? HTTP/1.1"
    o.stop()
