"""FTP directory listings: parsing MLSD and LIST lines, rendering HTML or a plain name list.

Pure functions (entries in, text out) so every format quirk is tested without a server.
Names are str decoded with surrogateescape (see ftpsession.CODEC): hrefs percent-encode the
server's exact bytes, so a link always leads back to the same file, while the visible text
replaces undecodable bytes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "file", "dir" or "link" (a symlink whose target kind is unknown)
    size: int | None = None
    modified: datetime | None = None  # UTC


def parse_mlsd_line(line: str) -> Entry | None:
    """One MLSD line (RFC 3659 section 7): "fact=value;fact=value; name". None for the "." and ".."
    entries and for lines that are not facts."""
    facts_text, sep, name = line.rstrip("\r\n").partition(" ")
    if not sep or not name or "=" not in facts_text:
        return None
    facts = {}
    for fact in facts_text.split(";"):
        key, eq, value = fact.partition("=")
        if eq:
            facts[key.lower()] = value
    kind_fact = facts.get("type", "").lower()
    if kind_fact in ("cdir", "pdir") or name in (".", ".."):
        return None
    if kind_fact == "dir":
        kind = "dir"
    elif kind_fact.startswith("os.unix=slink") or kind_fact.startswith("os.unix=symlink"):
        kind = "link"
    else:
        kind = "file"
    size = facts.get("size") or facts.get("sizd")
    return Entry(
        name=name,
        kind=kind,
        size=int(size) if size and size.isdigit() and kind != "dir" else None,
        modified=_mlsd_time(facts.get("modify", "")),
    )


def _mlsd_time(value: str) -> datetime | None:
    m = re.fullmatch(r"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(?:\.\d+)?", value)
    if not m:
        return None
    try:
        return datetime(*map(int, m.groups()), tzinfo=UTC)
    except ValueError:
        return None


_MONTHS = {m: i for i, m in enumerate(("jan feb mar apr may jun jul aug sep oct nov dec").split(), 1)}
_UNIX = re.compile(
    r"^(?P<mode>[-dlbcps])[-rwxsStTL]{9}\S*\s+\d+\s+(?:\S+\s+){1,2}?(?P<size>\d+)\s+"
    r"(?P<mon>[A-Za-z]{3})\s+(?P<day>\d{1,2})\s+(?P<tail>\d{1,2}:\d\d|\d{4})\s(?P<name>.+)$"
)
_DOS = re.compile(
    r"^(?P<mon>\d\d)-(?P<day>\d\d)-(?P<year>\d\d(?:\d\d)?)\s+(?P<hour>\d\d?):(?P<min>\d\d)\s*"
    r"(?P<ampm>[AaPp][Mm])?\s+(?P<size><DIR>|\d+)\s+(?P<name>.+)$"
)


def parse_list_line(line: str, now: datetime) -> Entry | None:
    """One LIST line, Unix `ls -l` style or DOS/IIS style. `now` dates the Unix lines that omit the
    year (those are within the last six months). None for "total" lines and anything unparsable."""
    line = line.rstrip("\r\n")
    m = _UNIX.match(line)
    if m:
        name = m.group("name")
        mode = m.group("mode")
        if mode == "l":
            name = name.split(" -> ", 1)[0]
        if name in (".", ".."):
            return None
        kind = {"d": "dir", "l": "link"}.get(mode, "file")
        return Entry(name, kind, int(m.group("size")) if kind == "file" else None, _unix_time(m, now))
    m = _DOS.match(line)
    if m:
        name = m.group("name")
        if name in (".", ".."):
            return None
        is_dir = m.group("size") == "<DIR>"
        return Entry(name, "dir" if is_dir else "file", None if is_dir else int(m.group("size")), _dos_time(m))
    return None


def _unix_time(m: re.Match[str], now: datetime) -> datetime | None:
    month = _MONTHS.get(m.group("mon").lower())
    if month is None:
        return None
    day, tail = int(m.group("day")), m.group("tail")
    try:
        if ":" in tail:
            hour, minute = map(int, tail.split(":"))
            when = datetime(now.year, month, day, hour, minute, tzinfo=UTC)
            # No year means "within the last six months": a date ahead of now is last year's.
            if when > now + timedelta(days=1):
                when = when.replace(year=now.year - 1)
            return when
        return datetime(int(tail), month, day, tzinfo=UTC)
    except ValueError:
        return None


def _dos_time(m: re.Match[str]) -> datetime | None:
    year = int(m.group("year"))
    if year < 100:
        year += 2000 if year < 70 else 1900
    hour = int(m.group("hour"))
    ampm = (m.group("ampm") or "").lower()
    if ampm == "pm" and hour < 12:
        hour += 12
    elif ampm == "am" and hour == 12:
        hour = 0
    try:
        return datetime(year, int(m.group("mon")), int(m.group("day")), hour, int(m.group("min")), tzinfo=UTC)
    except ValueError:
        return None


def visible(name: str) -> str:
    """A name as a person should see it: the server's bytes read as UTF-8, bad bytes replaced."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def href(entry: Entry) -> str:
    """A relative link to an entry: every byte but unreserved ones percent-encoded, so names
    containing ';', ':', '#', '?' or spaces cannot be misread as URL syntax."""
    link = quote(entry.name.encode("utf-8", "surrogateescape"), safe="")
    return link + "/" if entry.kind == "dir" else link


