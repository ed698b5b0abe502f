"""One shape for a response from any origin (HTTP via webproxy.upstream, FTP via aioftp), so
relaying to the client and filling the cache are written once.

`headers` are end-to-end only (hop-by-hop and framing headers removed); `length` is the body
length when the origin declared it; `chunks()` streams the body; `close(clean)` always follows:
clean when the body was read to its end (the connection may be reused), not clean when abandoned.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from webproxy.httpmsg import Headers, strip_hop_by_hop
from webproxy.metrics import TALLY
from webproxy.upstream import UpstreamResponse


class OriginResponse:
    status: int
    reason: str
    headers: Headers
    length: int | None
    version: str = "1.1"
    peer: str | None = None
    hierarchy: str | None = None  # the access log's hierarchy field when a parent proxy answered

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
        self.received = 0  # body bytes, for the origin-bytes metric

    def chunks(self) -> AsyncIterator[bytes]:
        # An iterator object rather than an async generator: a generator per response costs the
        # event loop's asyncgen bookkeeping (a WeakSet entry), measurable at 1 KiB responses.
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.resp.read()  # OriginError when short, timed out or malformed
        if not chunk:
            raise StopAsyncIteration
        self.received += len(chunk)
        return chunk

    async def close(self, clean: bool) -> None:
        TALLY.origin_bytes += self.received
        if clean:
            self.resp.release()
        else:
            self.resp.abort()


# Opens a fetch from any origin: (method, request fields) -> the response head. The cache layer
# is handed one per request, so it never needs to know which scheme or fetcher is behind it.
Opener = Callable[[str, Headers], Awaitable[OriginResponse]]
