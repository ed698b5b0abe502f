"""Test support for TLS interception: HTTPS origins (aiohttp with a trustme certificate), a client
that speaks CONNECT then TLS on a raw socket, and the certificate a client is shown."""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import trustme
from aiohttp import web

from tests.support import Origin


class TlsOrigin(Origin):
    """The test Origin (same routes and counters) serving HTTPS with `cert` (a trustme leaf)."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        super().__init__()
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.ctx)

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    async def _setup(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def connect_tunnel(proxy_port: int, authority: str, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """A socket through which CONNECT `authority` was answered: (socket, the proxy's answer head)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, head


def tls_through(proxy_port: int, host: str, port: int, cafile: str, timeout: float = 10,
                server_hostname: str | None = None) -> ssl.SSLSocket:
    """CONNECT host:port through the proxy, then a verifying TLS handshake (raises on failure)."""
    s, head = connect_tunnel(proxy_port, f"{host}:{port}", timeout)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx.wrap_socket(s, server_hostname=server_hostname or host)


def peer_issuer(sock: ssl.SSLSocket) -> str:
    """The organization/common name of the certificate's issuer the client was shown."""
    cert: dict[str, Any] = sock.getpeercert()  # type: ignore[assignment]
    parts = [v for rdn in cert.get("issuer", ()) for k, v in rdn if k in ("organizationName", "commonName")]
    return " ".join(parts)


def http_get(sock: socket.socket, path: str, host: str) -> bytes:
    """One GET on an open connection; the whole response (Connection: close)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def eager_tls_get(proxy_port: int, host: str, port: int, cafile: str, path: str, timeout: float = 10) -> bytes:
    """CONNECT with the ClientHello in the same write (no waiting for the 200, as some clients do),
    then one GET over the TLS session (Connection: close); the decrypted response."""
    ctx = ssl.create_default_context(cafile=cafile)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() + outgoing.read())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    incoming.write(rest)
    out = b""
    sent = False
    while True:
        try:
            if not sent:
                tls.do_handshake()
                tls.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
                sent = True
            data = tls.read(65536)
            if not data:
                break  # close_notify
            out += data
            continue
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            break
        s.sendall(outgoing.read())
        chunk = s.recv(65536)
        if not chunk:
            break
        incoming.write(chunk)
    s.close()
    return out
