"""ftp:// URLs and the credentials that go with them: pure functions, no sockets.

URL grammar (RFC 1738, section 3.2): ftp://[user[:password]@]host[:port]/path[;type=a|i|d].
The path is relative to the login directory, as RFC 1738 says (each segment is one CWD); a first
segment that decodes to something starting with "/" (written %2F) makes it absolute. Segments are
percent-decoded as UTF-8 with surrogateescape, so a URL carrying Latin-1 bytes reaches the server as
those same bytes (the FTP session encodes commands the same way, see ftpsession.CODEC).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote

from cache.httpdate import parse_http_date

DEFAULT_PORT = 21


class FtpUrlError(ValueError):
    """The URL cannot be served; the message is shown to the HTTP client (400)."""


@dataclass(frozen=True)
class FtpTarget:
    host: str  # lower-cased, IPv6 without brackets
    port: int
    user: str | None  # from the URL, decoded
    password: str | None
    segments: tuple[str, ...]  # decoded path segments, without a trailing empty one
    is_dir: bool  # the URL path ends in "/" (or is empty)
    type: str  # "i" (binary), "a" (ascii) or "d" (names only)
    authority: str  # as written in the URL, for building Location
    raw_path: str  # as written, without ";type=", for building Location

    @property
    def name(self) -> str:
        """The last path segment (the file name), "" for the login directory."""
        return self.segments[-1] if self.segments else ""

    @property
    def origin(self) -> str:
        """ftp://host[:port], without credentials: for realms and listing titles."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ftp://{host}" if self.port == DEFAULT_PORT else f"ftp://{host}:{self.port}"


def parse_ftp_url(url: str) -> FtpTarget:
    if url[:6].lower() != "ftp://":
        raise FtpUrlError("not an ftp:// URL")
    rest = url[6:].split("#", 1)[0]
    slash = rest.find("/")
    authority, raw_path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if any(c in url for c in "\r\n\0"):
        raise FtpUrlError("the URL contains control characters")

    userinfo, at, hostport = authority.rpartition("@")
    user = password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        user = unquote(name, errors="surrogateescape")
        password = unquote(secret, errors="surrogateescape") if colon else None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d*))?|([^:\[\]]+)(?::(\d*))?", hostport)
    if not m:
        raise FtpUrlError(f"bad host in ftp URL: {hostport!r}")
    host = (m.group(1) or m.group(3)).lower()
    port_text = m.group(2) or m.group(4)
    port = int(port_text) if port_text else DEFAULT_PORT
    if not 0 < port < 65536:
        raise FtpUrlError(f"port {port} is out of range")

    ftp_type = "i"
    m = re.search(r";type=([^/;]*)$", raw_path, re.IGNORECASE)
    if m:
        ftp_type = m.group(1).lower()
        if ftp_type not in ("a", "i", "d"):
            raise FtpUrlError(f"unknown ;type={m.group(1)} (expected a, i or d)")
        raw_path = raw_path[: m.start()] or "/"
    parts = raw_path[1:].split("/")
    is_dir = parts[-1] == ""
    if is_dir:
        parts.pop()
    segments = tuple(unquote(p, errors="surrogateescape") for p in parts)
    if any(c in s for s in segments for c in "\r\n\0"):
        raise FtpUrlError("the path contains control characters")
    return FtpTarget(host, port, user, password, segments, is_dir, ftp_type, authority, raw_path)


def server_path(target: FtpTarget, home: str) -> str:
    """The absolute path to send in FTP commands, given the login directory from PWD."""
    joined = "/".join(target.segments)
    if joined.startswith("/"):
        return joined.rstrip("/") or "/"
    base = home.rstrip("/")
    return f"{base}/{joined}" if joined else (base or "/")


def directory_location(target: FtpTarget) -> str:
    """Where a directory requested without its trailing slash lives (the 301 Location)."""
    return f"ftp://{target.authority}{target.raw_path}/"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str
    source: str  # "anonymous", "url" or "header"

    @property
    def prompt_helps(self) -> bool:
        """Would a browser prompt fix a refused login? Not when the URL itself carries a password:
        the URL wins over the Authorization header, so prompting would only loop."""
        return self.source != "url"


def credentials(
    target: FtpTarget, headers: list[tuple[str, str]], anonymous_user: str, anonymous_password: str
) -> Credentials:
    """The URL's credentials first, then `Authorization: Basic`, then anonymous. A URL naming only
    a user takes the password from the header (what a browser sends after our 401 prompt).
    Raises FtpUrlError when the chosen user or password holds CR, LF or NUL: they would end the
    USER/PASS command line early (RFC 959 5.3 "<CRLF>" ends a command) and smuggle another."""
    creds = _choose(target, _basic_auth(headers), anonymous_user, anonymous_password)
    if any(c in text for text in (creds.user, creds.password) for c in "\r\n\0"):
        raise FtpUrlError("the FTP user name or password contains control characters (CR, LF or NUL)")
    return creds


def _choose(target: FtpTarget, basic: tuple[str, str] | None, anonymous_user: str,
            anonymous_password: str) -> Credentials:
    if target.user is not None:
        if target.password is not None:
            return Credentials(target.user, target.password, "url")
        if basic is not None:
            return Credentials(target.user, basic[1], "header")
        return Credentials(target.user, "", "header")
    if basic is not None:
        return Credentials(basic[0], basic[1], "header")
    return Credentials(anonymous_user, anonymous_password, "anonymous")


def _basic_auth(headers: list[tuple[str, str]]) -> tuple[str, str] | None:
    for name, value in headers:
        if name.lower() != "authorization":
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            raw = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        user, colon, password = text.partition(":")
        return (user, password) if colon else None
    return None


def if_modified_since(headers: list[tuple[str, str]]) -> float | None:
    """The If-Modified-Since date as a POSIX timestamp, None when absent or unparsable."""
    for name, value in headers:
        if name.lower() == "if-modified-since":
            return parse_http_date(value)  # not an HTTP-date: ignored (RFC 9110 13.1.3)
    return None
