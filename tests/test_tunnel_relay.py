"""The relay, upstream connect and the HTTP sniff, on real loopback sockets.

Layout of every relay test: client_peer <-> [client  relay  upstream] <-> upstream_peer, where the
bracketed sockets are handed to tunnel.relay.relay() and the peers play the two ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest

from tests.support import unanswered_port
from tunnel.connect import (
    DialDNSError,
    DialRefused,
    DialTimeout,
    open_upstream,
)
from tunnel.forwarder import ForwarderSettings, admit, reload_plan, upstream_order
from tunnel.relay import ENGINES, HAVE_SPLICE, relay, reset_side
from tunnel.transparent import is_own_listener, looks_like_http, read_as_http

WAIT = 20.0  # generous ceiling so a broken relay fails instead of hanging; never a speed check


@pytest.fixture(params=[e for e in ENGINES if e != "splice" or HAVE_SPLICE])
def engine(request):
    return request.param


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request):
    """Every async test runs on both loops: the proxy uses uvloop when it is installed."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
def listener():
    ls = socket.create_server(("127.0.0.1", 0))
    yield ls
    ls.close()


def connected_pair(ls: socket.socket) -> tuple[socket.socket, socket.socket]:
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    for x in (c, s):
        x.setblocking(False)
    return c, s


@pytest.fixture
def bridge(listener):
    """(client_peer, client, upstream, upstream_peer); peers closed at the end."""
    client_peer, client = connected_pair(listener)
    upstream, upstream_peer = connected_pair(listener)
    yield client_peer, client, upstream, upstream_peer
    for s in (client_peer, upstream_peer, client, upstream):
        s.close()


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


async def test_relay_is_byte_exact_both_ways_with_large_random_payload(bridge, engine):
    client_peer, client, upstream, upstream_peer = bridge
    loop = asyncio.get_running_loop()
    up_data, down_data = os.urandom(6 << 20), os.urandom(5 << 20)
    task = asyncio.ensure_future(relay(client, upstream, engine=engine))

    async def send(sock, data):
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)

    _, _, got_up, got_down, result = await asyncio.wait_for(asyncio.gather(
        send(client_peer, up_data), send(upstream_peer, down_data),
        recv_all(upstream_peer), recv_all(client_peer), task), WAIT)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up_data).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down_data).digest()
    assert (result.client_to_upstream, result.upstream_to_client) == (len(up_data), len(down_data))
    assert result.ended == "closed"
    assert client.fileno() == -1 and upstream.fileno() == -1


async def test_half_close_client_still_receives_full_reply(bridge, engine):
    client_peer, client, upstream, upstream_peer = bridge
    loop = asyncio.get_running_loop()
    request = b"question " * 1000
    reply = os.urandom(3 << 20)
    task = asyncio.ensure_future(relay(client, upstream, engine=engine))

    async def server():
        got = await recv_all(upstream_peer)  # ends only because the client's FIN was passed on
        await loop.sock_sendall(upstream_peer, reply)
        upstream_peer.close()
        return got

    async def client_side():
        await loop.sock_sendall(client_peer, request)
        client_peer.shutdown(socket.SHUT_WR)
        return await recv_all(client_peer)

    got_req, got_reply, result = await asyncio.wait_for(asyncio.gather(server(), client_side(), task), WAIT)
    assert got_req == request
    assert got_reply == reply
    assert result.ended == "closed"


async def test_client_initial_bytes_go_upstream_first(bridge, engine):
    client_peer, client, upstream, upstream_peer = bridge
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(relay(client, upstream, client_initial=b"PIPELINED:", engine=engine))
    await loop.sock_sendall(client_peer, b"rest")
    client_peer.shutdown(socket.SHUT_WR)
    got = await asyncio.wait_for(recv_all(upstream_peer), WAIT)
    upstream_peer.shutdown(socket.SHUT_WR)
    result = await asyncio.wait_for(task, WAIT)
    assert got == b"PIPELINED:rest"
    assert result.client_to_upstream == len(got)


async def test_idle_timeout_closes_both_sides(bridge, engine):
    client_peer, client, upstream, upstream_peer = bridge
    result = await asyncio.wait_for(relay(client, upstream, idle_timeout=0.2, engine=engine), WAIT)
    assert result.ended == "idle-timeout"
    assert client.fileno() == -1 and upstream.fileno() == -1
    # Both peers observe the close as EOF.
    assert await asyncio.wait_for(recv_all(client_peer), WAIT) == b""
    assert await asyncio.wait_for(recv_all(upstream_peer), WAIT) == b""


async def test_upstream_reset_ends_relay_and_closes_client(bridge, engine):
    client_peer, client, upstream, upstream_peer = bridge
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(relay(client, upstream, engine=engine))
    await loop.sock_sendall(upstream_peer, b"partial")
    upstream_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    upstream_peer.close()  # RST
    result = await asyncio.wait_for(task, WAIT)
    assert result.ended.startswith("upstream-error")
    assert client.fileno() == -1 and upstream.fileno() == -1
    got = bytearray()
    try:
        got += await asyncio.wait_for(recv_all(client_peer), WAIT)
    except ConnectionResetError:
        pass
    assert bytes(got) in (b"", b"partial")


