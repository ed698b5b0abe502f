"""Plugs the optional layers (disk cache, ftp, gopher, transparent and SOCKS listeners, port
forwarders) into a started ProxyServer, each according to its config section."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webproxy.server import ProxyServer


async def attach_layers(server: ProxyServer) -> None:
    """Raises StartupError (one line for the user) when a transparent, SOCKS or tunnel listener cannot bind."""
    from webproxy.ftpgate import FtpGate
    from webproxy.gophergate import GopherGate

    server.ftp_layer = FtpGate(server)
    server.gopher_layer = GopherGate(server)
    if server.cfg.cache["enabled"]:
        from webproxy.caching import CacheLayer

        server.cache_layer = CacheLayer(server)
        if server.cfg.refresh["enabled"]:
            from webproxy.refresher import attach

            attach(server)
    cfg = server.cfg
    if cfg.transparent["listen"]:
        await _start_transparent(server)
    if cfg.socks["listen"]:
        await _start_socks(server)
    if cfg.tunnel:
        await _start_forwarders(server)


async def _start_transparent(server: ProxyServer) -> None:
    from tunnel.transparent import TransparentListener
    from webproxy.server import StartupError, _listen_error
    from webproxy.transparent import on_http_factory

    cfg = server.cfg
    listener = TransparentListener(
        cfg.transparent["listen"], on_http=on_http_factory(server), mode=cfg.transparent["mode"],
        sniff_bytes=cfg.transparent["sniff_bytes"], sniff_timeout=cfg.transparent["sniff_timeout"],
        connect_timeout=cfg.upstream["connect_timeout"], idle_timeout=cfg.server["idle_timeout"] or None,
        spoof_client_address=cfg.transparent["spoof_client_address"],
        own_listeners=[*server.listen_addrs, *cfg.transparent["listen"]], resolve=server.resolve,
        log=lambda line: server.log_error(line, "info"))
    try:
        listener.start()
    except OSError as e:
        host, port = cfg.transparent["listen"][0]
        if e.errno in (1, 13):  # EPERM/EACCES: IP_TRANSPARENT needs CAP_NET_ADMIN
            raise StartupError(f"cannot open the transparent listener ({cfg.transparent['mode']} mode): {e.strerror}; "
                               "TPROXY needs root or CAP_NET_ADMIN") from None
        raise StartupError(_listen_error(host, port, e)) from None
    server.closers.append(listener.close)


async def _start_socks(server: ProxyServer) -> None:
    from webproxy.socksgate import serve

    await _start_serving(server, lambda started: serve(server, started), "socks.listen")


async def _start_forwarders(server: ProxyServer) -> None:
    from tunnel.forwarder import serve_forwarders

    await _start_serving(server, lambda started: serve_forwarders(
        server.cfg.tunnel, log=lambda line: server.log_error(line, "info"), resolve=server.resolve,
        started=started))


async def _start_serving(server: ProxyServer, serve: Callable[[Callable[..., Any]], Awaitable[None]],
                         key: str = "server.listen") -> None:
    """Run `serve(started)` (it calls started() once listening) until shutdown. Raises StartupError
    naming `key` when it cannot bind."""
    import asyncio

    from webproxy.server import StartupError, _listen_error

    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(serve(lambda *_: started.done() or started.set_result(None)))
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        e = task.exception()
        if isinstance(e, OSError):
            host, port = getattr(e, "listen", ("?", 0))
            raise StartupError(_listen_error(host, port, e).replace("server.listen", key)) from None
        if e is not None:
            raise e

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    server.closers.append(stop)
