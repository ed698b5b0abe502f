"""Active caching: refresh popular stored responses shortly before they expire, while the proxy is
quiet, so the next client gets a fresh hit instead of waiting for the origin.

The choices (popularity, window, eligibility, score, load, caps) are the pure rules of
cache.refresh; this module samples the store, watches the load and runs the refreshes. A refresh
is CacheLayer.refresh: the same conditional request, RFC 9111 rules and store calls as a client
revalidation (304 -> the stored head is updated, body untouched; 200 -> replaced through a fill;
error -> the entry stays as it is).

One refresher per cache directory: every worker process starts one, but only the holder of an
flock on DIR/refresh.lock works; the others retry the lock each interval, so when the holder
exits another worker takes over.

Access log: one line per refresh, client "-", code TCP_ACTIVE_REFRESH_UNMODIFIED (304: freshness
extended), TCP_ACTIVE_REFRESH_MODIFIED (new body stored) or TCP_ACTIVE_REFRESH_FAIL (entry left
as it was), hierarchy HIER_DIRECT/host (or the parent proxy's, as for client requests). Counters (`webproxy cache stats`): refreshes,
refresh_304, refresh_replaced, refresh_failed, refresh_hits (client uses of an entry while the
freshness a refresh gave it lasted, as seen through the store's batched use counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections import deque
from typing import Any, Protocol

from cache import conditional
from cache import refresh as rules
from cache.model import Request as CacheRequest
from cache.model import StoredResponse, get_one
from cache.store import SEP
from webproxy import logcodes
from webproxy.caching import CacheLayer
from webproxy.config import Config
from webproxy.httpmsg import Target
from webproxy.origin import Opener


class RefreshHost(Protocol):
    """What the refresher needs from the running proxy."""

    @property
    def cfg(self) -> Config: ...

    @property
    def requests(self) -> int: ...  # client requests answered so far (for the load check)

    def upstream_active(self) -> int: ...  # fetches waiting for an origin's head right now

    def opener_for(self, url: str) -> tuple[Target, Opener]: ...

    def log_error(self, message: str, level: str = "error") -> None: ...

    def log_access(self, start: float, client: str, code: str, status: int, nbytes: int, method: str,
                   url: str, hierarchy: str, ctype: str | None) -> None: ...

LOCK_FILE = "refresh.lock"
# Rows are re-read when their access_time is at most this much older than the last scan: access
# times are written by other processes' flushes, whose transactions may commit a little late.
SCAN_SLACK = 2.0
RATE_SPAN = 1.0  # seconds over which the client request rate is measured


class DirectoryLock:
    """A non-blocking exclusive flock on a file in the cache directory (held per process: the
    kernel drops it when the process exits, however it exits)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_FILE)
        self.fd: int | None = None
        self.held = False

    def try_acquire(self) -> bool:
        if self.held:
            return True
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
        self.fd = None
        self.held = False


