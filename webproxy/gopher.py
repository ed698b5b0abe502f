"""Fetching gopher:// items for HTTP clients (RFC 1436): send the selector, answer with an
OriginResponse, so the answer takes the same relay and cache path as an HTTP or FTP origin's.

- menus (type 1) and search results (type 7) are read whole (up to MAX_MENU) and become HTML pages
  whose links lead back through the proxy; a type 7 URL without search words becomes a form;
- text (type 0) streams as text/plain, without the "." line that ends it (RFC 1436 section 3.8);
- every other type streams byte-exact, typed by item type or selector extension.

HTTP statuses: a reply that is only a type 3 error line: 404 with the server's words. Cannot resolve
or connect, or the connection breaks: 502; no answer within `gopher.timeout`: 504. A bad URL: 400;
a method other than GET/HEAD: 405. Gopher carries no dates: freshness is set by the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus

from tunnel.connect import DialError, DialTimeout, Resolver, open_upstream
from webproxy.errors import OriginError
from webproxy.gophermenu import (
    MENU_TYPES,
    TEXT_TYPES,
    BadGopherUrl,
    GopherUrl,
    error_text,
    media_type,
    parse_menu,
    parse_path,
    render_menu,
    render_search_form,
)
from webproxy.httpmsg import Headers, Target
from webproxy.origin import OriginResponse

CHUNK = 256 * 1024
MAX_MENU = 8 << 20  # a menu is held whole to render it; refuse absurd ones
_ERROR_PEEK = 4096  # a reply starting with "3" this short is read whole to see if it is an error
# How a text item may end (RFC 1436 section 3.8: a line with a lone "."), and how much to keep.
_TEXT_END = ((b"\r\n.\r\n", 2), (b"\n.\r\n", 1), (b"\n.\n", 1))


def _ends_with_lastline(data: bytes) -> bool:
    """Has the "." line that ends a menu or a text arrived (RFC 1436 section 3.8)? Then the answer is
    complete even when a server keeps the connection open."""
    return data.endswith((b"\n.\r\n", b"\n.\n")) or data in (b".\r\n", b".\n")


class _Failed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GopherOriginResponse(OriginResponse):
    """A whole answer (`content`: menus, errors) or a stream from the server (`reader`)."""

    def __init__(self, status: int, headers: Headers, *, content: bytes = b"", first: bytes = b"",
                 reader: asyncio.StreamReader | None = None, writer: asyncio.StreamWriter | None = None,
                 text: bool = False, method: str = "GET", timeout: float = 30.0) -> None:
        self.status = status
        self.reason = HTTPStatus(status).phrase
        self.headers = headers
        self.length = len(content) if reader is None else None
        self.peer = None
        self._content, self._first = content, first
        self._reader, self._writer = reader, writer
        self._text, self._method, self._timeout = text, method, timeout

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._method == "HEAD":
            return
        if self._reader is None:
            if self._content:
                yield self._content
            return
        if not self._text:
            if self._first:
                yield self._first
            while data := await self._read():
                yield data
            return
        # Text: hold back the last few bytes, so the terminating "." line can be dropped at the end.
        held = self._first
        while not _ends_with_lastline(held) and (data := await self._read()):
            held += data
            if len(held) > 8:
                yield held[:-8]
                held = held[-8:]
        for end, keep in _TEXT_END:
            if held.endswith(end):
                held = held[: len(held) - len(end) + keep]
                break
        else:
            if held in (b".\r\n", b".\n"):
                held = b""
        if held:
            yield held

    async def _read(self) -> bytes:
        assert self._reader is not None
        try:
            async with asyncio.timeout(self._timeout):
                return await self._reader.read(CHUNK)
        except TimeoutError:
            raise OriginError(f"the gopher server stopped sending for {self._timeout:g}s") from None
        except OSError as e:
            raise OriginError(f"the gopher connection broke ({e.strerror or e})") from None

    async def close(self, clean: bool) -> None:
        if self._writer is not None:
            self._writer.close()


def _answer(status: int, content: bytes, ctype: str, extra: Headers = ()) -> GopherOriginResponse:
    return GopherOriginResponse(status, [("Content-Type", ctype), *extra], content=content)


def _error(status: int, message: str) -> GopherOriginResponse:
    return _answer(status, (message + "\n").encode("utf-8", "replace"), "text/plain; charset=utf-8",
                   [("Cache-Control", "no-store")])


def _html(page: str) -> GopherOriginResponse:
    return _answer(200, page.encode("utf-8"), "text/html; charset=utf-8")


async def fetch(target: Target, method: str, *, timeout: float, resolve: Resolver | None = None) -> OriginResponse:
    """Ask the gopher server for the item `target` names (see the module docstring)."""
    if method not in ("GET", "HEAD"):
        return _answer(405, b"gopher:// URLs can only be read (GET or HEAD)\n", "text/plain",
                       [("Allow", "GET, HEAD")])
    try:
        item = parse_path(target.path)
    except BadGopherUrl as e:
        return _error(400, f"bad gopher URL: {e}")
    where = f"{target.host}:{target.port}"
    title = target.origin_url
    if item.item_type == "7" and item.search is None:
        return _html(render_search_form(title))
    try:
        sock = await open_upstream(target.host, target.port, timeout=timeout, resolve=resolve)
    except DialTimeout as e:
        return _error(504, f"gopher server {where} did not answer in time: {e}")
    except DialError as e:
        return _error(502, f"cannot reach gopher server {e}")
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    try:
        resp = await _exchange(item, reader, writer, title, method, timeout)
    except _Failed as e:
        writer.close()
        return _error(e.status, f"gopher server {where}: {e}")
    except BaseException:
        writer.close()
        raise
    if resp.length is not None:
        writer.close()
    return resp


async def _exchange(item: GopherUrl, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    title: str, method: str, timeout: float) -> GopherOriginResponse:
    try:
        async with asyncio.timeout(timeout):
            writer.write(item.request())
            await writer.drain()
            if item.item_type in MENU_TYPES:
                data = await reader.read(CHUNK)
                while len(data) <= MAX_MENU and not _ends_with_lastline(data) and (more := await reader.read(CHUNK)):
                    data += more
                if len(data) > MAX_MENU:
                    raise _Failed(502, f"the menu is larger than {MAX_MENU >> 20} MiB")
            else:
                data = await reader.read(CHUNK)
                if data.startswith(b"3") and len(data) < _ERROR_PEEK:
                    while len(data) < _ERROR_PEEK and (more := await reader.read(_ERROR_PEEK)):
                        data += more
    except TimeoutError:
        raise _Failed(504, f"no answer within {timeout:g}s (gopher.timeout)") from None
    except OSError as e:
        raise _Failed(502, f"the connection broke ({e.strerror or e})") from None
    complete = item.item_type in MENU_TYPES or reader.at_eof()
    why = error_text(data) if complete and data.startswith(b"3") else None
    if why is not None:
        raise _Failed(404, f"no such item: {why}")
    if item.item_type in MENU_TYPES:
        return _html(render_menu(title, parse_menu(data)))
    ctype = media_type(item.item_type, item.selector)
    if item.item_type in TEXT_TYPES:
        ctype += "; charset=utf-8"
    return GopherOriginResponse(200, [("Content-Type", ctype)], first=data, reader=reader, writer=writer,
                                text=item.item_type in TEXT_TYPES, method=method, timeout=timeout)
