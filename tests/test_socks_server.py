"""The SOCKS5 server (tunnel.socks) with real clients: curl, python-socks, and a raw RFC 1928
client for the replies those do not show. The server runs in-process (its own thread and loop)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.socks_support import (
    SocksThread,
    TcpEcho,
    UdpEcho,
    associate,
    open_session,
    parse_udp_packet,
    read_reply,
    recv_exact,
    request_reply,
    udp_packet,
)
from tests.support import Origin

CONNECT, BIND, UDP = 1, 2, 3


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def socks():
    servers: list[SocksThread] = []

    def make(**kw) -> SocksThread:
        s = SocksThread(**kw).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def echo():
    e = TcpEcho()
    yield e
    e.close()


def curl_via(flag: str, port: int, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "-m", "15", flag, f"127.0.0.1:{port}", *extra, url],
                          capture_output=True, timeout=30)


# -- CONNECT with curl ------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--socks5", "--socks5-hostname"])
def test_curl_fetches_through_socks5_connect(socks, origin: Origin, flag):
    s = socks()
    r = curl_via(flag, s.port, f"http://localhost:{origin.port}/text/socks")
    assert r.stdout == b"hello socks\n", r.stderr
    rec = s.wait_records(1)[-1]
    assert rec.command == "CONNECT" and rec.reply == 0
    # --socks5 resolves locally and sends an address; --socks5-hostname sends the name (ATYP 3)
    assert rec.target == (f"localhost:{origin.port}" if flag == "--socks5-hostname" else f"127.0.0.1:{origin.port}")
    assert rec.down > len(b"hello socks\n") and rec.up > 0


@pytest.mark.parametrize("flag", ["--socks5", "--socks5-hostname"])
def test_curl_with_username_and_password(socks, origin: Origin, flag):
    s = socks(users={"alice": "s3cret word"})
    r = curl_via(flag, s.port, f"http://localhost:{origin.port}/text/auth", "--proxy-user", "alice:s3cret word")
    assert r.stdout == b"hello auth\n", r.stderr
    assert s.wait_records(1)[-1].user == "alice"


def test_wrong_password_is_refused_and_the_connection_closed(socks, origin: Origin):
    s = socks(users={"alice": "right"})
    r = curl_via("--socks5", s.port, f"http://localhost:{origin.port}/text/x", "--proxy-user", "alice:wrong")
    assert r.returncode != 0 and r.stdout == b""
    rec = s.wait_records(1)[-1]
    assert rec.note == "auth-failed" and rec.user == "alice"
    # RFC 1929 section 2: status 1 and the server closes
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    c.sendall(b"\x05\x01\x02")
    assert recv_exact(c, 2) == b"\x05\x02"
    c.sendall(b"\x01\x05alice\x05wrong")
    assert recv_exact(c, 2) == b"\x01\x01"
    assert c.recv(1) == b""


def test_a_failing_password_backend_refuses_instead_of_crashing(socks, echo):
    async def broken(user: str, password: str, ip: str) -> bool:
        raise ConnectionError("directory server down")

    s = socks(verify=broken)
    with pytest.raises(PermissionError):
        open_session(s.port, CONNECT, "127.0.0.1", echo.port, auth=("alice", "pw"))
    assert "directory server down" in s.wait_records(1)[-1].note
    s2 = socks(users={"alice": "pw"})
    assert request_reply(s2.port, CONNECT, "127.0.0.1", echo.port, auth=("alice", "pw")) == 0


def test_client_without_an_acceptable_method_gets_ff_and_is_closed(socks):
    s = socks(users={"alice": "pw"})
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    c.sendall(b"\x05\x01\x00")  # offers only "no authentication": not enough here
    assert recv_exact(c, 2) == b"\x05\xff"
    assert c.recv(1) == b""
    r = curl_via("--socks5", s.port, "http://127.0.0.1:9/")  # curl without credentials offers 0 only
    assert r.returncode != 0


def test_not_socks5_is_closed_without_a_reply(socks):
    s = socks()
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    c.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")  # a SOCKS4 request
    assert c.recv(10) == b""
    assert "protocol-error" in s.wait_records(1)[-1].note


# -- CONNECT with python-socks, IPv6 ------------------------------------------------------------

def test_python_socks_client_sync_and_async(socks, echo):
    import asyncio

    from python_socks.async_.asyncio import Proxy as AsyncProxy
    from python_socks.sync import Proxy

    s = socks(users={"bob": "pw"})
    proxy = Proxy.from_url(f"socks5://bob:pw@127.0.0.1:{s.port}", rdns=True)
    sock = proxy.connect("localhost", echo.port, timeout=10)
    sock.sendall(b"ping")
    assert recv_exact(sock, 4) == b"ping"
    sock.close()

    async def via_async() -> bytes:
        p = AsyncProxy.from_url(f"socks5://bob:pw@127.0.0.1:{s.port}", rdns=False)
        sk = await p.connect("127.0.0.1", echo.port, timeout=10)
        reader, writer = await asyncio.open_connection(sock=sk)
        writer.write(b"async ping")
        data = await reader.readexactly(10)
        writer.close()
        return data

    assert asyncio.run(via_async()) == b"async ping"
    recs = s.wait_records(2)
    assert [r.target for r in recs] == [f"localhost:{echo.port}", f"127.0.0.1:{echo.port}"]


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_target_address_and_ipv6_listener(socks):
    e6 = TcpEcho("::1")
    try:
        s = socks()
        c, rep, bhost, _ = open_session(s.port, CONNECT, "::1", e6.port)
        assert rep == 0 and bhost == "::1"  # BND.ADDR: the address used to reach the target
        c.sendall(b"over six")
        assert recv_exact(c, 8) == b"over six"
        c.close()
        s6 = socks(host="::1")
        c, rep, _, _ = open_session(s6.port, CONNECT, "::1", e6.port, server="::1")
        assert rep == 0
        c.sendall(b"v6 both")
        assert recv_exact(c, 7) == b"v6 both"
        c.close()
        from python_socks.sync import Proxy

        sock = Proxy.from_url(f"socks5://127.0.0.1:{s.port}").connect("::1", e6.port, timeout=10)
        sock.sendall(b"ps6")
        assert recv_exact(sock, 3) == b"ps6"
        sock.close()
        assert s.wait_records(2)[0].target == f"[::1]:{e6.port}"
    finally:
        e6.close()


def test_bytes_sent_before_the_reply_are_relayed(socks, echo):
    # A client may pipeline its first bytes right behind the request.
    s = socks()
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    c.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.port.to_bytes(2, "big") + b"early")
    assert recv_exact(c, 2) == b"\x05\x00"
    assert read_reply(c)[0] == 0
    assert recv_exact(c, 5) == b"early"
    c.close()


# -- refusals -----------------------------------------------------------------------------------

def test_refusal_codes_on_loopback(socks, echo):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    s = socks(allow_ports=[echo.port, dead_port], commands=["connect", "udp"],
              deny_domain=lambda h: "blocked" if h.endswith("blocked.example") else None)
    assert request_reply(s.port, CONNECT, "127.0.0.1", echo.port) == 0x00
    assert request_reply(s.port, CONNECT, "127.0.0.1", dead_port) == 0x05  # connection refused
    assert request_reply(s.port, CONNECT, "127.0.0.1", 22) == 0x02  # port not in allow_ports
    assert request_reply(s.port, CONNECT, "www.blocked.example", echo.port) == 0x02  # domain filter
    assert request_reply(s.port, BIND, "127.0.0.1", 0) == 0x07  # BIND switched off in commands
    assert request_reply(s.port, 0x09, "127.0.0.1", echo.port) == 0x07  # no such command
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    c.sendall(b"\x05\x01\x00" + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50")  # request version 4
    assert recv_exact(c, 2) == b"\x05\x00"
    assert read_reply(c)[0] == 0x01  # general failure
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    c.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x07\x00\x00")  # address type 7
    assert recv_exact(c, 2) == b"\x05\x00"
    assert read_reply(c)[0] == 0x08
    assert c.recv(1) == b""


def test_default_deny_networks_refuse_loopback_and_own_addresses(socks, echo):
    from tunnel.socks import SocksSettings
    from webproxy.config import from_dict

    defaults = SocksSettings.from_section(from_dict({}).socks, 10.0)  # the shipped defaults
    s = socks(deny_networks=defaults.deny_networks, deny_local=defaults.deny_local)
    assert request_reply(s.port, CONNECT, "127.0.0.1", echo.port) == 0x02
    assert request_reply(s.port, CONNECT, "localhost", echo.port) == 0x02  # checked after resolving
    assert request_reply(s.port, CONNECT, "0.0.0.0", echo.port) == 0x02  # reaches this host too
    own = [a for a in _own_addresses() if not a.startswith("127.")]
    for ip in own[:2]:
        assert request_reply(s.port, CONNECT, ip, echo.port) == 0x02, ip
    assert all(r.reply == 0x02 for r in s.wait_records(3 + len(own[:2])))


def _own_addresses() -> list[str]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def test_client_outside_allowed_networks_is_not_allowed_by_ruleset(socks, echo):
    s = socks(allow_client=lambda ip: False, users={"alice": "pw"})
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    c.sendall(b"\x05\x02\x00\x02")
    assert recv_exact(c, 2) == b"\x05\x00"  # no password prompt for a client that may not use us
    c.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.port.to_bytes(2, "big"))
    assert read_reply(c)[0] == 0x02
    assert c.recv(1) == b""


def test_silent_client_is_dropped_after_the_handshake_timeout(socks):
    s = socks(handshake_timeout=0.5)
    c = socket.create_connection(("127.0.0.1", s.port), 5)
    start = time.monotonic()
    assert c.recv(1) == b""
    assert time.monotonic() - start < 3
    assert s.wait_records(1)[-1].note == "handshake-timeout"


def test_per_client_limit_closes_extra_connections(socks, echo):
    s = socks(max_connections_per_client=2)
    held = [open_session(s.port, CONNECT, "127.0.0.1", echo.port)[0] for _ in range(2)]
    extra = socket.create_connection(("127.0.0.1", s.port), 5)
    try:
        assert extra.recv(1) == b""
    except ConnectionResetError:
        pass
    assert s.wait_records(1)[-1].note == "refused-per-client-limit"
    for h in held:
        h.close()
    assert s.wait_idle()
    assert request_reply(s.port, CONNECT, "127.0.0.1", echo.port) == 0  # slots come back


# -- UDP ASSOCIATE --------------------------------------------------------------------------------

def test_udp_associate_relays_both_ways_and_drops_strangers_and_fragments(socks):
    udp = UdpEcho()
    s = socks()
    try:
        ctl, client, (rhost, rport) = associate(s.port)
        assert rhost == "127.0.0.1"
        client.sendto(udp_packet("127.0.0.1", udp.port, b"one"), (rhost, rport))
        host, port, data = parse_udp_packet(client.recv(65535))
        assert (host, port, data) == ("127.0.0.1", udp.port, b"echo:one")
        # The relay is the sender the target sees, not the client.
        assert udp.senders[-1][1] != client.getsockname()[1]

        # A third address (another socket on this host) uses the relay port: dropped.
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.2", 0))
        stranger.settimeout(0.5)
        stranger.sendto(udp_packet("127.0.0.1", udp.port, b"stranger"), (rhost, rport))
        # ... and a fragment from the client (FRAG != 0, RFC 1928 section 7): dropped.
        client.sendto(udp_packet("127.0.0.1", udp.port, b"frag", frag=1), (rhost, rport))
        client.sendto(udp_packet("127.0.0.1", udp.port, b"two"), (rhost, rport))
        assert parse_udp_packet(client.recv(65535))[2] == b"echo:two"
        with pytest.raises(TimeoutError):
            stranger.recv(65535)
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(65535)
        assert len(udp.senders) == 2  # "stranger" and "frag" never arrived
        stranger.close()

        ctl.close()  # the association ends with its control connection
        rec = s.wait_records(1)[-1]
        assert rec.command == "UDP" and rec.reply == 0 and rec.up == 6 and rec.down == 16
        assert "dropped=2" in rec.note
        time.sleep(0.2)
        client.sendto(udp_packet("127.0.0.1", udp.port, b"late"), (rhost, rport))
        time.sleep(0.3)
        assert len(udp.senders) == 2
        client.close()
    finally:
        udp.close()


def test_udp_replies_from_unknown_hosts_are_not_let_in(socks):
    udp = UdpEcho()
    s = socks()
    try:
        ctl, client, (rhost, rport) = associate(s.port)
        client.sendto(udp_packet("127.0.0.1", udp.port, b"hi"), (rhost, rport))
        client.recv(65535)
        relay_out = udp.senders[-1]  # the relay's outside port, as the target sees it
        intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        intruder.sendto(b"let me in", ("127.0.0.1", relay_out[1]))
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(65535)
        intruder.close()
        ctl.close()
        client.close()
    finally:
        udp.close()


def test_udp_association_ends_after_idle_timeout(socks):
    s = socks(idle_timeout=0.5)
    ctl, rep, _, _ = open_session(s.port, UDP, "0.0.0.0", 0)
    assert rep == 0
    start = time.monotonic()
    assert ctl.recv(1) == b""
    assert time.monotonic() - start < 4
    assert s.wait_records(1)[-1].note.startswith("idle-timeout")


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_udp_to_an_ipv6_target_and_by_name(socks):
    udp6 = UdpEcho("::1")
    udp4 = UdpEcho()
    s = socks()
    try:
        ctl, client, (rhost, rport) = associate(s.port)
        client.sendto(udp_packet("::1", udp6.port, b"six"), (rhost, rport))
        assert parse_udp_packet(client.recv(65535)) == ("::1", udp6.port, b"echo:six")
        client.sendto(b"\x00\x00\x00\x03\x09localhost" + udp4.port.to_bytes(2, "big") + b"named", (rhost, rport))
        assert parse_udp_packet(client.recv(65535)) == ("127.0.0.1", udp4.port, b"echo:named")
        ctl.close()
        client.close()
    finally:
        udp6.close()
        udp4.close()


# -- BIND -----------------------------------------------------------------------------------------

def test_bind_accepts_one_connection_from_the_named_host_and_relays(socks):
    s = socks()
    ctl, rep, host, port = open_session(s.port, BIND, "127.0.0.1", 0)
    assert rep == 0 and host == "127.0.0.1" and port
    # The application server (here: this test) connects to the announced address.
    app = socket.create_connection((host, port), 5)
    rep2, peer_host, peer_port = read_reply(ctl)
    assert rep2 == 0 and (peer_host, peer_port) == app.getsockname()
    app.sendall(b"data from the server")
    assert recv_exact(ctl, 20) == b"data from the server"
    ctl.sendall(b"and back")
    assert recv_exact(app, 8) == b"and back"
    app.close()
    ctl.close()
    rec = s.wait_records(1)[-1]
    assert rec.command == "BIND" and rec.reply == 0 and rec.up == 8 and rec.down == 20


def test_bind_ignores_connections_from_other_hosts(socks):
    s = socks()
    ctl, rep, host, port = open_session(s.port, BIND, "127.0.0.2", 0)
    assert rep == 0
    wrong = socket.create_connection((host, port), 5)  # from 127.0.0.1, not the named 127.0.0.2
    assert wrong.recv(1) == b""
    right = socket.socket()
    right.bind(("127.0.0.2", 0))
    right.connect((host, port))
    rep2, peer_host, _ = read_reply(ctl)
    assert rep2 == 0 and peer_host == "127.0.0.2"
    right.close()
    ctl.close()


def test_bind_times_out_with_ttl_expired(socks):
    s = socks(idle_timeout=0.5)
    ctl, rep, _, _ = open_session(s.port, BIND, "127.0.0.1", 0)
    assert rep == 0
    assert read_reply(ctl)[0] == 0x06
    ctl.close()


# -- robustness -----------------------------------------------------------------------------------

def test_garbage_and_truncated_negotiations_leave_no_session_behind(socks, echo):
    s = socks(handshake_timeout=1.0)
    junk = [b"", b"\x05", b"\x05\x01", b"\x05\xff" + b"\x00" * 255, b"\x05\x01\x00\x05\x01\x00\x03\xff",
            os.urandom(300), b"GET / HTTP/1.1\r\n\r\n"]
    for data in junk:
        c = socket.create_connection(("127.0.0.1", s.port), 5)
        c.sendall(data)
        c.close()
    s.wait_records(len(junk), timeout=5)
    assert request_reply(s.port, CONNECT, "127.0.0.1", echo.port) == 0
    assert s.wait_idle()
