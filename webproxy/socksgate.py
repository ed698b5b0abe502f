"""Plugs the SOCKS5 listener (tunnel.socks) into the proxy: the access rules it asks, the shared
resolver, and one Squid-format access-log line per session."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from tunnel import socksproto
from tunnel.socks import SessionRecord, SocksSettings, serve_socks
from webproxy.acl import client_allowed, domain_denied

if TYPE_CHECKING:
    from webproxy.server import ProxyServer


def log_fields(rec: SessionRecord) -> tuple[str, int, int, str, str, str, str]:
    """(tag, status, bytes, method, url, hierarchy, user) of a session's access-log line. Bytes
    are both directions added: a SOCKS session has no "reply", and both ways cost bandwidth."""
    if rec.reply is None:
        tag, status = ("TCP_DENIED", 503) if rec.command == "-" and rec.note.startswith("refused") \
            else ("TAG_NONE", 0)
    else:
        tag, status = socksproto.LOG_STATUS.get(rec.reply, ("TAG_NONE", 502))
    if rec.note == "auth-failed":
        tag, status = "TCP_DENIED", 407
    hierarchy = f"HIER_DIRECT/{rec.peer}" if rec.peer != "-" else "HIER_NONE/-"
    # The log is split on spaces: a user name is written percent-encoded, as Squid does.
    user = quote(rec.user, safe="") if rec.user != "-" else "-"
    return tag, status, rec.up + rec.down, f"SOCKS5-{rec.command}", rec.target, hierarchy, user


def serve(server: ProxyServer, started: Callable[..., Any]) -> Coroutine[Any, Any, None]:
    """The SOCKS listener of `server.cfg.socks`, serving until cancelled (composition runs it)."""
    cfg = server.cfg
    settings = SocksSettings.from_section(cfg.socks, cfg.upstream["connect_timeout"], cfg.server["workers"])

    def log(rec: SessionRecord) -> None:
        tag, status, nbytes, method, url, hierarchy, user = log_fields(rec)
        server.accesslog.log(rec.start, rec.client, tag, status, nbytes, method, url, hierarchy, user=user)
        if rec.note:
            server.log_error(f"socks {method} {rec.client} -> {url}: {rec.note}", "debug")

    # The access rules are read at each session, so SIGHUP changes to [access] apply at once.
    return serve_socks(
        settings, allow_client=lambda ip: client_allowed(ip, server.cfg.access["allow_clients"]),
        deny_domain=lambda host: domain_denied(host, server.cfg.access),
        verify=None,  # issue 10 hook: the [auth] backend's async verify(user, password) -> bool
        resolve=server.resolve, log=log, started=started)
