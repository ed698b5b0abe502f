"""gopher:// URLs (RFC 4266) and menus (RFC 1436): splitting a URL into item type, selector and
search string, parsing a menu, rendering it as an HTML page whose links lead back through the
proxy, and the media type of each item type.

Pure functions (bytes and strings in, text out). Selectors are bytes, exactly as the server sent
them: hrefs percent-encode every byte but unreserved ones, so a link always asks the server for
the same selector, whatever it contains; the visible text is escaped HTML.
"""

from __future__ import annotations

import html
import mimetypes
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, unquote_to_bytes

DEFAULT_PORT = 70
MENU_TYPES = frozenset("17")  # answered with a menu (7: a search returns one)
TEXT_TYPES = frozenset("0")
# RFC 1436 section 3.8 and the common extensions (h, i, s, d, p, I, g).
_TYPE_LABELS = {
    "0": "TXT", "1": "DIR", "2": "CSO", "3": "ERR", "4": "HQX", "5": "DOS", "6": "UUE", "7": "ASK",
    "8": "TEL", "9": "BIN", "+": "MIR", "T": "TEL", "g": "GIF", "I": "IMG", "h": "HTM", "s": "SND",
    "d": "DOC", "p": "PNG", ";": "VID", "c": "CAL", "M": "MIM",
}
_TYPE_MEDIA = {
    "0": "text/plain", "1": "text/html", "7": "text/html", "4": "application/mac-binhex40",
    "6": "text/x-uuencode", "g": "image/gif", "h": "text/html", "p": "image/png", "M": "message/rfc822",
}
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_\-.]{0,251}[A-Za-z0-9_.])?|[0-9A-Fa-f:.]+)$")


class BadGopherUrl(ValueError):
    """The URL cannot be turned into a gopher request; the message says why (a 400 body)."""


@dataclass(frozen=True)
class GopherUrl:
    item_type: str
    selector: bytes
    search: bytes | None = None  # type 7: the words after %09 or ?

    def request(self) -> bytes:
        """What is sent to the server (RFC 1436 section 2; a search adds TAB and the words)."""
        if self.search is None:
            return self.selector + b"\r\n"
        return self.selector + b"\t" + self.search + b"\r\n"


def parse_path(path: str) -> GopherUrl:
    """The path of gopher://host[:port]/<type><selector>[%09<search>] (RFC 4266 section 2.1).
    An empty path is the server's root menu. For type 7 a query (`?words`, or `?search=words` from
    the search form rendered here) is the search string too."""
    rest = path[1:] if path.startswith("/") else path
    if not rest:
        return GopherUrl("1", b"")
    if rest.startswith("%") and len(rest) >= 3:  # a type character that had to be escaped
        item_type, rest = unquote_to_bytes(rest[:3]).decode("latin-1"), rest[3:]
    else:
        item_type, rest = rest[0], rest[1:]
    query: str | None = None
    if item_type == "7" and "?" in rest:
        rest, query = rest.split("?", 1)
    raw = unquote_to_bytes(rest)
    search: bytes | None = None
    if b"\t" in raw:
        raw, search = raw.split(b"\t", 1)
        search = search.split(b"\t", 1)[0]  # a third field is a Gopher+ string: not used here
    if query is not None and search is None:
        words = query[7:] if query.startswith("search=") else query
        search = unquote_plus(words).encode("utf-8", "surrogateescape")
    for part in (raw, search or b""):
        if b"\r" in part or b"\n" in part:
            raise BadGopherUrl("a gopher selector or search cannot contain CR or LF")
    return GopherUrl(item_type, raw, search)


@dataclass(frozen=True)
class Item:
    """One menu line: type, display string, selector, host, port (RFC 1436 section 3.5)."""

    item_type: str
    display: str
    selector: bytes
    host: str
    port: int


def parse_menu(data: bytes) -> list[Item]:
    """Menu lines up to the lone "." (or the end); lines without tabs are read as info text, as
    the many servers that send them mean."""
    items = []
    for raw in data.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line == b".":
            break
        if not line:
            continue
        fields = line[1:].split(b"\t")
        kind = chr(line[0]) if line[0] < 128 else "?"
        display = fields[0].decode("utf-8", "replace")
        if len(fields) < 3:
            items.append(Item("i", line.decode("utf-8", "replace"), b"", "", 0))
            continue
        port_text = fields[3].strip() if len(fields) > 3 else b""
        port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else DEFAULT_PORT
        items.append(Item(kind, display, fields[1], fields[2].decode("ascii", "replace").strip(), port))
    return items


def error_text(data: bytes) -> str | None:
    """The message when a reply is a gopher error (RFC 1436: item type 3) and nothing else, which
    servers send for a selector they do not have; None for any other reply."""
    items = parse_menu(data)
    errors = [i.display for i in items if i.item_type == "3"]
    if errors and all(i.item_type in "3i" for i in items):
        return " ".join(e.strip() for e in errors if e.strip()) or "error"
    return None


def item_url(item: Item) -> str | None:
    """Where a menu item's link points: gopher://... (through this proxy again), the URL of an
    `h` item whose selector is "URL:...", telnet:// for 8/T; None for text-only lines."""
    if item.item_type in "i3" or not _HOST_RE.match(item.host):
        return None
    host = f"[{item.host}]" if ":" in item.host else item.host
    authority = host if item.port == DEFAULT_PORT else f"{host}:{item.port}"
    if item.item_type in "8T":
        return f"telnet://{authority}/"
    if item.item_type == "h" and item.selector.startswith(b"URL:"):
        target = item.selector[4:].decode("utf-8", "replace")
        if re.match(r"^(https?|ftp|gopher)://", target, re.IGNORECASE):
            return target
    return f"gopher://{authority}/{quote(item.item_type, safe='+;')}{quote(item.selector, safe='/')}"


def media_type(item_type: str, selector: bytes) -> str:
    """The Content-Type of an item: from its type, else from the selector's extension (9, I, s
    and d name a family, not a format), else octet-stream."""
    if item_type in _TYPE_MEDIA:
        return _TYPE_MEDIA[item_type]
    guessed, _ = mimetypes.guess_type(selector.decode("utf-8", "replace").rsplit("/", 1)[-1])
    return guessed or "application/octet-stream"


_STYLE = "body{font-family:sans-serif;margin:1.5em}pre{line-height:1.35}span.t{color:#777}"


def _page(title: str, body: str) -> str:
    t = html.escape(title)
    return ("<!DOCTYPE html>\n"
            f'<html><head><meta charset="utf-8"><title>{t}</title><style>{_STYLE}</style></head>\n'
            f"<body><h1>{t}</h1>\n{body}\n</body></html>\n")


def render_menu(title: str, items: list[Item]) -> str:
    """A menu as HTML: one line per item, a link for each one that leads somewhere."""
    lines = []
    for item in items:
        label = _TYPE_LABELS.get(item.item_type, "???") if item.item_type != "i" else "   "
        text = html.escape(item.display)
        url = item_url(item)
        if url is not None:
            text = f'<a href="{html.escape(url)}">{text}</a>'
        lines.append(f'<span class="t">{label}</span> {text}')
    return _page(title, "<pre>\n" + "\n".join(lines) + "\n</pre>")


def render_search_form(title: str) -> str:
    """A type 7 URL without search words: a form that asks for them (submits ?search=words)."""
    return _page(title, '<form method="get"><input name="search" size="40" autofocus> '
                        '<input type="submit" value="Search"></form>')
