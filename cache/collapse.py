"""Collapsed forwarding within one process: concurrent misses for a URL wait for the one fetch in
flight instead of each going to the origin."""

from __future__ import annotations

import asyncio


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

    def finish(self, key: str, committed: bool) -> None:
        """End the flight for `key` (idempotent); waiters wake up."""
        flight = self._flights.pop(key, None)
        if flight is not None:
            flight.committed = committed
            flight._event.set()

    def __len__(self) -> int:
        return len(self._flights)