class Refresher:
    def __init__(self, server: RefreshHost, layer: CacheLayer) -> None:
        self.server = server
        self.layer = layer
        self.store = layer.store
        self.clock = self.store.clock  # the clock access_time is written with
        self.lock = DirectoryLock(self.store.directory)
        self.popularity: dict[str, rules.Popularity] = {}
        self.heads: dict[str, StoredResponse] = {}  # row key -> head, until the row is touched
        self.fetch_seconds: dict[str, float] = {}
        self.refreshed: dict[str, rules.Refreshed] = {}
        self.retry_at: dict[str, float] = {}
        self.running: set[str] = set()
        self.queue: list[rules.Candidate] = []
        self.fetching = 0  # refreshes waiting for the origin's head (counted in upstream.active)
        self.scanned_at = 0.0
        now = self.clock()
        self.bucket = rules.TokenBucket(self.settings.max_per_second, now)
        self._requests: deque[tuple[float, int]] = deque([(now, server.requests)])
        self.backed_off = 0  # ticks skipped because the proxy was busy
        self.task: asyncio.Task[None] | None = None

    @property
    def settings(self) -> rules.Settings:
        # Read live: a SIGHUP reload of [refresh] applies at the next tick.
        return rules.Settings.from_config(self.server.cfg.refresh)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        # In the cache layer's background set, so CacheLayer.close cancels it before the store closes.
        self.task = asyncio.ensure_future(self.run())
        self.layer.background.add(self.task)
        self.task.add_done_callback(self.layer.background.discard)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        self.lock.release()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.settings.interval)
                try:
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.server.log_error(f"refresh: {e!r}")
        finally:
            self.lock.release()

    # ---- one round ------------------------------------------------------------------------------
    def client_rate(self, now: float) -> float:
        """Client requests per second over the last RATE_SPAN seconds or more (a client pausing
        for one tick does not read as quiet), for the whole proxy: this worker's count times the
        number of workers (the kernel spreads connections evenly across them)."""
        count = self.server.requests
        samples = self._requests
        samples.append((now, count))
        while len(samples) > 2 and now - samples[1][0] >= RATE_SPAN:
            samples.popleft()
        then, before = samples[0]
        return rules.rate(before, then, count, now) * max(1, self.server.cfg.server["workers"])

    async def tick(self) -> None:
        s = self.settings
        now = self.clock()
        client_rate = self.client_rate(now)
        if not s.enabled or not self.lock.try_acquire():
            return
        await self.scan(now, s)
        upstream = max(0, self.server.upstream_active() - self.fetching)  # the clients' fetches
        if not rules.load_allows(client_rate, upstream, s):
            self.queue = []
            self.backed_off += 1
            return
        self.bucket.rate = s.max_per_second
        # Planned for this tick, as many as the bucket allows now; started as refreshes finish.
        self.queue = rules.plan(self.candidates(now, s), self.bucket.available(now))
        self.start_queued()

    def start_queued(self) -> None:
        s = self.settings
        while self.queue and rules.slots(self.bucket.available(self.clock()), len(self.running), s) > 0:
            c = self.queue.pop(0)
            if c.key in self.running:
                continue
            self.bucket.take(self.clock())
            self.running.add(c.key)
            self.layer.spawn(self.refresh_one(c))

    async def scan(self, now: float, s: rules.Settings) -> None:
        """Fold the use counts of rows touched since the last scan into their popularity."""
        since = self.scanned_at - SCAN_SLACK if self.scanned_at else 0.0
        rows = await asyncio.get_running_loop().run_in_executor(None, self._sample, since)
        self.scanned_at = now
        produced = 0
        for key, count, access_time, stored_at in rows:
            pop, new = rules.observe(self.popularity.get(key), count, access_time, stored_at, now,
                                     s.popularity_window)
            self.popularity[key] = pop
            self.heads.pop(key, None)  # the row was used or replaced: its head may have changed
            if new:
                produced += rules.produced_hits(self.refreshed.get(key), new, now)
        if produced:
            self.store.count_refresh("refresh_hits", produced)
        for key in [k for k, p in self.popularity.items()
                    if rules.forgettable(p, now, s.popularity_window) and k not in self.running]:
            self._forget(key)

    def _sample(self, since: float) -> list[tuple[str, int, float, float]]:
        self.store.flush()  # this process's uses so far, so they are not a flush interval late
        return self.store.usage(since)

    def _forget(self, key: str) -> None:
        for d in (self.popularity, self.heads, self.fetch_seconds, self.refreshed, self.retry_at):
            d.pop(key, None)

    def candidates(self, now: float, s: rules.Settings) -> list[rules.Candidate]:
        out = []
        policy = self.store.policy
        for key, pop in list(self.popularity.items()):
            hits = pop.hits(now, s.popularity_window)
            if hits < s.min_hits or key in self.running or self.retry_at.get(key, 0.0) > now:
                continue
            if self.store.flights.get(key.split(SEP, 1)[0]) is not None:
                continue  # a client is fetching it right now
            stored = self.heads.get(key)
            if stored is None:
                stored = self.store.stored_head(key)
                if stored is None:
                    self._forget(key)
                    continue
                self.heads[key] = stored
            c = rules.candidate(key, stored, hits, now, policy, s, self.fetch_seconds.get(key))
            if c is not None:
                out.append(c)
        return out

    async def refresh_one(self, c: rules.Candidate) -> str:
        key = c.key
        url = key.split(SEP, 1)[0]
        # The request fields the entry's Vary selected, as the original request sent them.
        headers = [(name, value) for name, value in c.stored.vary if value is not None]
        rq = CacheRequest("GET", url, headers)
        status = 0
        start = time.time()
        outcome = conditional.FORWARD_ERROR
        hierarchy = logcodes.hier_direct("-")
        try:
            target, opener = self.server.opener_for(url)
            hierarchy = logcodes.hier_direct(target.host)

            async def timed_opener(method: str, fields: Any) -> Any:
                nonlocal status, hierarchy
                t0 = time.monotonic()
                self.fetching += 1
                try:
                    resp = await opener(method, fields)
                finally:
                    self.fetching -= 1
                self.fetch_seconds[key] = time.monotonic() - t0
                status = resp.status
                hierarchy = resp.hierarchy or hierarchy  # a parent proxy's name when one answered
                return resp

            outcome = await self.layer.refresh(url, rq, c.stored, headers, timed_opener)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.server.log_error(f"refresh of {url[:200]} failed: {e!r}")
        finally:
            self.running.discard(key)
        try:
            self.finish(c, url, hierarchy, outcome, status, start)
            self.start_queued()
        except Exception as e:  # e.g. the store closing under a late refresh
            self.server.log_error(f"refresh of {url[:200]}: {e!r}")
        return outcome

    def finish(self, c: rules.Candidate, url: str, hierarchy: str, outcome: str, status: int, start: float) -> None:
        """Count, remember and log one refresh's outcome."""
        key = c.key
        now = self.clock()
        store = self.store
        store.count_refresh("refreshes")
        nbytes = 0
        head = None
        if outcome == conditional.UPDATE:
            store.count_refresh("refresh_304")
        elif outcome == conditional.REPLACE:
            store.count_refresh("refresh_replaced")
        else:
            store.count_refresh("refresh_failed")
            self.retry_at[key] = rules.retry_after(now, c.window, self.settings.interval)
        if outcome in (conditional.UPDATE, conditional.REPLACE):
            self.retry_at.pop(key, None)
            head = store.stored_head(key)
            if head is not None:
                self.heads[key] = head
                self.refreshed[key] = rules.Refreshed(now, now + rules.time_left(head, now, store.policy))
                if outcome == conditional.REPLACE:
                    nbytes = head.body_size or 0
        ctype = get_one((head or c.stored).headers, "content-type")
        self.server.log_access(start, "-", logcodes.active_refresh(outcome), status, nbytes, "GET", url,
                               hierarchy, ctype)


def attach(server: RefreshHost, layer: CacheLayer) -> Refresher | None:
    """Start the refresher of `layer` when [refresh] is enabled."""
    if not server.cfg.refresh["enabled"]:
        return None
    r = Refresher(server, layer)
    r.start()
    return r
