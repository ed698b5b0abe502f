"""Active refresh: which stored responses to refresh before they expire, and when not to.
Pure rules (every time is a parameter); webproxy.refresher carries them out.

Popularity (hits within the recent window, not all-time). The store counts uses per row
(diskcache's access_count, flushed in batches by every process sharing the directory). The
refresher samples those counts and keeps, per key, the new uses it saw in time buckets of
W/BUCKETS seconds (W = `popularity_window`): hits = the uses in the buckets of the last W seconds,
exact to one bucket, at most BUCKETS + 1 small pairs per key. A key first seen by a refresher (e.g.
after a restart) is seeded with a single use at its last access time, never its all-time count:
a restart cannot make a once popular object look popular now; objects still in demand earn
their hits again quickly. (A row stored within the window is seeded with all its uses: they
are all recent.)

Window (time left until expiry in which an object may be refreshed):

    window = min(lifetime / 2, max(min_window, window_fraction * lifetime))

The lifetime/2 cap keeps an object with a very short lifetime from being refreshed right after
each fetch, again and again.

Eligibility (`why_not_refreshable`): a status the cache stores, no `no-store`, no `private`, no
unqualified `no-cache` (every use revalidates anyway, so a refresh buys nothing), a positive
lifetime, and not `must-revalidate` without validators (the refresh would be a full download
of an object the origin wants checked each time: leave it to the client that needs it).

Score (higher first), for candidates with at least `min_hits` recent hits inside their window:

    score = hits * urgency / cost
    urgency = 2 - time_left / window          (1 at the window's start, 2 at expiry)
    cost = 1 + fetch_seconds / COST_SECONDS + (0 if validators else size / COST_BYTES)

A popular object costs little to refresh when it has validators (a 304 is one round trip
whatever the size); without validators every refresh downloads the body, so size counts. The
measured fetch time (of the last refresh, else of the original fetch) adds the origin's cost.

Load: refresh only while the client request rate is at most `max_client_rate` and upstream
fetches in flight (other than refreshes) are below `max_upstream_fetches`; at most
`max_per_second` refreshes start per second (a token bucket with a one-second burst) and at most
`max_concurrent` run at once. Objects that expire together are therefore spread over their
windows, most valuable first, instead of all being fetched in the same instant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cache import conditional
from cache.freshness import current_age, directives, freshness_lifetime
from cache.model import Policy, StoredResponse
from cache.storable import UNDERSTOOD_STATUSES

COST_SECONDS = 1.0  # a refresh taking this long costs as much again as the round trip itself
COST_BYTES = 1 << 20  # downloading this many bytes again costs as much as a round trip
FAILURE_BACKOFF_MIN = 5.0  # seconds before a failed refresh of a key is tried again (at least)

@dataclass(frozen=True)
class Settings:
    """The [refresh] config section."""

    enabled: bool = True
    window: float = 0.1
    min_window: float = 5.0
    popularity_window: float = 600.0
    min_hits: int = 2
    max_per_second: float = 5.0
    max_concurrent: int = 2
    max_client_rate: float = 200.0
    max_upstream_fetches: int = 32
    interval: float = 1.0

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> Settings:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in section.items() if k in names})


# --- popularity -------------------------------------------------------------------------------


BUCKETS = 10
FORGET_AFTER = 2.0


@dataclass(frozen=True)
class Popularity:
    """What a refresher knows about one row's uses: `buckets` of (bucket start, new uses), and
    the row's access_count / store_time when last sampled (a replaced row restarts its count)."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    stored_at: float
    seen: float

    def hits(self, now: float, popularity_window: float) -> int:
        """Uses within the last `popularity_window` seconds (to one bucket's precision)."""
        width = popularity_window / BUCKETS
        return sum(n for start, n in self.buckets if start + width > now - popularity_window)


def _add(buckets: tuple[tuple[float, int], ...], t: float, n: int, now: float,
         popularity_window: float) -> tuple[tuple[float, int], ...]:
    width = popularity_window / BUCKETS
    start = t - t % width if width > 0 else t
    kept = [(s, k) for s, k in buckets if s + width > now - popularity_window]
    if n <= 0:
        return tuple(kept)
    if kept and kept[-1][0] == start:
        kept[-1] = (start, kept[-1][1] + n)
    else:
        kept.append((start, n))
    return tuple(kept)


def observe(prev: Popularity | None, count: int, access_time: float, stored_at: float, now: float,
            popularity_window: float) -> tuple[Popularity, int]:
    """Fold a new sample of a row's (access_count, access_time, store_time) into its popularity.
    Returns the new popularity and the number of uses new since the previous sample."""
    if prev is None:
        # Stored within the window: all its uses are recent. Otherwise, one use (the last).
        recent = count if stored_at > now - popularity_window else min(count, 1)
        return Popularity(_add((), access_time, recent, now, popularity_window), count, stored_at, now), 0
    # A replaced row (new store_time) counts from 0 again; a count that went down on the same row
    # is a correction (a use taken back), not a reset.
    new = count if stored_at != prev.stored_at else max(0, count - prev.count)
    return Popularity(_add(prev.buckets, now, new, now, popularity_window), count, stored_at, now), new


