"""One shape for a response from any origin (HTTP via aiohttp, FTP via aioftp), so relaying to the
client and filling the cache are written once.

`headers` are end-to-end only (hop-by-hop and framing headers removed); `length` is the body
length when the origin declared it; `chunks()` streams the body; `close(clean)` always follows:
clean when the body was read to its end (the connection may be reused), not clean when abandoned.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp

from webproxy.errors import OriginError
from webproxy.httpmsg import Headers, strip_hop_by_hop
from webproxy.metrics import TALLY


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
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.version = f"{resp.version.major}.{resp.version.minor}"
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
        self.headers = [(k, v) for k, v in strip_hop_by_hop(raw) if k.lower() != "content-length"]
        self.length = None
        if "Transfer-Encoding" not in resp.headers:
            cl = resp.headers.get("Content-Length")
            if cl is not None and cl.strip().isdigit():
                self.length = int(cl)
        conn = resp.connection
        if conn is not None and conn.transport is not None:
            peer = conn.transport.get_extra_info("peername")
            self.peer = peer[0] if peer else None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as e:
            raise OriginError(str(e) or type(e).__name__) from None
        if self.length is not None and self.resp.content.total_bytes < self.length:
            raise OriginError("origin closed before the end of the body")

    async def close(self, clean: bool) -> None:
        TALLY.origin_bytes += self.resp.content.total_bytes
        if clean:
            self.resp.release()
        else:
            self.resp.close()


# Opens a fetch from any origin: (method, request fields) -> the response head. The cache layer
# is handed one per request, so it never needs to know which scheme or fetcher is behind it.
Opener = Callable[[str, Headers], Awaitable[OriginResponse]]
