"""HTTP message helpers shared by the front end and the fetchers: target parsing, hop-by-hop
stripping (RFC 9110 7.6.1), Via, and the short plain-text error responses.

Headers travel as `list[tuple[str, str]]` (names as received, values latin-1 decoded) so the cache
can read them without knowing about sockets, and so duplicates and order survive.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from http import HTTPStatus

from cache.model import get_all
from cache.model import get_one as get_header

Headers = list[tuple[str, str]]
__all__ = ["get_header"]  # re-exported: the front end reads fields with the cache's helpers

# Always hop-by-hop, whatever Connection says. Proxy-Authorization is for this proxy: it is
# consumed (or ignored) here and never passed to an origin.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)


def tokens(headers: Headers, name: str) -> list[str]:
    """Comma-separated list values of every `name` line, lower-cased and stripped."""
    out = []
    for value in get_all(headers, name):
        out.extend(t.strip().lower() for t in value.split(",") if t.strip())
    return out


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Drop the fixed hop-by-hop set and every header Connection names."""
    named = set(tokens(headers, "connection"))
    return [(k, v) for k, v in headers if (lk := k.lower()) not in HOP_BY_HOP and lk not in named]


@dataclass(slots=True)
class Target:
    """An absolute-form request target, split without re-quoting anything."""

    scheme: str
    host: str  # lower-cased; IPv6 without brackets
    port: int
    authority: str  # host[:port] as the client wrote it (minus userinfo), for the Host header
    path: str  # origin-form: path + query exactly as received, "/" when empty
    userinfo: str = ""
    connect: str | None = None  # "ip:port" to dial instead of the authority (transparent mode)

    @property
    def origin_url(self) -> str:
        """The URL as named (the cache key's source), path bytes untouched."""
        return f"{self.scheme}://{self.authority}{self.path}"

    @property
    def fetch_url(self) -> str:
        """The URL to connect to: the authority, or the original destination when intercepted."""
        return f"{self.scheme}://{self.connect or self.authority}{self.path}"


DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21, "gopher": 70}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_HOST_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9\-._~%!$&'()*+,;=]+))(?::(\d*))?$")


class BadTarget(ValueError):
    """The request target cannot be used; the message says why, for the 400 body."""


_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?$")


def check_host(host: str) -> str:
    """`host` (lower-cased, IPv6 without brackets) if it is a usable name or address, else BadTarget:
    a malformed name must be refused here, not handed to a resolver or a client library."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadTarget(f"bad IPv6 address in URL: {host[:100]!r}") from None
        return host
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise BadTarget(f"bad IPv4 address in URL: {host[:100]!r}") from None
        return host
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_LABEL_RE.match(label) for label in name.split(".")):
        raise BadTarget(f"bad host name in URL: {host[:100]!r}")
    return host


def parse_absolute(url: str) -> Target:
    """Split `scheme://[userinfo@]host[:port]/path?query` (fragments are not sent by clients)."""
    m = _SCHEME_RE.match(url)
    if not m:
        raise BadTarget(f"not an absolute URL: {url[:200]!r}")
    scheme = m.group(1).lower()
    rest = url[m.end() :]
    cut = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if i != -1 and i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    if "#" in path:
        path = path[: path.index("#")]
    if not path.startswith("/"):
        path = "/" + path
    userinfo = ""
    if "@" in authority:
        userinfo, authority = authority.rsplit("@", 1)
    hm = _HOST_RE.match(authority)
    if not hm or not authority:
        raise BadTarget(f"bad host in URL: {authority[:200]!r}")
    host = check_host((hm.group(1) or hm.group(2)).lower())
    port_text = hm.group(3)
    if port_text:
        port = int(port_text)
        if not 0 < port < 65536:
            raise BadTarget(f"bad port in URL: {port_text}")
    else:
        port = DEFAULT_PORTS.get(scheme, 0)
        authority = authority.rstrip(":")
    return Target(scheme, host, port, authority, path, userinfo)


def parse_authority(value: str, default_port: int) -> tuple[str, int]:
    """Split "host:port" (CONNECT targets, Host headers); brackets allowed for IPv6."""
    hm = _HOST_RE.match(value.strip())
    if not hm or not value.strip():
        raise BadTarget(f"bad host:port {value[:200]!r}")
    host = check_host((hm.group(1) or hm.group(2)).lower())
    port = int(hm.group(3)) if hm.group(3) else default_port
    if not 0 < port < 65536:
        raise BadTarget(f"bad port in {value[:200]!r}")
    return host, port


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def serialize_head(status: int, reason: str, headers: Headers, version: str = "1.1") -> bytes:
    lines = [f"HTTP/{version} {status} {reason}\r\n"]
    lines.extend(f"{k}: {v}\r\n" for k, v in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def error_body(status: int, message: str) -> bytes:
    """A short, plain body a person can read in a browser or in curl's output."""
    return f"{status} {reason_phrase(status)}\n\n{message}\n".encode("utf-8", "replace")


def has_via_loop(headers: Headers, name: str) -> bool:
    """True when one of the Via entries was added by a proxy called `name` (that is: us)."""
    name = name.lower()
    for entry in tokens(headers, "via"):
        parts = entry.split()
        if len(parts) >= 2 and parts[1] == name:
            return True
    return False
