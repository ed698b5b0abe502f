"""Collapsed forwarding within one process: concurrent misses for a URL wait for the one fetch in
flight instead of each going to the origin.

Only a request whose answer can be shared leads a flight (`may_lead`): one that carries a body
could stall on its own client before the origin ever answers, and one the origin will answer with
206, 304 or under no-store leaves its waiters nothing to use. The leader ends its flight as soon as
its answer turns out not storable, so waiters go to the origin themselves at once, not after the
relay or `collapse_wait`; likewise when its client stops reading mid-body (the fill goes on at that
client's pace, the waiters need not).
"""

from __future__ import annotations

import asyncio

from cache import cachecontrol
from cache.model import Request, get_one

# A miss is forwarded with these fields as the client sent them (only a revalidation swaps them for
# the cache's own validators): the answer is then expected to be a 206 or a 304, never stored.
_PARTIAL_OR_CONDITIONAL = ("range", "if-range", "if-none-match", "if-modified-since", "if-match",
                           "if-unmodified-since")


def has_body(request: Request) -> bool:
    """RFC 9112 6: a request has content when it carries Transfer-Encoding or a Content-Length
    (other than 0, which is no content to wait for)."""
    if get_one(request.headers, "transfer-encoding") is not None:
        return True
    length = get_one(request.headers, "content-length")
    return length is not None and length.strip() != "0"


def may_lead(request: Request) -> bool:
    """Whether `request`, a miss, may lead the collapsed fetch of its URL (others then wait for
    it): a GET without content whose answer may be stored for everyone."""
    if request.method.upper() != "GET" or has_body(request):
        return False
    if any(get_one(request.headers, name) is not None for name in _PARTIAL_OR_CONDITIONAL):
        return False
    return "no-store" not in cachecontrol.request_directives(request.headers)


class Flight:
    """One fetch in progress for a key. `committed` is None while running, then True when an
    entry was stored, False when the fetch failed or its response was not stored."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.committed: bool | None = None
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds; True when the leader stored an entry (look it up again),
        False otherwise (fetch it yourself)."""
        if self.committed is None:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                return False
        return bool(self.committed)


class Flights:
    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def join(self, key: str) -> tuple[Flight, bool]:
        """(flight, leader): the caller is the leader (must fetch, then finish) when no fetch for
        `key` is in flight; otherwise it gets the running flight to wait on."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        flight = self._flights[key] = Flight(key)
        return flight, True

    def get(self, key: str) -> Flight | None:
        return self._flights.get(key)

    def finish(self, key: str, committed: bool, flight: Flight | None = None) -> None:
        """End the flight for `key` (idempotent); waiters wake up. `flight`: end that one only (a
        released flight may have been replaced by a new one for the same key meanwhile)."""
        current = self._flights.get(key)
        if flight is None:
            flight = current
        if flight is None:
            return
        if current is flight:
            del self._flights[key]
        if flight.committed is None:
            flight.committed = committed
            flight._event.set()

    def __len__(self) -> int:
        return len(self._flights)
