"""A tunnel through a parent proxy: dial the parent, ask it for `CONNECT host:port` (RFC 9110 9.3.6),
and hand back the connected socket once it answers 2xx.

Failures to reach the parent, or a parent that closes or says nothing usable, are DialErrors (the
caller may try another hop); a parent that answers with another status is a TunnelRefused (it is
alive and said no: its answer is reported, not retried elsewhere).
"""

from __future__ import annotations

import asyncio
import socket

from tunnel.connect import DialError, DialTimeout, Resolver, open_upstream

MAX_ANSWER = 65536  # a CONNECT answer's head; anything larger is not a proxy speaking HTTP


class TunnelRefused(Exception):
    """The parent answered the CONNECT with a non-2xx status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status, self.reason = status, reason


def connect_request(host: str, port: int, fields: list[tuple[str, str]]) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", *(f"{k}: {v}" for k, v in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def parse_answer(head: bytes) -> tuple[int, str]:
    """(status, reason) of a CONNECT answer's status line; ValueError when it is not HTTP."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP answer: {line[:80]!r}")
    return int(code), reason.strip()


async def dial_through_parent(parent_host: str, parent_port: int, host: str, port: int, *,
                              fields: list[tuple[str, str]], timeout: float,
                              resolve: Resolver | None = None) -> tuple[socket.socket, bytes]:
    """(socket, bytes the parent sent after its answer head) for a tunnel to host:port through the
    parent. `fields` go on the CONNECT (Proxy-Authorization, Via). `timeout` bounds the dial and
    the answer together. Raises DialError (parent unreachable or not answering) or TunnelRefused."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sock = await open_upstream(parent_host, parent_port, timeout=timeout, resolve=resolve)
    try:
        async with asyncio.timeout(max(0.0, deadline - loop.time())):
            await loop.sock_sendall(sock, connect_request(host, port, fields))
            buf = b""
            while b"\r\n\r\n" not in buf:
                if len(buf) > MAX_ANSWER:
                    raise DialError(parent_host, parent_port, f"answered CONNECT with a head over {MAX_ANSWER} bytes")
                chunk = await loop.sock_recv(sock, 16384)
                if not chunk:
                    raise DialError(parent_host, parent_port, "closed the connection without answering CONNECT")
                buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        try:
            status, reason = parse_answer(head)
        except ValueError as e:
            raise DialError(parent_host, parent_port, f"sent an invalid answer to CONNECT ({e})") from None
        if not 200 <= status < 300:
            raise TunnelRefused(status, reason)
        return sock, rest
    except TimeoutError:
        sock.close()
        raise DialTimeout(parent_host, parent_port, f"no answer to CONNECT within {timeout:g}s") from None
    except OSError as e:
        sock.close()
        if isinstance(e, DialError):
            raise
        raise DialError(parent_host, parent_port, f"connection broke during CONNECT ({e.strerror or e})") from None
    except BaseException:
        sock.close()
        raise
