"""Range requests answered from a complete stored response (RFC 9110 14).

Only a single byte range is answered from the cache; several ranges go to the origin (building
multipart/byteranges is not worth it for a cache). An invalid Range field is ignored (14.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from cache.httpdate import parse_http_date
from cache.model import StoredResponse, get_one


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


IGNORE = "ignore"  # no usable Range: serve the whole representation
MULTIPLE = "multiple"  # several ranges: forward to the origin
UNSATISFIABLE = "unsatisfiable"  # 416


def parse_range(value: str | None, size: int) -> ByteRange | str:
    """The range to serve from a body of `size` bytes, or IGNORE, MULTIPLE or UNSATISFIABLE."""
    if value is None:
        return IGNORE
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return IGNORE
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        return IGNORE
    parsed: list[tuple[str, str]] = []
    for p in parts:
        first, dash, last = p.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
            return IGNORE
        if first and last and int(last) < int(first):
            return IGNORE
        parsed.append((first, last))
    if len(parsed) > 1:
        return MULTIPLE
    first, last = parsed[0]
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    if start >= size:
        return UNSATISFIABLE
    end = size - 1 if not last else min(int(last), size - 1)
    return ByteRange(start, end)


def if_range_matches(value: str, stored: StoredResponse) -> bool:
    """If-Range (13.1.5): a strong ETag compared strongly, or a date equal to a strong
    Last-Modified (one at least a second older than Date)."""
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        etag = stored.etag
        return etag is not None and not value.startswith("W/") and not etag.startswith("W/") and etag.strip() == value
    when = parse_http_date(value)
    lm = parse_http_date(stored.last_modified)
    date = parse_http_date(get_one(stored.headers, "date"))
    if when is None or lm is None or date is None:
        return False
    return when == lm and date - lm >= 1
