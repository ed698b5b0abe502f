"""The few things request handlers need from the running proxy, as one small typed Protocol.

Handlers (the http forwarder, CONNECT, ftp, transparent, the proxy's own pages, the cache layer)
are given an `Env` and the collaborators they use (an `Answers`, an `Upstream`, a resolver) when the
proxy starts; none of them holds or reaches through the server object.
"""

from __future__ import annotations

from typing import Protocol

from webproxy.config import Config


class Env(Protocol):
    @property
    def cfg(self) -> Config: ...  # the live configuration (SIGHUP replaces it)

    def log_error(self, message: str, level: str = "error") -> None: ...

    def upstream_failure(self, method: str, url: str, status: int, message: str) -> None: ...  # summarised

    def is_self(self, host: str, port: int) -> bool: ...  # does host:port name one of our listeners

    def is_admin(self, client_ip: str) -> bool: ...

    def destination_refused(self, client_ip: str, ip: str) -> bool: ...  # access.deny_destinations

    def is_local_address(self, ip: str) -> bool: ...  # an address of this host