def format_size(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def sorted_entries(entries: Iterable[Entry]) -> list[Entry]:
    """Directories first, then by name: stable and what people expect from an index page."""
    return sorted(entries, key=lambda e: (e.kind != "dir", visible(e.name).lower(), e.name))


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
    "th,td{padding:.15em 1.2em .15em 0;text-align:left}td.s{text-align:right}"
)


def _page_head(title: str, parent: bool) -> str:
    t = html.escape(title)
    head = (
        "<!DOCTYPE html>\n"
        f'<html><head><meta charset="utf-8"><title>Index of {t}</title><style>{_STYLE}</style></head>\n'
        f"<body><h1>Index of {t}</h1>\n"
        "<table><thead><tr><th>Name</th><th>Size</th><th>Last modified (UTC)</th></tr></thead><tbody>\n"
    )
    if parent:
        head += '<tr><td><a href="../">Parent directory</a></td><td class="s"></td><td></td></tr>\n'
    return head


_PAGE_TAIL = "</tbody></table></body></html>\n"


def _row(e: Entry) -> str:
    label = visible(e.name) + ("/" if e.kind == "dir" else "")
    when = e.modified.strftime("%Y-%m-%d %H:%M") if e.modified else ""
    size = "" if e.kind == "dir" else format_size(e.size)
    title_attr = f' title="{e.size} bytes"' if e.size is not None else ""
    return (f'<tr><td><a href="{html.escape(href(e))}">{html.escape(label)}</a></td>'
            f'<td class="s"{title_attr}>{html.escape(size)}</td><td>{when}</td></tr>\n')


def _name_line(e: Entry) -> str:
    return visible(e.name) + "\n"


def render_html(title: str, entries: Iterable[Entry], *, parent: bool) -> str:
    """An index page. `title` is what the heading shows (the URL without credentials, decoded);
    `parent` adds the "../" link (every directory but the server's root)."""
    return _page_head(title, parent) + "".join(_row(e) for e in sorted_entries(entries)) + _PAGE_TAIL


def render_names(entries: Iterable[Entry]) -> str:
    """The ;type=d answer: one name per line, as the server spelled it (bad bytes replaced)."""
    return "".join(_name_line(e) for e in sorted_entries(entries))


SORT_LIMIT = 5000  # entries held to sort a listing; a larger one is shown in the server's order
LINE_LIMIT = 16 * 1024  # a longer listing line is no entry anyone can use: it is skipped


class ListingRenderer:
    """A listing rendered as its bytes arrive, in bounded memory (no whole listing is ever held).

    `feed(data)` takes raw data-connection bytes and returns the text ready to send (often "");
    `finish()` returns the rest. Up to SORT_LIMIT entries are held and then sent sorted, as
    `render_html` / `render_names` would; past that, entries go out in the server's order as they
    are parsed. Names are decoded with `codec` (the session's, see ftppool.CODEC).
    """

    def __init__(self, title: str, *, parent: bool, mlsd: bool, names_only: bool, now: datetime,
                 codec: str) -> None:
        self.head = "" if names_only else _page_head(title, parent)
        self.tail = "" if names_only else _PAGE_TAIL
        self.row = _name_line if names_only else _row
        self.mlsd = mlsd
        self.now = now
        self.codec = codec
        self.held: list[Entry] | None = []  # None once streaming in server order
        self.partial = b""
        self.skipping = False  # inside an over-long line, dropping bytes until its end

    def _parse(self, raw: bytes) -> Entry | None:
        line = raw.decode(self.codec)
        return parse_mlsd_line(line) if self.mlsd else parse_list_line(line, self.now)

    def _lines(self, data: bytes) -> list[bytes]:
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if self.skipping and lines:
            lines.pop(0)
            self.skipping = False
        if len(self.partial) > LINE_LIMIT:
            self.partial, self.skipping = b"", True
        return [line for line in lines if len(line) <= LINE_LIMIT]

    def _emit(self, entries: Iterable[Entry]) -> str:
        if self.held is None:
            return "".join(self.row(e) for e in entries)
        self.held.extend(entries)
        if len(self.held) <= SORT_LIMIT:
            return ""
        held, self.held = self.held, None
        return self.head + "".join(self.row(e) for e in held)

    def feed(self, data: bytes) -> str:
        entries = [e for e in map(self._parse, self._lines(data)) if e is not None]
        return self._emit(entries)

    def finish(self) -> str:
        last = [] if self.skipping or not self.partial else [self._parse(self.partial)]
        self.partial = b""
        out = self._emit(e for e in last if e is not None)
        if self.held is not None:
            held, self.held = self.held, None
            out += self.head + "".join(self.row(e) for e in sorted_entries(held))
        return out + self.tail
