"""Plugs the optional layers (disk cache, ftp, transparent listeners, port forwarders) into a
started ProxyServer, each according to its config section."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from webproxy.server import ProxyServer


async def attach_layers(server: ProxyServer) -> None:
    from webproxy.ftpgate import FtpGate

    server.ftp_layer = FtpGate(server)
    if server.cfg.cache["enabled"]:
        from webproxy.caching import CacheLayer

        server.cache_layer = CacheLayer(server)
