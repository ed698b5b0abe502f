"""SOCKS test support: a real SOCKS5 server (tunnel.socks) in its own thread and event loop, TCP
and UDP echo servers, and a raw SOCKS5 client written from RFC 1928 (independent of the server's
own encoder) for the replies curl and python-socks cannot show."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from tunnel.socks import SessionRecord, SocksServer, SocksSettings


class SocksThread:
    """tunnel.socks.SocksServer on 127.0.0.1 (or `host`), free port, in a background loop.
    `users` turns on RFC 1929 with a verifier that accepts exactly those user/password pairs."""

    def __init__(self, host: str = "127.0.0.1", users: dict[str, str] | None = None,
                 verify: Callable[[str, str, str], Any] | None = None,
                 allow_client: Callable[[str], bool] = lambda ip: True,
                 deny_domain: Callable[[str], str | None] = lambda host: None, **settings: Any) -> None:
        settings.setdefault("deny_networks", [])
        settings.setdefault("deny_local", False)
        self.settings = SocksSettings(listen=[(host, 0)], **settings)
        self.records: list[SessionRecord] = []
        self.users = users
        self.verify = verify  # an async verify(user, password, client ip) used as given (overrides `users`)
        self.allow_client, self.deny_domain = allow_client, deny_domain
        try:  # the loop production runs on
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.server: SocksServer | None = None
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> SocksThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        verify = self.verify
        if self.users is not None and verify is None:
            users = self.users

            async def verify(user: str, password: str, ip: str) -> bool:
                return users.get(user) == password

        self.server = SocksServer(self.settings, allow_client=self.allow_client, deny_domain=self.deny_domain,
                                  verify=verify, log=self.records.append)
        self.server.start()
        self.port = self.server.addresses[0][1]

    def wait_records(self, n: int, timeout: float = 5.0) -> list[SessionRecord]:
        """The session records once at least `n` sessions have ended (bounded wait)."""
        import time

        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.records)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once no session is open (the server has seen every client go)."""
        import time

        deadline = time.monotonic() + timeout
        while self.server is not None and self.server.counts.total and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.server is not None and self.server.counts.total == 0 and not self.server.counts.per_client

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class TcpEcho:
    """Echoes every byte back until the client half-closes, on `host` (IPv6 too)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.peers: list[Any] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


class UdpEcho:
    """Answers each datagram with b"echo:" + its bytes, to the sender; remembers the senders."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.senders: list[Any] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            self.senders.append(addr)
            self.sock.sendto(b"echo:" + data, addr)

    def close(self) -> None:
        self.sock.close()


# -- a raw client, byte by byte from RFC 1928 ---------------------------------------------------

def addr_bytes(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return b"\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", port)
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed + struct.pack("!H", port)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


def read_reply(sock: socket.socket) -> tuple[int, str, int]:
    """VER REP RSV ATYP BND.ADDR BND.PORT -> (rep, host, port)."""
    head = recv_exact(sock, 4)
    assert head[0] == 5 and head[2] == 0, head
    atyp = head[3]
    if atyp == 1:
        host = str(ipaddress.IPv4Address(recv_exact(sock, 4)))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(recv_exact(sock, 16)))
    else:
        host = recv_exact(sock, recv_exact(sock, 1)[0]).decode()
    port = struct.unpack("!H", recv_exact(sock, 2))[0]
    return head[1], host, port


def open_session(port: int, cmd: int, host: str, dport: int, *, server: str = "127.0.0.1",
                 auth: tuple[str, str] | None = None, timeout: float = 10) -> tuple[socket.socket, int, str, int]:
    """Connect, negotiate (no auth, or RFC 1929), send one request; -> (socket, rep, bnd host, bnd port)."""
    s = socket.create_connection((server, port), timeout)
    s.settimeout(timeout)
    s.sendall(b"\x05\x01" + (b"\x02" if auth else b"\x00"))
    method = recv_exact(s, 2)
    assert method == (b"\x05\x02" if auth else b"\x05\x00"), method
    if auth:
        u, p = auth[0].encode(), auth[1].encode()
        s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        status = recv_exact(s, 2)
        if status != b"\x01\x00":
            raise PermissionError(f"RFC 1929 status {status!r}")
    s.sendall(b"\x05" + bytes([cmd, 0]) + addr_bytes(host, dport))
    rep, bhost, bport = read_reply(s)
    return s, rep, bhost, bport


def request_reply(port: int, cmd: int, host: str, dport: int, **kw: Any) -> int:
    """The reply code to one request (the session is closed afterwards)."""
    s, rep, _, _ = open_session(port, cmd, host, dport, **kw)
    s.close()
    return rep


def associate(port: int, timeout: float = 5) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """UDP ASSOCIATE from 127.0.0.1 -> (control connection, the client's UDP socket, relay address)."""
    ctl, rep, rhost, rport = open_session(port, 3, "0.0.0.0", 0)
    assert rep == 0 and rport, rep
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(timeout)
    return ctl, client, (rhost, rport)


def udp_packet(host: str, port: int, data: bytes, frag: int = 0) -> bytes:
    return b"\x00\x00" + bytes([frag]) + addr_bytes(host, port) + data


def parse_udp_packet(data: bytes) -> tuple[str, int, bytes]:
    assert data[:3] == b"\x00\x00\x00", data[:3]
    if data[3] == 1:
        return str(ipaddress.IPv4Address(data[4:8])), struct.unpack("!H", data[8:10])[0], data[10:]
    if data[3] == 4:
        return str(ipaddress.IPv6Address(data[4:20])), struct.unpack("!H", data[20:22])[0], data[22:]
    raise AssertionError(f"address type {data[3]}")
