"""Serving ftp:// URLs to HTTP clients: the FTP side of the proxy.

`fetch(url, method, headers, pool)` logs in (or reuses a pooled session), asks SIZE and MDTM,
and returns an `FtpResponse` whose body streams the RETR data connection chunk by chunk, or an
HTML listing for a directory, or a short text/plain error. HTTP statuses for FTP outcomes:

- login refused (530): 401 with `WWW-Authenticate: Basic realm="ftp://host"` when a browser prompt
  can help (anonymous, or credentials from the Authorization header, or a URL naming a user
  without a password); 403 when the URL itself carries the refused password, since the URL wins
  over any Authorization header and prompting would only loop.
- no such file or directory (550 and friends): 404; a reply that says permission is denied: 403.
- cannot connect, DNS failure, connection lost: 502; a timeout: 504; any other FTP failure: 502
  with the server's reply line in the body. A bad ftp URL: 400. Not GET/HEAD: 405.

Nothing half-done passes silently: a transfer (file or listing) is complete only when the data
connection has closed, the server's final reply is 226/250 and the length matches SIZE
(`ftpreply.transfer_problem`). The body iterator holds its last piece back until then, and raises
FtpTransferError instead of yielding it when the transfer failed: the front end then cuts the client
connection short of its Content-Length (or of the terminating chunk) and stores nothing.

A server that breaks the protocol or our bounds (an endless or oversized reply, a passive reply
out of range) is 502 "bad reply from the FTP server"; listings are rendered as they stream in
(`ftplisting.ListingRenderer`), in bounded memory and yielding to the loop between pieces.
"""

from __future__ import annotations

import asyncio
import mimetypes
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

import aioftp

from webproxy.ftplisting import ListingRenderer, visible
from webproxy.ftppool import CODEC, FtpPool, FtpSession, PoolClosed
from webproxy.ftpreply import BadReply, transfer_problem
from webproxy.ftpurl import (
    Credentials,
    FtpTarget,
    FtpUrlError,
    credentials,
    directory_location,
    if_modified_since,
    parse_ftp_url,
    server_path,
)

__all__ = ["FtpPool", "FtpResponse", "FtpStat", "FtpTransferError", "fetch", "stat"]

CHUNK = 256 * 1024
LISTING_CHUNK = 64 * 1024  # listing bytes parsed and rendered per turn of the event loop


class FtpTransferError(Exception):
    """The body stopped before the whole file arrived (see the module docstring)."""


class FtpStat(NamedTuple):
    mdtm: float | None  # modification time from MDTM, POSIX seconds
    size: int | None  # bytes, from SIZE


