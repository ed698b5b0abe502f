"""Fetching from origin servers over HTTP: one shared aiohttp ClientSession with a pooled
TCPConnector (keep-alive to origins), aiodns for name lookups, and nothing added or changed on the
way: no automatic headers, no decompression, no cookies, the request target byte-for-byte.

Failures come back as `UpstreamError` with the status the client should see (502/504) and a
sentence naming the host and the cause.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from webproxy.errors import UpstreamError
from webproxy.httpmsg import Headers

# aiohttp would otherwise add these on its own; a proxy passes on what the client sent.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _make_resolver() -> aiohttp.abc.AbstractResolver:
    try:
        return aiohttp.AsyncResolver()
    except Exception:  # aiodns missing or unusable here: fall back to the thread-pool resolver
        return aiohttp.ThreadedResolver()


class Upstream:
    """The origin-side HTTP client, shared by every client connection of one proxy process."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.resolver = _make_resolver()
        connector = aiohttp.TCPConnector(
            limit=cfg["pool_size"],
            limit_per_host=cfg["pool_size_per_host"],
            ttl_dns_cache=int(cfg["dns_ttl"]) or None,
            use_dns_cache=cfg["dns_ttl"] > 0,
            resolver=self.resolver,
            keepalive_timeout=cfg["keepalive_timeout"],
            family=socket.AF_UNSPEC,
            ssl=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
            read_bufsize=1 << 16,
            max_line_size=65536,
            max_field_size=65536,
        )
        self.active = 0  # fetches in flight, read by the refresher's load check
        self._timeouts: tuple[tuple[float, float] | None, aiohttp.ClientTimeout | None] = (None, None)

    def timeouts(self) -> aiohttp.ClientTimeout:
        """Built once per config (SIGHUP may change it), not once per request."""
        key = (self.cfg["connect_timeout"], self.cfg["read_timeout"])
        if self._timeouts[0] != key:
            self._timeouts = (key, aiohttp.ClientTimeout(total=None, sock_connect=key[0], sock_read=key[1]))
        return self._timeouts[1]

    async def request(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: AsyncIterator[bytes] | bytes | None,
        host_label: str,
    ) -> aiohttp.ClientResponse:
        """Send the request and return once the response head is in; the caller reads the body
        and must `release()` (clean end) or `close()` (abandoned) the response."""
        try:
            return await self.session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                timeout=self.timeouts(),
                ssl=False,
            )
        except aiohttp.ClientConnectorDNSError as e:
            raise UpstreamError(502, f"cannot resolve {host_label}: DNS lookup failed ({_why(e)})", "ERR_DNS_FAIL") from None
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamError(504, f"timed out connecting to {host_label}", "ERR_CONNECT_FAIL") from None
        except aiohttp.SocketTimeoutError:
            raise UpstreamError(504, f"timed out waiting for {host_label} to answer", "ERR_READ_TIMEOUT") from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError(502, f"cannot connect to {host_label}: {_why(e)}", "ERR_CONNECT_FAIL") from None
        except aiohttp.ServerDisconnectedError:
            raise UpstreamError(502, f"{host_label} closed the connection without answering", "ERR_READ_ERROR") from None
        except aiohttp.ClientResponseError as e:
            raise UpstreamError(502, f"{host_label} sent an invalid response: {e.message}", "ERR_INVALID_RESP") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(502, f"error talking to {host_label}: {_why(e)}", "ERR_READ_ERROR") from None
        except TimeoutError:
            raise UpstreamError(504, f"timed out talking to {host_label}", "ERR_READ_TIMEOUT") from None

    async def close(self) -> None:
        await self.session.close()


def _why(e: BaseException) -> str:
    os_error = getattr(e, "os_error", None)
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    text = str(e)
    return text if text else type(e).__name__
