"""Plugs the SOCKS5 listener (tunnel.socks) into the proxy: the access rules it asks, the shared
resolver, and one Squid-format access-log line per session."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol
from urllib.parse import quote

from tunnel import socksproto
from tunnel.connect import Resolver
from tunnel.socks import SessionRecord, SocksSettings, serve_socks
from webproxy import logcodes
from webproxy.acl import client_allowed, domain_denied
from webproxy.auth import AuthGate
from webproxy.config import Config


class SocksHost(Protocol):
    """What the SOCKS listener needs from the running proxy."""

    @property
    def cfg(self) -> Config: ...

    resolve: Resolver
    auth: AuthGate

    def log_error(self, message: str, level: str = "error") -> None: ...

    def log_access(self, start: float, client: str, code: str, status: int, nbytes: int, method: str,
                   url: str, hierarchy: str, ctype: str | None, user: str = "-") -> None: ...


# How each reply code reads in the Squid-format access log: (code, HTTP-like status), so log tools
# that count by status see refusals (403), upstream failures (502/504) and bad requests (4xx/501).
LOG_STATUS = {
    socksproto.SUCCEEDED: (logcodes.TUNNEL, 200),
    socksproto.GENERAL_FAILURE: (logcodes.TUNNEL, 502),
    socksproto.NOT_ALLOWED: (logcodes.DENIED, 403),
    socksproto.NETWORK_UNREACHABLE: (logcodes.TUNNEL, 502),
    socksproto.HOST_UNREACHABLE: (logcodes.TUNNEL, 502),
    socksproto.REFUSED: (logcodes.TUNNEL, 502),
    socksproto.TTL_EXPIRED: (logcodes.TUNNEL, 504),
    socksproto.COMMAND_NOT_SUPPORTED: (logcodes.NONE, 501),
    socksproto.ADDRESS_TYPE_NOT_SUPPORTED: (logcodes.NONE, 400),
}


def log_fields(rec: SessionRecord) -> tuple[str, int, int, str, str, str, str]:
    """(tag, status, bytes, method, url, hierarchy, user) of a session's access-log line. Bytes
    are both directions added: a SOCKS session has no "reply", and both ways cost bandwidth."""
    if rec.reply is None:
        tag, status = (logcodes.DENIED, 503) if rec.command == "-" and rec.note.startswith("refused") \
            else (logcodes.NONE, 0)
    else:
        tag, status = LOG_STATUS.get(rec.reply, (logcodes.NONE, 502))
    if rec.note == "auth-failed":
        tag, status = logcodes.DENIED, 407
    hierarchy = logcodes.hier_direct(rec.peer) if rec.peer != "-" else logcodes.HIER_NONE
    # The log is split on spaces: a user name is written percent-encoded, as Squid does.
    user = quote(rec.user, safe="") if rec.user != "-" else "-"
    return tag, status, rec.up + rec.down, f"SOCKS5-{rec.command}", rec.target, hierarchy, user


def serve(server: SocksHost, started: Callable[..., Any]) -> Coroutine[Any, Any, None]:
    """The SOCKS listener of `server.cfg.socks`, serving until cancelled (composition runs it)."""
    cfg = server.cfg
    settings = SocksSettings.from_section(cfg.socks, cfg.upstream["connect_timeout"], cfg.server["workers"])

    def log(rec: SessionRecord) -> None:
        tag, status, nbytes, method, url, hierarchy, user = log_fields(rec)
        server.log_access(rec.start, rec.client, tag, status, nbytes, method, url, hierarchy, None, user)
        if rec.note:
            server.log_error(f"socks {method} {rec.client} -> {url}: {rec.note}", "debug")

    # The access rules are read at each session, so SIGHUP changes to [access] apply at once.
    return serve_socks(
        settings, allow_client=lambda ip: client_allowed(ip, server.cfg.access["allow_clients"]),
        deny_domain=lambda host: domain_denied(host, server.cfg.access),
        # [auth] on: RFC 1929 username/password against the same backend (and verdict cache),
        # failures slowed per address, auth.exempt_clients offered "no authentication".
        verify=server.auth.verify_socks if server.auth.on else None,
        needs_password=lambda ip: not server.auth.exempt(ip),
        resolve=server.resolve, log=log, started=started)
