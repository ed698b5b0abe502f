"""Shared builders for the cache rule tests (no tests here)."""

from __future__ import annotations

import os

from cache.httpdate import format_http_date
from cache.model import Policy, Request, StoredResponse
from cache.vary import secondary_key

T0 = 1_700_000_000.0  # when the stored responses arrived
POLICY = Policy()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Clock:
    """A clock the tests set by hand: pass it as a store's `clock=`."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def http_date(ts: float) -> str:
    return format_http_date(ts)


def stored(headers, status=200, at=T0, body_size=100, request_headers=(), delay=0.0, date=True):
    headers = list(headers)
    if date and not any(k.lower() == "date" for k, _ in headers):
        headers.insert(0, ("Date", http_date(at)))
    return StoredResponse(
        status, "OK", headers, at - delay, at, secondary_key(headers, list(request_headers)), body_size
    )


def req(*headers, method="GET", url="http://example.com/a"):
    return Request(method, url, list(headers))