class _Transfer:
    """A RETR in progress: owns the data connection and, until released, the session."""

    def __init__(self, pool: FtpPool, session: FtpSession, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, size: int | None, listing: ListingRenderer | None = None) -> None:
        self.pool, self.session, self.reader, self.writer, self.size = pool, session, reader, writer, size
        self.listing = listing
        self.complete = False
        self.released = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes (or the rendered listing), the last piece held back until the transfer
        is known to be complete (module docstring)."""
        received = 0
        held = b""
        listing = self.listing
        try:
            while True:
                async with asyncio.timeout(self.session.timeout):
                    data = await self.reader.read(LISTING_CHUNK if listing else CHUNK)
                if not data:
                    break
                received += len(data)
                if self.size is not None and received > self.size:
                    raise FtpTransferError(f"the server sent more than the {self.size} bytes SIZE announced")
                if listing is not None:
                    data = listing.feed(data).encode()
                    await asyncio.sleep(0)  # a huge listing must not hold the loop
                if held:
                    yield held
                held = data
            self.writer.close()
            code, _ = await self.session.command(None, "xxx", "1xx")
            problem = transfer_problem(received, self.size, code)
            if problem is not None:
                raise FtpTransferError(f"the transfer failed: {problem}")
            self.complete = True
            if listing is not None:
                held += listing.finish().encode()
            if held:
                yield held
        except TimeoutError:
            raise FtpTransferError("the FTP server stopped sending (timeout)") from None
        except BadReply as e:
            raise FtpTransferError(f"bad reply from the FTP server: {e}") from None
        except (ConnectionError, asyncio.IncompleteReadError):
            raise FtpTransferError("the FTP connection was lost during the transfer") from None

    def release(self) -> None:
        if not self.released:
            self.released = True
            if not self.complete:
                self.writer.close()  # an abandoned transfer leaves the session mid-reply: not reusable
            self.pool.release(self.session, reusable=self.complete)


class FtpResponse:
    """What the proxy sends the HTTP client. Iterate `body()` once, then always `await aclose()`
    (or use `async with`), which returns the FTP session to the pool when the transfer completed."""

    def __init__(self, status: int, headers: list[tuple[str, str]], *, content: bytes = b"",
                 transfer: _Transfer | None = None, mdtm: float | None = None,
                 size: int | None = None) -> None:
        self.status = status
        self.reason = HTTPStatus(status).phrase
        self.headers = headers
        self.mdtm = mdtm
        self.size = size
        self._content = content
        self._transfer = transfer
        self._iter: AsyncIterator[bytes] | None = None

    def body(self) -> AsyncIterator[bytes]:
        if self._transfer is not None:
            self._iter = self._transfer.chunks()
            return self._iter
        return _once(self._content)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def without_body(self) -> FtpResponse:
        """The HEAD form: same status and headers, no body (a transfer is never started for HEAD)."""
        self._content = b""
        return self

    async def aclose(self) -> None:
        if self._iter is not None:
            aclose = getattr(self._iter, "aclose", None)
            if aclose is not None:
                await aclose()
        if self._transfer is not None:
            self._transfer.release()

    async def __aenter__(self) -> FtpResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


async def fetch(url: str, method: str, headers: list[tuple[str, str]], pool: FtpPool) -> FtpResponse:
    """Answer an HTTP request for an ftp:// URL. Never raises for FTP or network trouble: those
    become error responses (only the body iterator raises, FtpTransferError)."""
    if method not in ("GET", "HEAD"):
        return _text(405, f"{method} is not supported on ftp:// URLs (only GET and HEAD)\n",
                     [("Allow", "GET, HEAD")])
    try:
        target = parse_ftp_url(url)
        creds = credentials(target, headers, pool.anonymous_user, pool.anonymous_password)
    except FtpUrlError as e:
        return _text(400, f"{e}\n")

    async def serve(session: FtpSession) -> FtpResponse:
        return await _serve(pool, session, target, method, headers)

    response = await _with_session(pool, target, creds, serve)
    return response.without_body() if method == "HEAD" else response


async def stat(url: str, headers: list[tuple[str, str]], pool: FtpPool) -> FtpStat | FtpResponse:
    """Cheap revalidation: MDTM and SIZE without RETR. Returns FtpStat when the URL names a file
    (or a directory, whose validators are both None: a listing can only be refetched), else the
    response the client would get (404, 401, 502, 301 when a file became a directory, ...)."""
    plain = [(k, v) for k, v in headers if k.lower() != "if-modified-since"]
    response = await fetch(url, "HEAD", plain, pool)
    if response.status == 200:
        return FtpStat(response.mdtm, response.size)
    return response


async def _with_session(pool: FtpPool, target: FtpTarget, creds: Credentials,
                        serve: Callable[[FtpSession], Awaitable[FtpResponse]]) -> FtpResponse:
    where = target.origin
    for attempt in (1, 2):
        try:
            session = await pool.acquire(target.host, target.port, creds.user, creds.password)
        except aioftp.StatusCodeError as e:
            return _login_refused(target, creds, e)
        except TimeoutError:
            return _text(504, f"timed out connecting to the FTP server {where}\n")
        except BadReply as e:
            return _bad_reply(where, e)
        except PoolClosed:
            return _text(503, "the proxy is shutting down\n")
        except (OSError, asyncio.IncompleteReadError) as e:  # refused, unreachable, DNS, reset
            return _text(502, f"cannot connect to the FTP server {where}: {_os_reason(e)}\n")
        try:
            response = await serve(session)
        except TimeoutError:  # before OSError: TimeoutError is one
            pool.release(session, reusable=False)
            return _text(504, f"the FTP server {where} did not answer in time\n")
        except BadReply as e:
            pool.release(session, reusable=False)
            return _bad_reply(where, e)
        except aioftp.errors.InvalidCommand:  # a command built from a server's answer ended up with CR/LF
            pool.release(session, reusable=False)
            return _bad_reply(where, BadReply("a reply that would put control characters in a command"))
        except (OSError, asyncio.IncompleteReadError, aioftp.StatusCodeError) as e:
            lost = not isinstance(e, aioftp.StatusCodeError) or e.received_codes[-1] == "421"
            if not lost:  # a complete reply we did not expect: the session is still in step
                pool.release(session, reusable=True)
                return _reply_error(e)
            pool.release(session, reusable=False)
            # An idle session the server dropped (421 timeout, reset) fails on its first command:
            # that is not the request's fault, so try once more on a fresh connection.
            if session.reused and attempt == 1:
                continue
            return _text(502, f"the FTP server {where} closed the connection\n")
        except BaseException:
            pool.release(session, reusable=False)
            raise
        if response._transfer is None:
            pool.release(session, reusable=True)
        return response
    raise AssertionError("unreachable")


async def _serve(pool: FtpPool, session: FtpSession, target: FtpTarget, method: str,
                 headers: list[tuple[str, str]]) -> FtpResponse:
    path = server_path(target, session.home)
    if target.is_dir or target.type == "d":
        return await _directory(pool, session, target, path, method)

    conn_type = "A" if target.type == "a" else "I"
    await session.set_type(conn_type)
    size = None
    if conn_type == "I":  # SIZE in ASCII mode is meaningless (servers refuse or must scan the file)
        code, lines = await session.command("SIZE " + path)
        if code == "213":
            size = _int(lines[-1])
        elif not _unsupported(code):
            return await _not_a_file(session, target, path, code, lines)
    mdtm = None
    code, lines = await session.command("MDTM " + path)
    if code == "213":
        mdtm = parse_mdtm(lines[-1])
    elif size is None and not _unsupported(code):
        return await _not_a_file(session, target, path, code, lines)

    out = [("Content-Type", content_type(target.name, ascii_mode=conn_type == "A"))]
    if size is not None:
        out.append(("Content-Length", str(size)))
    if mdtm is not None:
        out.append(("Last-Modified", formatdate(int(mdtm), usegmt=True)))
        ims = if_modified_since(headers)
        if ims is not None and int(mdtm) <= ims:
            return FtpResponse(304, [("Last-Modified", formatdate(int(mdtm), usegmt=True))],
                               mdtm=mdtm, size=size)
    if method == "HEAD":
        return FtpResponse(200, out, mdtm=mdtm, size=size)

    reader, writer = await session.open_data(conn_type)
    try:
        await session.command("RETR " + path, "1xx")
    except aioftp.StatusCodeError as e:
        writer.close()
        code = e.received_codes[-1]
        if code.startswith("5") and code != "421":
            return await _not_a_file(session, target, path, code, [str(i) for i in e.info])
        raise
    except BaseException:
        writer.close()
        raise
    return FtpResponse(200, out, transfer=_Transfer(pool, session, reader, writer, size), mdtm=mdtm, size=size)


async def _not_a_file(session: FtpSession, target: FtpTarget, path: str, code: str,
                      lines: list[str]) -> FtpResponse:
    """The path could not be read as a file: a directory gets the 301 to its slash form (what
    browsers expect, and it makes the listing's relative links work), anything else the error."""
    cwd_code, _ = await session.command("CWD " + path)
    if cwd_code.startswith("2"):
        location = directory_location(target)
        return _text(301, f"{location}\n", [("Location", location)])
    return _error_for(code, lines)


async def _directory(pool: FtpPool, session: FtpSession, target: FtpTarget, path: str,
                     method: str) -> FtpResponse:
    code, lines = await session.command("CWD " + path)
    if not code.startswith("2"):
        return _error_for(code, lines)
    names_only = target.type == "d"
    ctype = "text/plain; charset=utf-8" if names_only else "text/html; charset=utf-8"
    if method == "HEAD":  # the listing's length is not known without listing: say what it is, no more
        return FtpResponse(200, [("Content-Type", ctype)])
    title = target.origin + "/" + "".join(visible(s) + "/" for s in target.segments)
    reader, writer, mlsd = await _open_listing(session, path)
    renderer = ListingRenderer(title, parent=bool(target.segments), mlsd=mlsd, names_only=names_only,
                               now=datetime.now(UTC), codec=CODEC)
    return FtpResponse(200, [("Content-Type", ctype)], transfer=_Transfer(pool, session, reader, writer, None, renderer))


async def _open_listing(session: FtpSession, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """Start MLSD (else LIST) on a fresh data connection: (reader, writer, whether it is MLSD)."""
    # Any TYPE does for a listing; keep the current one to save a round trip.
    conn_type = session.type or "I"
    reader, writer = await session.open_data(conn_type)
    mlsd = session.mlsd
    try:
        if mlsd:
            try:
                await session.command("MLSD " + path, "1xx")
            except aioftp.StatusCodeError as e:
                if not e.received_codes[-1].matches("50x") or e.received_codes[-1] == "501":
                    raise
                writer.close()
                session.mlsd = mlsd = False
                reader, writer = await session.open_data(conn_type)
        if not mlsd:
            await session.command("LIST " + path, "1xx")
    except BaseException:
        writer.close()
        raise
    return reader, writer, mlsd


# --- pure helpers -------------------------------------------------------------------------------

_ENCODED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


def content_type(name: str, *, ascii_mode: bool = False) -> str:
    """The Content-Type for a file name. "x.tar.gz" is application/gzip, never Content-Encoding:
    gzip, which would make clients unpack a download that should arrive as stored."""
    # The "x/" prefix stops mimetypes from reading "a:b.txt" as a URL with scheme "a".
    ctype, encoding = mimetypes.guess_type("x/" + visible(name), strict=False)
    if encoding:
        return _ENCODED_TYPES.get(encoding, "application/octet-stream")
    if ctype:
        return ctype
    return "text/plain" if ascii_mode else "application/octet-stream"


def parse_mdtm(text: str) -> float | None:
    """"20240131235959" or "20240131235959.123" (UTC, RFC 3659) -> POSIX seconds."""
    m = re.fullmatch(r"\s*(\d{14})(?:\.(\d{1,9}))?\s*", text)
    if not m:
        return None
    try:
        when = datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return when.timestamp() + (float("0." + m.group(2)) if m.group(2) else 0.0)


def status_for_reply(code: str, text: str) -> int:
    """The HTTP status for a refused FTP file or directory command."""
    if code == "530" or re.search(r"permission|denied|not allowed|forbidden", text, re.I):
        return 403
    if code in ("550", "450", "553", "551"):
        return 404
    return 502


def reply_line(e: aioftp.StatusCodeError) -> str:
    info = e.info if isinstance(e.info, list) else [e.info]
    return f"{e.received_codes[-1]} {' '.join(str(i).strip() for i in info)}".strip()


def _unsupported(code: str) -> bool:
    return code in ("500", "502", "504")


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def _error_for(code: str, lines: list[str]) -> FtpResponse:
    text = " ".join(line.strip() for line in lines)
    status = status_for_reply(code, text)
    what = {403: "access denied", 404: "not found"}.get(status, "FTP error")
    return _text(status, f"{what}: the FTP server said: {code} {text}\n")


def _reply_error(e: aioftp.StatusCodeError) -> FtpResponse:
    code = e.received_codes[-1]
    info = e.info if isinstance(e.info, list) else [e.info]
    return _error_for(code, [str(i) for i in info])


def _login_refused(target: FtpTarget, creds: Credentials, e: aioftp.StatusCodeError) -> FtpResponse:
    line = reply_line(e)
    if not e.received_codes[-1].startswith("53"):
        return _text(502, f"the FTP server {target.origin} refused the session: {line}\n")
    who = "anonymous login" if creds.source == "anonymous" else f"login as {visible(creds.user)!r}"
    message = f"{who} refused by {target.origin}: {line}\n"
    if creds.prompt_helps:
        realm = target.origin.replace("\\", "\\\\").replace('"', '\\"')
        return _text(401, message, [("WWW-Authenticate", f'Basic realm="{realm}"')])
    return _text(403, message)


def _bad_reply(where: str, e: BadReply) -> FtpResponse:
    return _text(502, f"bad reply from the FTP server {where}: {e}\n")


def _os_reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _content(status: int, body: bytes, ctype: str, extra: list[tuple[str, str]] | None = None) -> FtpResponse:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), *(extra or [])]
    return FtpResponse(status, headers, content=body)


def _text(status: int, message: str, extra: list[tuple[str, str]] | None = None) -> FtpResponse:
    return _content(status, message.encode("utf-8", "replace"), "text/plain; charset=utf-8", extra)