async def test_slow_reader_does_not_make_the_relay_buffer(listener, engine):
    """A client that stops reading stalls the upstream sender after a bounded number of bytes:
    kernel socket buffers plus one relay buffer, not the 64 MiB the upstream wants to send."""
    loop = asyncio.get_running_loop()
    small = 32 * 1024
    # Small, fixed kernel buffers make the bound tight enough to show the relay holds back.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small)
    client_peer, client = connected_pair(listener)
    upstream, upstream_peer = connected_pair(listener)
    socks = (client_peer, client, upstream, upstream_peer)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, small)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small)
    kernel = sum(s.getsockopt(socket.SOL_SOCKET, o) for s in socks for o in (socket.SO_SNDBUF, socket.SO_RCVBUF))
    relay_buffer = 64 * 1024
    payload = os.urandom(64 << 20)
    sent = [0]

    async def sender():
        view = memoryview(payload)
        while sent[0] < len(payload):
            try:
                sent[0] += upstream_peer.send(view[sent[0]:sent[0] + (1 << 16)])
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_writer(upstream_peer.fileno(), fut.set_result, None)
                try:
                    await fut
                finally:
                    loop.remove_writer(upstream_peer.fileno())
        upstream_peer.shutdown(socket.SHUT_WR)

    task = asyncio.ensure_future(relay(client, upstream, buffer_size=relay_buffer, engine=engine))
    send_task = asyncio.ensure_future(sender())
    try:
        # Wait until the sender makes no progress for a while (the client never reads).
        last, still = -1, 0
        while still < 5 and not send_task.done():
            await asyncio.sleep(0.1)
            still = still + 1 if sent[0] == last else 0
            last = sent[0]
        stalled_at = sent[0]
        assert not send_task.done(), "upstream sent everything although nobody read it"
        assert stalled_at <= kernel + 2 * relay_buffer + (1 << 20), (stalled_at, kernel)
        # Reading again resumes the flow and every byte arrives intact.
        got = await asyncio.wait_for(recv_all(client_peer), WAIT)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        upstream_peer.shutdown(socket.SHUT_WR)
        client_peer.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(task, WAIT)
        assert result.upstream_to_client == len(payload)
    finally:
        send_task.cancel()
        task.cancel()
        for s in socks:
            s.close()


async def test_cancelled_relay_closes_both_sockets(bridge, engine):
    client_peer, client, upstream, upstream_peer = bridge
    task = asyncio.ensure_future(relay(client, upstream, engine=engine))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.fileno() == -1 and upstream.fileno() == -1
    assert await asyncio.wait_for(recv_all(client_peer), WAIT) == b""


# -- open_upstream ------------------------------------------------------------------------------

async def test_open_upstream_connects_and_returns_nonblocking_socket(listener):
    sock = await open_upstream("127.0.0.1", listener.getsockname()[1], timeout=5)
    try:
        assert sock.getpeername() == listener.getsockname()
        assert sock.getblocking() is False
    finally:
        sock.close()


async def test_open_upstream_refused_is_distinguished():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(DialRefused) as e:
        await open_upstream("127.0.0.1", port, timeout=5)
    assert e.value.kind == "refused"
    assert f"127.0.0.1:{port}" in str(e.value)


async def test_open_upstream_timeout_is_distinguished():
    with unanswered_port() as port:
        with pytest.raises(DialTimeout) as e:
            await open_upstream("127.0.0.1", port, timeout=0.3)
        assert e.value.kind == "timeout"


async def test_open_upstream_dns_failure_from_given_resolver_is_distinguished():
    async def resolve(host, port):
        raise OSError(f"{host}: no such name")

    with pytest.raises(DialDNSError) as e:
        await open_upstream("nowhere.test", 443, timeout=5, resolve=resolve)
    assert e.value.kind == "dns"
    assert "nowhere.test" in str(e.value)


async def test_open_upstream_uses_given_resolver_answer(listener):
    async def resolve(host, port):
        return [{"host": "127.0.0.1", "port": port}]

    sock = await open_upstream("origin.test", listener.getsockname()[1], timeout=5, resolve=resolve)
    sock.close()


# -- pure decisions -----------------------------------------------------------------------------

@pytest.mark.parametrize("data,expected", [
    (b"GET / HTTP/1.1\r\n", True),
    (b"POST http://a.test/x?y=1 HTTP/1.0\r\nHost: a\r\n", True),
    (b"GET /index.html HTTP/1.", True),  # method and target start: HTTP, however the head goes on
    (b"GET /?q=" + b"a" * 5000, True),  # a head longer than sniff_bytes
    (b"\r\nGET / HTTP/1.1\r\n", True),  # a leading blank line (RFC 9112 2.2)
    (b"OPTIONS * HTTP/1.1\r\n", True),
    (b"CONNECT a.test:443 HTTP/1.1\r\n", True),
    (b"GET http:/", None),
    (b"GE", None),
    (b"GET ", None),
    (b"\r\n", None),
    (b"", None),
    (b"\x16\x03\x01\x02\x00", False),  # TLS ClientHello
    (b"SSH-2.0-OpenSSH_9.2\r\n", False),
    (b"EHLO mail.test\r\n", False),
    (b"PRI * HTTP/2.0\r\n", False),
    (b"get / HTTP/1.1\r\n", False),
    (b"GET  / HTTP/1.1\r\n", False),
])
def test_http_sniff_decides_http_from_method_and_target_start(data, expected):
    assert looks_like_http(data) is expected


