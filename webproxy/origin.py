"""One shape for a response from any origin (HTTP via webproxy.upstream, FTP via aioftp), so
relaying to the client and filling the cache are written once.

`headers` are end-to-end only (hop-by-hop and framing headers removed); `length` is the body
length when the origin declared it; `chunks()` streams the body; `close(clean)` always follows:
clean when the body was read to its end (the connection may be reused), not clean when abandoned.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from webproxy.httpmsg import Headers, strip_hop_by_hop
from webproxy.upstream import BodyError, UpstreamResponse


class OriginError(Exception):
    """The origin failed after the response head: the body is incomplete."""


class OriginResponse:
    status: int
    reason: str
    headers: Headers
    length: int | None
    version: str = "1.1"
    peer: str | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def close(self, clean: bool) -> None:
        """Give the connection back (clean) or drop it (abandoned mid-body)."""

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class HttpOriginResponse(OriginResponse):
    """An HTTP origin's final response, from our upstream client."""

    def __init__(self, resp: UpstreamResponse) -> None:
        self.resp = resp
        self.status = resp.status
        self.reason = resp.reason
        self.version = resp.version
        self.headers = [(k, v) for k, v in strip_hop_by_hop(resp.headers) if k.lower() != "content-length"]
        self.length = resp.length
        self.peer = resp.peer

    def chunks(self) -> AsyncIterator[bytes]:
        # An iterator object rather than an async generator: a generator per response costs the
        # event loop's asyncgen bookkeeping (a WeakSet entry), measurable at 1 KiB responses.
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self.resp.read()
        except BodyError as e:  # short, timed out or malformed: never a complete-looking body
            raise OriginError(str(e)) from None
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def close(self, clean: bool) -> None:
        if clean:
            self.resp.release()
        else:
            self.resp.abort()


class FtpOriginResponse(OriginResponse):
    def __init__(self, resp: object, method: str) -> None:
        from webproxy.ftp import FtpResponse

        assert isinstance(resp, FtpResponse)
        self.resp = resp
        self.status = resp.status
        self.reason = resp.reason
        self.headers = [(k, v) for k, v in resp.headers if k.lower() != "content-length"]
        cl = resp.header("content-length")
        self.length = int(cl) if cl is not None and cl.isdigit() else None
        self.method = method

    async def chunks(self) -> AsyncIterator[bytes]:
        from webproxy.ftp import FtpTransferError

        if self.method == "HEAD":
            return
        try:
            async for chunk in self.resp.body():
                yield chunk
        except FtpTransferError as e:
            raise OriginError(str(e)) from None

    async def close(self, clean: bool) -> None:
        # FtpResponse knows whether its transfer completed, and pools or drops the session itself.
        with contextlib.suppress(Exception):
            await self.resp.aclose()
