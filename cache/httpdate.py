"""HTTP dates (RFC 9110 5.6.7): IMF-fixdate, and the obsolete RFC 850 and asctime forms, nothing
else. A value in none of the three forms is not a date (for Expires that means "already expired",
RFC 9111 5.3). As RFC 9111 4.2 asks of a cache, names are matched case-insensitively; everything
else is as the grammar says: one space between parts, a comma after the day name (not in asctime),
two-digit hours, minutes and seconds with colons, a four-digit year (two in RFC 850), "GMT"."""

from __future__ import annotations

import calendar
import re
import time
from email.utils import formatdate

_DAYS = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
_DAYS_LONG = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTH = "|".join(_MONTHS)
_TIME = r"(\d\d):(\d\d):(\d\d)"
# IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
_IMF = re.compile(rf"(?:{_DAYS}), (\d\d) ({_MONTH}) (\d{{4}}) {_TIME} GMT", re.IGNORECASE | re.ASCII)
# rfc850-date: Sunday, 06-Nov-94 08:49:37 GMT
_RFC850 = re.compile(rf"(?:{_DAYS_LONG}), (\d\d)-({_MONTH})-(\d\d) {_TIME} GMT", re.IGNORECASE | re.ASCII)
# asctime-date: Sun Nov  6 08:49:37 1994 (day: two digits, or a space and one digit)
_ASCTIME = re.compile(rf"(?:{_DAYS}) ({_MONTH}) (\d\d| \d) {_TIME} (\d{{4}})", re.IGNORECASE | re.ASCII)


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """Seconds since the epoch, or None when the value is not an HTTP-date. `now` (default: the
    clock) only places an RFC 850 two-digit year in its century: never more than 50 years ahead."""
    if value is None:
        return None
    value = value.strip(" \t")
    if m := _IMF.fullmatch(value):
        day, month, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(value):
        day, month, yy, hh, mm, ss = m.groups()
        year = str(_century(int(yy), time.time() if now is None else now))
    elif m := _ASCTIME.fullmatch(value):
        month, day, hh, mm, ss, year = m.groups()
    else:
        return None
    fields = (int(year), _MONTHS.index(month.lower()) + 1, int(day), int(hh), int(mm), int(ss))
    y, mo, d, h, mi, s = fields
    if not (y >= 1 and 1 <= d <= calendar.monthrange(y, mo)[1] and h <= 23 and mi <= 59 and s <= 60):
        return None  # 60: a leap second (RFC 9110 5.6.7)
    return float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))


def _century(yy: int, now: float) -> int:
    """RFC 9110 5.6.7: a two-digit year that would be more than 50 years in the future is the most
    recent past year with those last two digits."""
    this_year = time.gmtime(now).tm_year
    year = this_year - this_year % 100 + yy
    return year - 100 if year > this_year + 50 else year


def format_http_date(ts: float) -> str:
    """IMF-fixdate for `ts`."""
    return formatdate(ts, usegmt=True)