@pytest.mark.parametrize("data,expected", [
    (b"", False),  # a client that sends nothing (server speaks first): relayed raw
    (b"G", True),  # a slow request line: HTTP, never raw
    (b"\r\n\r\n", True),
    (b"\x16\x03", False),
])
def test_sniff_verdict_relays_raw_only_silence_or_non_http(data, expected):
    assert read_as_http(data) is expected


def test_own_listener_wildcard_matches_local_addresses_only():
    own = [("0.0.0.0", 3128), ("192.0.2.10", 8080)]
    assert is_own_listener(("127.0.0.1", 3128), own)
    assert is_own_listener(("::ffff:127.0.0.1", 3128), own)
    assert is_own_listener(("192.0.2.10", 8080), own)
    assert not is_own_listener(("127.0.0.1", 3129), own)
    assert not is_own_listener(("198.51.100.7", 3128), own)  # not an address of this machine


def test_least_connections_prefers_idle_upstream_and_fails_over_to_the_rest():
    assert upstream_order(3, [0, 0, 0], 1, "round-robin") == [1, 2, 0]
    assert upstream_order(3, [2, 0, 1], 0, "least-connections") == [1, 2, 0]
    assert upstream_order(2, [1, 1], 1, "least-connections") == [1, 0]


def test_admit_checks_network_then_limits():
    import ipaddress
    s = ForwarderSettings(listen=("127.0.0.1", 0), upstreams=[("127.0.0.1", 1)], max_connections=2,
                          max_connections_per_client=1)
    lo = ipaddress.ip_address("127.0.0.1")
    assert admit(ipaddress.ip_address("10.1.2.3"), s.allow_clients, 0, 0, s) == "denied"
    assert admit(lo, s.allow_clients, 2, 0, s) == "refused-full"
    assert admit(lo, s.allow_clients, 1, 1, s) == "refused-per-client-limit"
    assert admit(lo, s.allow_clients, 1, 0, s) is None


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_socket_detached_from_transport_relays_pipelined_bytes(loop_kind):
    """As the CONNECT handler does it: a Protocol reads a head plus pipelined bytes, then hands the
    socket (dup'ed from its transport) and those bytes to relay()."""
    from tunnel.relay import detach_socket

    async def main():
        loop = asyncio.get_running_loop()
        origin = socket.create_server(("127.0.0.1", 0))
        origin.setblocking(False)
        results = []

        class Front(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport, self.buf = transport, b""

            def data_received(self, data):
                self.buf += data
                if b"\n" in self.buf:
                    head, _, rest = self.buf.partition(b"\n")
                    sock = detach_socket(self.transport)

                    async def go():
                        up = await open_upstream("127.0.0.1", origin.getsockname()[1], timeout=5)
                        await loop.sock_sendall(sock, b"OK " + head + b"\n")
                        results.append(await relay(sock, up, client_initial=rest))
                    asyncio.ensure_future(go())

        server = await loop.create_server(Front, "127.0.0.1", 0)
        try:
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, server.sockets[0].getsockname())
            await loop.sock_sendall(client, b"CONNECT x\npipelined-")
            conn, _ = await loop.sock_accept(origin)
            await loop.sock_sendall(client, b"more")
            client.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(recv_all(conn), WAIT) == b"pipelined-more"
            await loop.sock_sendall(conn, b"reply")
            conn.close()
            assert await asyncio.wait_for(recv_all(client), WAIT) == b"OK CONNECT x\nreply"
            client.close()
        finally:
            server.close()
            origin.close()
        async def finished():
            while not results:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(finished(), WAIT)
        assert results[0].ended == "closed"

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            r.run(main())
    else:
        with asyncio.Runner() as r:
            r.run(main())


@pytest.mark.parametrize("ended,side", [
    ("upstream-error: ECONNRESET", "client"),
    ("client-error: EPIPE", "upstream"),
    ("closed", None),
    ("idle-timeout", None),
    ("half-close-timeout", None),
])
def test_a_failure_on_one_side_is_passed_on_as_a_reset_to_the_other(ended, side):
    assert reset_side(ended) == side


def test_forwarder_reload_applies_live_settings_and_names_the_rest():
    old = ForwarderSettings(listen=("127.0.0.1", 1), upstreams=[("127.0.0.1", 2)])
    new = ForwarderSettings(listen=("127.0.0.1", 1), upstreams=[("127.0.0.1", 3)], max_connections=5,
                            idle_timeout=7.0)
    live, restart = reload_plan(old, new)
    assert live == {"max_connections": 5, "idle_timeout": 7.0} and restart == ["upstreams"]
