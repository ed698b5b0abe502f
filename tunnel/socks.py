"""The SOCKS5 listener (RFC 1928, RFC 1929): negotiate, check, then CONNECT ends in tunnel.relay,
UDP ASSOCIATE in a datagram relay, BIND in tunnel.relay with the one connection it accepted.

Who may do what is decided by callables the caller passes in (this package knows sockets, not the
proxy's config): `allow_client(ip)`, `deny_domain(host)`, and the `[socks]` settings; an optional
`verify(user, password, client_ip)` makes username/password (RFC 1929) the only accepted method. Every
session ends in exactly one `SessionRecord` handed to `log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tunnel import socksproto as sp
from tunnel.connect import DialError, Resolver, open_upstream, resolve_host
from tunnel.listeners import ClientCounts, ListenerSet, limit_refusal
from tunnel.netaddr import is_local_address, norm_ip
from tunnel.origdst import transparent_listener
from tunnel.relay import RelayResult, relay

logger = logging.getLogger("tunnel")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Verifier = Callable[[str, str, str], Awaitable[bool]]  # (user, password, client ip)
_RECV = 4096
_UDP_MAX = 65535
_UDP_PEERS_MAX = 1024  # remote endpoints remembered per association (replies are accepted from these)
_UDP_PENDING_MAX = 64  # name resolutions in flight per association; datagrams beyond are dropped
COMMANDS = {"connect": sp.CONNECT, "bind": sp.BIND, "udp": sp.UDP_ASSOCIATE}


@dataclass
class SocksSettings:
    listen: list[tuple[str, int]] = field(default_factory=list)
    commands: list[str] = field(default_factory=lambda: list(COMMANDS))
    allow_ports: list[int] = field(default_factory=list)  # empty: every port
    deny_networks: list[Network] = field(default_factory=list)
    deny_local: bool = True  # refuse every address of this machine (what bind() accepts)
    max_connections: int = 1024  # 0 = unlimited
    max_connections_per_client: int = 256  # 0 = unlimited
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0  # 0 = none
    connect_timeout: float = 10.0
    reuse_port: bool = False  # several worker processes share the listen addresses

    @classmethod
    def from_section(cls, section: dict[str, Any], connect_timeout: float, workers: int = 1) -> SocksSettings:
        """Build from the checked `[socks]` section (webproxy.config): the word "local" in
        deny_networks stands for this machine's own addresses."""
        known = cls.__dataclass_fields__
        kw = {k: v for k, v in section.items() if k in known}
        nets = section.get("deny_networks", [])
        kw["deny_networks"] = [n for n in nets if n != "local"]
        kw["deny_local"] = "local" in nets
        return cls(**kw, connect_timeout=connect_timeout, reuse_port=workers > 1)


@dataclass
class SessionRecord:
    """What one SOCKS session did, for its access-log line. `reply` is the RFC 1928 reply code
    sent (None: the session ended before a request, or was turned away at accept: see `note`)."""

    start: float
    client: str
    command: str = "-"  # CONNECT, BIND, UDP
    target: str = "-"
    user: str = "-"
    reply: int | None = None
    peer: str = "-"  # the upstream address actually used
    up: int = 0  # bytes client -> target
    down: int = 0  # bytes target -> client
    note: str = ""  # why it ended, for the error log ("idle-timeout", "full", "auth-failed"...)


# -- decisions ----------------------------------------------------------------------------------

def destination_refusal(dst: sp.Address, s: SocksSettings,
                        deny_domain: Callable[[str], str | None]) -> str | None:
    """Why a request naming `dst` is refused before anything is resolved, or None."""
    if s.allow_ports and dst.port not in s.allow_ports:
        return f"port {dst.port} is not in socks.allow_ports"
    return deny_domain(dst.host)


@lru_cache(maxsize=4096)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(norm_ip(ip))
    except ValueError:
        return None


def address_refusal(ip: str, s: SocksSettings) -> str | None:
    """Why a resolved address may not be reached (socks.deny_networks), or None."""
    addr = _address(ip)
    if addr is None:
        return f"{ip} is not an IP address"
    for net in s.deny_networks:
        if addr.version == net.version and addr in net:
            return f"{addr} is in socks.deny_networks ({net})"
    if s.deny_local and (addr.is_unspecified or is_local_address(str(addr))):
        return f"{addr} is an address of the proxy host (socks.deny_networks has \"local\")"
    return None