def forgettable(pop: Popularity, now: float, popularity_window: float) -> bool:
    """Whether a refresher may drop what it knows of a key: no recent hits and not sampled for
    FORGET_AFTER windows (a key seen again after that is seeded as a cold one, which it is)."""
    return now - pop.seen > FORGET_AFTER * popularity_window and not pop.hits(now, popularity_window)


# --- what may be refreshed, and when ------------------------------------------------------------


def refresh_window(lifetime: float, s: Settings) -> float:
    """Seconds before expiry from which a refresh may run (see the module doc)."""
    return min(lifetime / 2, max(s.min_window, s.window * lifetime))


def time_left(stored: StoredResponse, now: float, policy: Policy) -> float:
    """Seconds until `stored` becomes stale (negative once it is)."""
    return freshness_lifetime(stored, policy) - current_age(stored, now)


def has_validators(stored: StoredResponse) -> bool:
    return bool(conditional.validation_headers(stored))


def why_not_refreshable(stored: StoredResponse, policy: Policy) -> str | None:
    """None when `stored` may be refreshed ahead of expiry, else why not."""
    if stored.status not in UNDERSTOOD_STATUSES or stored.status in (206, 304):
        return "status"
    cc = directives(stored)
    if "no-store" in cc:
        return "no-store"
    if "private" in cc:
        return "private"
    if "no-cache" in cc and cc.field_names("no-cache") is None:
        return "no-cache"
    if ("must-revalidate" in cc or "proxy-revalidate" in cc) and not has_validators(stored):
        return "must-revalidate without validators"
    if freshness_lifetime(stored, policy) <= 0:
        return "no lifetime"
    return None


def fetch_cost(size: int, fetch_seconds: float, validators: bool) -> float:
    """The relative cost of one refresh (1 = a cheap round trip)."""
    cost = 1.0 + max(0.0, fetch_seconds) / COST_SECONDS
    if not validators:
        cost += max(0, size) / COST_BYTES
    return cost


def score(hits: float, left: float, window: float, cost: float) -> float:
    """The value of refreshing now (see the module doc)."""
    urgency = 2.0 - min(1.0, max(0.0, left / window)) if window > 0 else 2.0
    return hits * urgency / cost


@dataclass(frozen=True)
class Candidate:
    key: str
    stored: StoredResponse
    hits: float
    left: float
    window: float
    score: float


def candidate(key: str, stored: StoredResponse, hits: float, now: float, policy: Policy, s: Settings,
              fetch_seconds: float | None = None) -> Candidate | None:
    """`key` as a refresh candidate at `now`, or None when it is not one (unpopular, not inside
    its window, already stale, or not refreshable)."""
    if hits < s.min_hits or why_not_refreshable(stored, policy) is not None:
        return None
    lifetime = freshness_lifetime(stored, policy)
    left = lifetime - current_age(stored, now)
    window = refresh_window(lifetime, s)
    if left <= 0 or left > window:
        return None
    if fetch_seconds is None:
        fetch_seconds = max(0.0, stored.response_time - stored.request_time)
    validators = has_validators(stored)
    cost = fetch_cost(stored.body_size or 0, fetch_seconds, validators)
    return Candidate(key, stored, hits, left, window, score(hits, left, window, cost))


def plan(candidates: Iterable[Candidate], slots: int) -> list[Candidate]:
    """The candidates to start now: the `slots` best by score (ties: the one expiring first)."""
    if slots <= 0:
        return []
    return sorted(candidates, key=lambda c: (-c.score, c.left, c.key))[:slots]


def retry_after(failed_at: float, window: float, interval: float) -> float:
    """When a key whose refresh failed may be tried again: a few times per window at most."""
    return failed_at + max(FAILURE_BACKOFF_MIN, interval, window / 3)


# --- load ------------------------------------------------------------------------------------


def rate(prev_count: int, prev_time: float, count: int, now: float) -> float:
    """Events per second between two samples of a running counter."""
    dt = now - prev_time
    return (count - prev_count) / dt if dt > 0 else 0.0


def load_allows(client_rate: float, upstream_fetches: int, s: Settings) -> bool:
    """Whether the proxy is quiet enough to refresh."""
    return client_rate <= s.max_client_rate and upstream_fetches < s.max_upstream_fetches


class TokenBucket:
    """At most `rate` starts per second on average, bursts of at most max(1, rate)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = 1.0
        self.at = now

    def available(self, now: float) -> int:
        burst = max(1.0, self.rate)
        if now > self.at:
            self.tokens = min(burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        return int(self.tokens)

    def take(self, now: float) -> bool:
        if self.available(now) < 1:
            return False
        self.tokens -= 1
        return True


def slots(bucket_tokens: int, running: int, s: Settings) -> int:
    """How many refreshes may start now."""
    return max(0, min(bucket_tokens, s.max_concurrent - running))


@dataclass(frozen=True)
class Refreshed:
    """A key whose current freshness came from a refresh, from `at` until it goes stale at
    `until`: client uses in between are hits the refresh produced."""

    at: float
    until: float


def produced_hits(r: Refreshed | None, new_uses: int, now: float) -> int:
    """How many of `new_uses` (seen at `now`) count as hits produced by refresh `r`."""
    if r is None or not r.at <= now <= r.until:
        return 0
    return new_uses
