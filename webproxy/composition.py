"""Plugs the optional layers (disk cache and active refresh, transparent and SOCKS listeners, port
forwarders) into a started proxy, each according to its config section."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from cache.store import open_store
from tunnel.connect import Resolver
from tunnel.forwarder import serve_forwarders
from tunnel.transparent import TransparentListener
from webproxy.acl import ConnectionCounter, client_allowed
from webproxy.caching import CacheLayer
from webproxy.config import Config
from webproxy.context import Env
from webproxy.exchange import Answers
from webproxy.frontend import ClientConnection, ConnectionHost, Inherited
from webproxy.intercept import Interceptor
from webproxy.refresher import Refresher, RefreshHost
from webproxy.refresher import attach as attach_refresher
from webproxy.service import Identity, acting_as
from webproxy.socksgate import serve as serve_socks
from webproxy.startup import StartupError, listen_error
from webproxy.tlspolicy import HTTPS_PORT


class Composable(Env, RefreshHost, ConnectionHost, Protocol):
    """The running proxy as the composition sees it."""

    @property
    def cfg(self) -> Config: ...

    answers: Answers
    counter: ConnectionCounter
    resolve: Resolver
    listen_addrs: list[tuple[str, int]]
    interceptor: Interceptor
    closers: list[Callable[[], Awaitable[None]]]

    def attach_cache(self, layer: CacheLayer, refresher: Refresher | None) -> None: ...


async def attach_layers(proxy: Composable, ident: Identity | None = None) -> None:
    """Raises StartupError (one line for the user) when a transparent or tunnel listener cannot bind.
    `ident`: the user (server.user) the cache's files are created as."""
    cfg = proxy.cfg
    if cfg.cache["enabled"]:
        with acting_as(ident):
            layer = CacheLayer(proxy, proxy.answers, open_store(cfg.cache))
        proxy.attach_cache(layer, attach_refresher(proxy, layer))
    if cfg.transparent["listen"]:
        await _start_transparent(proxy)
    if cfg.socks["listen"]:
        await _start_serving(proxy, lambda started: serve_socks(proxy, started), "socks.listen")
    if cfg.tunnel:
        await _start_forwarders(proxy)


def on_http_factory(proxy: ConnectionHost) -> Any:
    """The callback tunnel.transparent calls with a socket whose first bytes look like HTTP."""

    async def on_http(sock: socket.socket, initial: bytes, orig_dst: tuple[str, int], client_addr: Any) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(
            lambda: ClientConnection(proxy, initial=initial, transparent_dst=orig_dst), sock)

    return on_http


def wants_tls(interceptor: Interceptor, sni: str | None, dst: tuple[str, int]) -> bool:
    """A redirected TLS connection is intercepted when it goes to port 443 and its ClientHello
    names a domain in tls.intercept; any other is relayed raw, as before."""
    return dst[1] == HTTPS_PORT and sni is not None and interceptor.wants(sni)


def on_tls_factory(proxy: Composable) -> Any:
    """The callback tunnel.transparent calls with an admitted connection to intercept: served
    like a CONNECT to the SNI name, fetched from the original destination (verified for that name)."""

    async def on_tls(sock: socket.socket, initial: bytes, orig_dst: tuple[str, int], client_addr: Any,
                     sni: str | None) -> None:
        ip, port = orig_dst
        assert sni is not None
        await proxy.interceptor.serve(sock, initial, Inherited(
            client_addr[0], client_addr[1], sni, port, connect=f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"))

    return on_tls


def raw_relay_admission(proxy: Composable) -> tuple[Callable[[str], str | None], Callable[[str], None]]:
    """(admit, release) for intercepted connections relayed raw: the same client check (the live
    `access.allow_clients`, SIGHUP included) and the same connection counts as HTTP clients."""

    def admit(ip: str) -> str | None:
        if not client_allowed(ip, proxy.cfg.access["allow_clients"]):
            return "denied"
        why = proxy.counter.admit(ip, proxy.cfg.access)
        return f"refused ({why})" if why else None

    return admit, proxy.counter.release


async def _start_transparent(proxy: Composable) -> None:
    cfg = proxy.cfg
    admit, release = raw_relay_admission(proxy)
    listener = TransparentListener(
        cfg.transparent["listen"], on_http=on_http_factory(proxy), mode=cfg.transparent["mode"],
        sniff_bytes=cfg.transparent["sniff_bytes"], sniff_timeout=cfg.transparent["sniff_timeout"],
        connect_timeout=cfg.upstream["connect_timeout"], idle_timeout=cfg.server["idle_timeout"] or None,
        spoof_client_address=cfg.transparent["spoof_client_address"],
        own_listeners=[*proxy.listen_addrs, *cfg.transparent["listen"]], resolve=proxy.resolve,
        log=lambda line: proxy.log_error(line, "info"), admit=admit, release=release,
        half_close_timeout=cfg.transparent["half_close_timeout"] or None,
        wants_tls=lambda sni, dst: wants_tls(proxy.interceptor, sni, dst), on_tls=on_tls_factory(proxy))
    try:
        listener.start()
    except OSError as e:
        host, port = cfg.transparent["listen"][0]
        if e.errno in (1, 13):  # EPERM/EACCES: IP_TRANSPARENT needs CAP_NET_ADMIN
            raise StartupError(f"cannot open the transparent listener ({cfg.transparent['mode']} mode): {e.strerror}; "
                               "TPROXY needs root or CAP_NET_ADMIN") from None
        raise StartupError(listen_error(host, port, e)) from None
    proxy.closers.append(listener.close)


async def _start_forwarders(proxy: Composable) -> None:
    await _start_serving(proxy, lambda started: serve_forwarders(
        proxy.cfg.tunnel, log=lambda line: proxy.log_error(line, "info"), resolve=proxy.resolve,
        started=started))


async def _start_serving(proxy: Composable, serve: Callable[[Callable[..., Any]], Awaitable[None]],
                         key: str = "server.listen") -> None:
    """Run `serve(started)` (it calls started() once listening) until shutdown. Raises StartupError
    naming `key` when it cannot bind."""
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(serve(lambda *_: started.done() or started.set_result(None)))
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        e = task.exception()
        if isinstance(e, OSError):
            host, port = getattr(e, "listen", ("?", 0))
            raise StartupError(listen_error(host, port, e).replace("server.listen", key)) from None
        if e is not None:
            raise e

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    proxy.closers.append(stop)
