"""HTTP dates (RFC 9110 5.6.7): IMF-fixdate, and the obsolete RFC 850 and asctime forms."""

from __future__ import annotations

import calendar
from email.utils import formatdate, parsedate_tz


def parse_http_date(value: str | None) -> float | None:
    """Seconds since the epoch, or None when the value is not a date."""
    if value is None:
        return None
    value = value.strip()
    if not value or not value[0].isalpha():
        # parsedate_tz is lenient with bare numbers ("0"); HTTP dates always start with a day name.
        return None
    parts = parsedate_tz(value)
    if parts is None:
        return None
    try:
        ts = calendar.timegm(parts[:6] + (0, 0, 0))
    except (OverflowError, ValueError):
        return None
    return float(ts - (parts[9] or 0))


def format_http_date(ts: float) -> str:
    """IMF-fixdate for `ts`."""
    return formatdate(ts, usegmt=True)