def _is_zero(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# -- I/O ----------------------------------------------------------------------------------------

class _Closed(Exception):
    """The client went away during negotiation."""


class _Conn:
    """The control connection: buffered reads for the negotiation, writes, close."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop, self.sock = loop, sock
        self.buf = b""

    async def read(self, parse: Callable[[bytes], Any]) -> Any:
        while True:
            parsed = parse(self.buf)
            if parsed is not None:
                *value, used = parsed
                self.buf = self.buf[used:]
                return value[0] if len(value) == 1 else tuple(value)
            if len(self.buf) > 1024:
                raise sp.SocksError("negotiation message too long", None)
            try:
                # The bytes are often there already (a greeting right behind the connect): take
                # them without a trip through the loop.
                data = self.sock.recv(_RECV)
            except BlockingIOError:
                try:
                    data = await self.loop.sock_recv(self.sock, _RECV)
                except OSError:
                    raise _Closed() from None
            except OSError:
                raise _Closed() from None
            if not data:
                raise _Closed()
            self.buf += data

    async def send(self, data: bytes) -> None:
        try:
            # Replies are a few bytes and the socket buffer is empty: a plain send() takes them,
            # at a tenth of the cost of an awaited sock_sendall.
            sent = self.sock.send(data)
            if sent < len(data):
                await self.loop.sock_sendall(self.sock, data[sent:])
        except BlockingIOError:
            await self.send_rest(data)
        except OSError:
            raise _Closed() from None

    async def send_rest(self, data: bytes) -> None:
        try:
            await self.loop.sock_sendall(self.sock, data)
        except OSError:
            raise _Closed() from None

    async def wait_closed(self) -> None:
        """Return when the client closes the control connection (anything it sends is ignored)."""
        while True:
            try:
                if not await self.loop.sock_recv(self.sock, _RECV):
                    return
            except OSError:
                return


class SocksServer:
    def __init__(self, settings: SocksSettings, *, allow_client: Callable[[str], bool],
                 deny_domain: Callable[[str], str | None] = lambda host: None,
                 verify: Verifier | None = None, needs_password: Callable[[str], bool] = lambda ip: True,
                 resolve: Resolver | None = None,
                 log: Callable[[SessionRecord], None] | None = None, engine: str | None = None) -> None:
        self.s = settings
        self.allow_client = allow_client
        self.deny_domain = deny_domain
        # The [auth] backend's verify(user, password, client ip). None offers "no authentication"
        # only; a verifier makes RFC 1929 username/password the only method, except for clients
        # `needs_password` exempts (auth.exempt_clients), who are offered "no authentication".
        self.verify = verify
        self.needs_password = needs_password
        self.resolve = resolve
        self.log = log or (lambda rec: logger.info("%s", rec))
        self.engine = engine
        self.listeners = ListenerSet(self._on_accept)
        self.counts = ClientCounts()

    def start(self) -> None:
        """Bind every listen address; raises OSError (the `listen` attribute names the address)."""
        self.listeners.listen(self.s.listen, reuse_port=self.s.reuse_port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.listeners.addresses

    async def close(self) -> None:
        await self.listeners.close()

    def _on_accept(self, sock: socket.socket, addr: Any) -> None:
        ip = norm_ip(addr[0])
        why = limit_refusal(self.counts.total, self.counts.of(ip), self.s.max_connections,
                            self.s.max_connections_per_client)
        if why is not None:
            sock.close()
            self.log(SessionRecord(time.time(), ip, note=why))
            return
        self.counts.take(ip)
        try:  # replies and relayed bytes go out at once (no Nagle wait on the client's delayed ACK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.listeners.spawn(self._session(sock, ip))

    # ---- one session --------------------------------------------------------------------------
    async def _session(self, sock: socket.socket, ip: str) -> None:
        loop = asyncio.get_running_loop()
        rec = SessionRecord(time.time(), ip)
        conn = _Conn(loop, sock)
        try:
            try:
                async with asyncio.timeout(self.s.handshake_timeout or None):
                    req = await self._negotiate(conn, rec)
            except TimeoutError:
                rec.note = "handshake-timeout"
                return
            if req is None:
                return
            await self._serve(conn, req, rec)
        except sp.SocksError as e:
            rec.note = f"protocol-error ({e})"
            if e.reply is not None and rec.reply is None:
                rec.reply = e.reply
                with contextlib.suppress(_Closed):
                    await conn.send(sp.encode_reply(e.reply))
        except _Closed:
            rec.note = rec.note or "client-closed"
        except asyncio.CancelledError:
            rec.note = "cancelled"
        except Exception as e:  # e.g. EMFILE: drop this client, keep serving the others
            rec.note = f"error ({e!r})"
            if rec.reply is None:
                rec.reply = sp.GENERAL_FAILURE
                with contextlib.suppress(Exception):
                    await conn.send(sp.encode_reply(sp.GENERAL_FAILURE))
        finally:
            sock.close()  # relay() may have closed it already; a second close is a no-op
            self.counts.release(ip)
            self.log(rec)

    async def _negotiate(self, conn: _Conn, rec: SessionRecord) -> sp.Request | None:
        """Method selection (RFC 1928 section 3), RFC 1929 sub-negotiation, then the request."""
        offered = await conn.read(sp.parse_greeting)
        allowed = self.allow_client(rec.client)
        # A client outside the allowed networks is not invited to try passwords: it gets "no
        # authentication" and then "not allowed by ruleset" to whatever it asks.
        method = sp.choose_method(offered, self.verify is not None and allowed and self.needs_password(rec.client))
        await conn.send(sp.method_reply(method))
        if method == sp.NO_ACCEPTABLE:
            rec.note = "no-acceptable-method"
            return None
        if method == sp.USERPASS:
            assert self.verify is not None
            user, password = await conn.read(sp.parse_userpass)
            rec.user = user
            try:
                ok = await self.verify(user, password, rec.client)
            except Exception as e:  # a backend that fails (LDAP down...) refuses, in RFC 1929 terms
                rec.note = f"auth-error ({e!r})"
                ok = False
            # RFC 1929 section 2: on failure the server MUST close the connection.
            await conn.send(sp.USERPASS_OK if ok else sp.USERPASS_FAILED)
            if not ok:
                rec.note = rec.note or "auth-failed"
                rec.reply = sp.NOT_ALLOWED
                return None
        req = await conn.read(sp.parse_request)
        rec.command = sp.COMMAND_NAMES[req.command]
        rec.target = str(req.dst)
        if not allowed:
            return await self._refuse(conn, rec, sp.NOT_ALLOWED, "client not in access.allow_clients")
        if req.command not in [COMMANDS[c] for c in self.s.commands]:
            return await self._refuse(conn, rec, sp.COMMAND_NOT_SUPPORTED, "command off in socks.commands")
        # CONNECT names a destination; BIND the host expected to connect back (no port rule: an
        # FTP server's data connection comes from another port); UDP ASSOCIATE the client's own
        # address (each datagram's destination is checked on its way).
        why = None
        if req.command == sp.CONNECT:
            why = destination_refusal(req.dst, self.s, self.deny_domain)
        elif req.command == sp.BIND and not _is_zero(req.dst.host):
            why = self.deny_domain(req.dst.host)
        if why:
            return await self._refuse(conn, rec, sp.NOT_ALLOWED, why)
        return req

    async def _refuse(self, conn: _Conn, rec: SessionRecord, reply: int, why: str) -> None:
        rec.reply, rec.note = reply, why
        await conn.send(sp.encode_reply(reply))
        return None

    async def _serve(self, conn: _Conn, req: sp.Request, rec: SessionRecord) -> None:
        if req.command == sp.CONNECT:
            await self._connect(conn, req, rec)
        elif req.command == sp.UDP_ASSOCIATE:
            await UdpAssociation(self, conn, req, rec).run()
        else:
            await self._bind(conn, req, rec)

    def _check_address(self, ip: str) -> str | None:
        return address_refusal(ip, self.s)

    def _account(self, rec: SessionRecord, result: RelayResult) -> None:
        rec.up, rec.down = result.client_to_upstream, result.upstream_to_client
        if result.ended != "closed":
            rec.note = result.ended

    # ---- CONNECT (section 4) ------------------------------------------------------------------
    async def _connect(self, conn: _Conn, req: sp.Request, rec: SessionRecord) -> None:
        try:
            upstream = await open_upstream(req.dst.host, req.dst.port, timeout=self.s.connect_timeout,
                                           resolve=self.resolve, check=self._check_address)
        except DialError as e:
            await self._refuse(conn, rec, sp.reply_for_failure(e.kind, e.errno), str(e))
            conn.sock.close()
            return
        try:
            rec.peer = norm_ip(upstream.getpeername()[0])
            bound = upstream.getsockname()
            rec.reply = sp.SUCCEEDED
            await conn.send(sp.encode_reply(sp.SUCCEEDED, norm_ip(bound[0]), bound[1]))
        except BaseException:
            upstream.close()
            raise
        result = await relay(conn.sock, upstream, client_initial=conn.buf,
                             idle_timeout=self.s.idle_timeout or None, engine=self.engine)
        self._account(rec, result)

    # ---- BIND (section 4) ---------------------------------------------------------------------
    async def _bind(self, conn: _Conn, req: sp.Request, rec: SessionRecord) -> None:
        """Listen for one incoming connection from the host the client names (DST.ADDR, or
        anyone when it is all zeros), answer twice (listening address, then the peer), relay."""
        expected: set[str] | None = None
        if not _is_zero(req.dst.host):
            try:
                found = await resolve_host(req.dst.host, req.dst.port, timeout=self.s.connect_timeout,
                                           resolve=self.resolve)
            except DialError as e:
                await self._refuse(conn, rec, sp.reply_for_failure(e.kind), str(e))
                return
            expected = {norm_ip(a) for a in found if not self._check_address(a)}
            if not expected:
                await self._refuse(conn, rec, sp.NOT_ALLOWED, self._check_address(found[0]) or "denied")
                return
        here = _route_source(next(iter(expected)) if expected else None, conn.sock)
        lsock = transparent_listener(here, 0, tproxy=False, backlog=4)
        try:
            port = lsock.getsockname()[1]
            await conn.send(sp.encode_reply(sp.SUCCEEDED, here, port))
            accept = asyncio.ensure_future(self._accept_from(lsock, expected, rec))
            gone = asyncio.ensure_future(conn.wait_closed())
            try:
                done, _ = await asyncio.wait({accept, gone}, timeout=self.s.idle_timeout or None,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (accept, gone):
                    t.cancel()
                await asyncio.gather(accept, gone, return_exceptions=True)
            if not done:
                await self._refuse(conn, rec, sp.TTL_EXPIRED, "no incoming connection in time")
                return
            if accept not in done:
                rec.note = "client-closed"
                return
            incoming, peer = accept.result()  # an accept error (EMFILE...) is the session's error
        finally:
            lsock.close()
        try:
            rec.reply = sp.SUCCEEDED
            rec.peer = norm_ip(peer[0])
            await conn.send(sp.encode_reply(sp.SUCCEEDED, norm_ip(peer[0]), peer[1]))
        except BaseException:
            incoming.close()
            raise
        result = await relay(conn.sock, incoming, client_initial=conn.buf,
                             idle_timeout=self.s.idle_timeout or None, engine=self.engine)
        self._account(rec, result)

    async def _accept_from(self, lsock: socket.socket, expected: set[str] | None,
                           rec: SessionRecord) -> tuple[socket.socket, Any]:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(lsock)
            if expected is None or norm_ip(peer[0]) in expected:
                sock.setblocking(False)
                return sock, peer
            # Someone else found the port first: not the host the client named, so not let in.
            rec.note = f"dropped an incoming connection from {peer[0]}"
            sock.close()


def _route_source(dst: str | None, control: socket.socket) -> str:
    """The local address this host would use to reach `dst` (a connected UDP socket sends nothing),
    else the address the client reached us on."""
    local = norm_ip(control.getsockname()[0])
    if dst is None:
        return local
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((dst, 9))
            return norm_ip(s.getsockname()[0])
    except OSError:
        return local


class UdpAssociation:
    """UDP ASSOCIATE (section 7): one socket faces the client (bound where it reached us), one per
    address family faces the targets. Datagrams are taken only from the client's address (and
    port, once known), unfragmented ones only; replies only from endpoints the client has sent to.
    Ends with the control connection or after `idle_timeout` without a datagram."""

    def __init__(self, server: SocksServer, conn: _Conn, req: sp.Request, rec: SessionRecord) -> None:
        self.server, self.conn, self.req, self.rec = server, conn, req, rec
        self.loop = asyncio.get_running_loop()
        self.client_ip = rec.client
        # Section 7: DST.ADDR/DST.PORT is where the client will send from; zeros mean "not known yet".
        self.client_port = req.dst.port or None
        self.front: asyncio.DatagramTransport | None = None
        self.outs: dict[int, asyncio.DatagramTransport] = {}
        self.peers: dict[tuple[str, int], None] = {}
        self.pending = 0
        self.last = time.monotonic()
        self.dropped = 0
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        here = norm_ip(self.conn.sock.getsockname()[0])
        family = socket.AF_INET6 if ":" in here else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((here, 0))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.front, _ = await self.loop.create_datagram_endpoint(
            lambda: _Datagrams(self.from_client), sock=sock)
        try:
            port = sock.getsockname()[1]
            self.rec.reply = sp.SUCCEEDED
            await self.conn.send(sp.encode_reply(sp.SUCCEEDED, here, port))
            await self._until_done()
        finally:
            for t in list(self.tasks):
                t.cancel()
            self.front.close()
            for t in self.outs.values():
                t.close()
            self.conn.sock.close()
            if self.dropped:
                self.rec.note = (self.rec.note + " " if self.rec.note else "") + f"dropped={self.dropped}"

    async def _until_done(self) -> None:
        idle = self.server.s.idle_timeout
        gone = asyncio.ensure_future(self.conn.wait_closed())
        try:
            while True:
                wait = None if not idle else max(0.05, self.last + idle - time.monotonic())
                done, _ = await asyncio.wait({gone}, timeout=wait)
                if done:
                    return
                if idle and time.monotonic() - self.last >= idle:
                    self.rec.note = "idle-timeout"
                    return
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)

    # -- client -> targets ------------------------------------------------------------------------
    def from_client(self, data: bytes, addr: Any) -> None:
        ip, port = norm_ip(addr[0]), addr[1]
        if ip != self.client_ip or (self.client_port is not None and port != self.client_port):
            self.dropped += 1  # not the client: a third party must not use its association
            return
        self.client_port = port
        try:
            frag, dst, payload = sp.parse_udp(data)
        except sp.SocksError:
            self.dropped += 1
            return
        # Section 7: an implementation without reassembly MUST drop fragments.
        if frag != 0 or destination_refusal(dst, self.server.s, self.server.deny_domain):
            self.dropped += 1
            return
        self.last = time.monotonic()
        if self.rec.target == str(self.req.dst):
            self.rec.target = str(dst)  # the log line names the first destination
        if dst.atyp != sp.ATYP_DOMAIN:
            self._send_out(dst.host, dst.port, payload)
        elif self.pending < _UDP_PENDING_MAX:
            self.pending += 1
            task = asyncio.ensure_future(self._resolve_and_send(dst, payload))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self.dropped += 1

    async def _resolve_and_send(self, dst: sp.Address, payload: bytes) -> None:
        try:
            found = await resolve_host(dst.host, dst.port, timeout=self.server.s.connect_timeout,
                                       resolve=self.server.resolve)
        except DialError:
            self.dropped += 1
            return
        finally:
            self.pending -= 1
        self._send_out(found[0], dst.port, payload)

    def _send_out(self, ip: str, port: int, payload: bytes) -> None:
        if address_refusal(ip, self.server.s):
            self.dropped += 1
            return
        ip = norm_ip(ip)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        out = self.outs.get(family)
        if out is None:
            task = asyncio.ensure_future(self._open_out(family, ip, port, payload))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        self._remember(ip, port)
        out.sendto(payload, (ip, port))
        self.rec.up += len(payload)

    async def _open_out(self, family: int, ip: str, port: int, payload: bytes) -> None:
        if family not in self.outs:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Datagrams(self.from_target), sock=sock)
            if family in self.outs:  # another datagram opened it meanwhile
                transport.close()
            else:
                self.outs[family] = transport
        self._send_out(ip, port, payload)

    def _remember(self, ip: str, port: int) -> None:
        key = (ip, port)
        if key in self.peers:
            return
        if len(self.peers) >= _UDP_PEERS_MAX:
            self.peers.pop(next(iter(self.peers)))
        self.peers[key] = None

    # -- targets -> client ------------------------------------------------------------------------
    def from_target(self, data: bytes, addr: Any) -> None:
        ip, port = norm_ip(addr[0]), addr[1]
        if (ip, port) not in self.peers or self.client_port is None or self.front is None:
            self.dropped += 1  # nobody the client talked to: not let in (no open inbound port)
            return
        self.last = time.monotonic()
        self.front.sendto(sp.encode_udp(ip, port, data), (self.client_ip, self.client_port))
        self.rec.down += len(data)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a target and the like: UDP has no connection to fail.
        if getattr(exc, "errno", None) not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            logger.debug("socks udp: %s", exc)


async def serve_socks(settings: SocksSettings, *, started: Callable[[SocksServer], None] | None = None,
                      **kw: Any) -> None:
    """Run one SocksServer until cancelled (binding errors are raised before anything is served)."""
    server = SocksServer(settings, **kw)
    server.start()
    try:
        if started is not None:
            started(server)
        await asyncio.Event().wait()
    finally:
        await server.close()


__all__ = ["COMMANDS", "SessionRecord", "SocksServer", "SocksSettings", "Verifier", "address_refusal",
           "destination_refusal", "serve_socks"]
