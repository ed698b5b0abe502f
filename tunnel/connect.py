"""Open the upstream side of a tunnel: resolve, connect with a deadline, say clearly what failed.

The caller (CONNECT handler, transparent listener, forwarder, SOCKS) turns the DialError into its own
answer: an HTTP front end answers the error's `status` (502, 504 for a timeout), SOCKS its reply code.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import Any

from tunnel.origdst import set_transparent

# A resolver gets (host, port) and returns addresses: IP strings, or dicts with a "host" key as
# aiohttp's AsyncResolver.resolve() returns.
Resolver = Callable[[str, int], Awaitable[Sequence[Any]]]


class DialError(OSError):
    """The upstream could not be reached (dialling it failed). `kind` says why, `status` is the
    HTTP status a front end answers with (502; 504 for a timeout; 403 when refused by a rule), and
    str() is one line for a person. Not to be confused with what goes wrong once an HTTP exchange
    has started (webproxy.errors)."""

    kind = "failed"
    status = 502

    def __init__(self, host: str, port: int, detail: str) -> None:
        super().__init__(f"{host}:{port}: {detail}")
        self.host, self.port = host, port


class DialDNSError(DialError):
    kind = "dns"


class DialRefused(DialError):
    kind = "refused"


class DialTimeout(DialError):
    kind = "timeout"
    status = 504


class DialUnreachable(DialError):
    kind = "unreachable"


class DialDenied(DialError):
    """Every address of the host is refused by the caller's `check` (e.g. SOCKS deny_networks)."""

    kind = "denied"
    status = 403


@lru_cache(maxsize=1024)
def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def _addresses(host: str, port: int, resolve: Resolver | None) -> list[str]:
    try:
        if resolve is not None:
            found = await resolve(host, port)
            addrs = [a["host"] if isinstance(a, dict) else str(a) for a in found]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addrs = [info[4][0] for info in infos]
    except OSError as e:
        raise DialDNSError(host, port, f"cannot resolve host name ({e.strerror or e})") from None
    except Exception as e:  # third-party resolvers raise their own types (aiodns.error.DNSError)
        raise DialDNSError(host, port, f"cannot resolve host name ({e})") from None
    unique = list(dict.fromkeys(addrs))
    if not unique:
        raise DialDNSError(host, port, "host name has no addresses")
    return unique


async def resolve_host(host: str, port: int, *, timeout: float, resolve: Resolver | None = None) -> list[str]:
    """The addresses of `host` (an IP literal is its own answer). Raises DialDNSError or
    DialTimeout."""
    literal = _ip_literal(host)
    if literal is not None:
        return [literal]
    try:
        async with asyncio.timeout(timeout):
            return await _addresses(host, port, resolve)
    except TimeoutError:
        raise DialTimeout(host, port, f"name resolution took longer than {timeout:g}s") from None


async def open_upstream(host: str, port: int, *, timeout: float,
                        local_addr: tuple[str, int] | None = None, transparent: bool = False,
                        resolve: Resolver | None = None,
                        check: Callable[[str], str | None] | None = None) -> socket.socket:
    """Return a connected non-blocking TCP socket to host:port, trying each address in turn.

    `timeout` bounds the whole attempt (resolution included). `local_addr` binds the socket first;
    with `transparent=True` the bind may use a non-local address (TPROXY: connect from the client's
    own address; needs CAP_NET_ADMIN and the gateway's `-m socket` rule to route replies back).
    `check(ip)` returns why an address may not be dialled (None: it may): it sees the resolved
    addresses, so a name cannot smuggle a refused address past it.
    Raises DialDNSError, DialRefused, DialTimeout, DialUnreachable or DialDenied.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    literal = _ip_literal(host)
    addrs = [literal] if literal is not None else await resolve_host(host, port, timeout=timeout, resolve=resolve)
    if check is not None:
        verdicts = [(a, check(a)) for a in addrs]
        allowed = [a for a, why in verdicts if not why]
        if not allowed:
            raise DialDenied(host, port, str(verdicts[0][1]))
        addrs = allowed
    last: DialError | None = None
    for addr in addrs:
        left = deadline - loop.time()
        if left <= 0:
            break
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        if local_addr is not None and (":" in local_addr[0]) != (family == socket.AF_INET6):
            continue  # cannot bind an address of the other family
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # out of file descriptors: no point trying the other addresses
            raise DialUnreachable(host, port, f"cannot create a socket ({e.strerror or e})") from None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if transparent:
                set_transparent(sock)
            if local_addr is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(local_addr)
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the connect in a Task, a
            # measurable cost per new tunnel when connections are short.
            async with asyncio.timeout(left):
                await loop.sock_connect(sock, (addr, port))
            return sock
        except TimeoutError:
            sock.close()
            last = DialTimeout(host, port, f"no answer to connect within {timeout:g}s")
        except ConnectionRefusedError:
            sock.close()
            last = DialRefused(host, port, "connection refused (nothing listens on that port)")
        except OSError as e:
            sock.close()
            last = DialUnreachable(host, port, f"cannot connect ({e.strerror or e})")
            last.errno = e.errno  # ENETUNREACH vs EHOSTUNREACH: SOCKS5 replies tell them apart
        except BaseException:
            sock.close()
            raise
    if last is None:
        last = DialTimeout(host, port, f"no answer to connect within {timeout:g}s")
    raise last
