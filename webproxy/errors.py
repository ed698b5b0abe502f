"""The proxy's error family: every member carries the status the client is answered with, and a
sentence for the body. Where each is raised says which side failed:

    Reject         the client's request is refused before anything goes upstream (400, 413, 414,
                   417, 431, 501...); the connection closes because its framing is in doubt
    UpstreamError  the origin (or the way to it) failed before a response head arrived: 502 / 504
    OriginError    the origin failed after its head was relayed: nothing can be answered any more,
                   the client connection is cut so a short body is never taken for a whole one
    ClientGone     the client went away: nobody to answer (logged as *_ABORTED, status 0)

`code` is Squid's error name (ERR_CONNECT_FAIL, ERR_READ_TIMEOUT...) for the error log.
"""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    code = "ERR_GENERIC"

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class Reject(ProxyError):
    """A request refused outright (client-side framing or limits)."""

    status = 400
    code = "ERR_INVALID_REQ"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status)


class UpstreamError(ProxyError):
    """No usable response head from the origin."""

    status = 502
    code = "ERR_CONNECT_FAIL"

    def __init__(self, status: int, message: str, code: str = "ERR_CONNECT_FAIL") -> None:
        super().__init__(message, status, code)


class OriginError(ProxyError):
    """The origin failed mid-body (after the head was relayed)."""

    status = 502
    code = "ERR_READ_ERROR"


class ClientGone(ProxyError):
    """The client closed its connection (or stopped reading for longer than the idle timeout)."""

    status = 0
    code = "ERR_CLIENT_GONE"
