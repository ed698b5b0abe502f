"""Checks made before serving starts: listen sockets bound up front, the cache directory writable.
Each failure is a StartupError whose message is the one line the user sees (exit 2)."""

from __future__ import annotations

import errno
import os
import socket

from webproxy import config as config_mod


class StartupError(Exception):
    """Raised before serving starts; the message is the one line the user sees (exit 2)."""


def listen_error(host: str, port: int, e: OSError) -> str:
    where = f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is already in use (is another proxy running?); change server.listen or stop the other process"
    if e.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need root); choose a port above 1024 in server.listen"
    if e.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME if hasattr(socket, "EAI_NONAME") else -2):
        return f"cannot listen on {where}: no such local address; use an address of this machine in server.listen"
    return f"cannot listen on {where}: {e.strerror or e}; check server.listen"


def check_cache_dir(cfg: config_mod.Config) -> None:
    if not cfg.cache["enabled"]:
        return
    path = cfg.cache["directory"]
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as e:
        raise StartupError(f"cache directory {path} is not writable ({e.strerror}); fix its permissions or set "
                           "cache.directory to a writable path") from None


def bind_listeners(addrs: list[tuple[str, int]], reuse_port: bool) -> list[socket.socket]:
    """Bind every listen address up front, so a port in use is one clear error before anything starts."""
    socks = []
    try:
        for host, port in addrs:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                family, _, _, _, sockaddr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind(sockaddr)
                sock.listen(1024)
                sock.setblocking(False)
            except OSError as e:
                raise StartupError(listen_error(host, port, e)) from None
    except StartupError:
        for sock in socks:
            sock.close()
        raise
    return socks
