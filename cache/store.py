"""The disk store: diskcache underneath, used as it is meant to be used.

Layout (one diskcache.Cache in the cache directory, several processes may share it):
- a row per stored response, key = the cache key (cache.key.cache_key), or, when the response
  has Vary, cache key + "\\x01" + the secondary key; the row's value column holds the stored head
  (pickled) and its `filename` the body file, through a diskcache.Disk subclass. Bodies under
  INLINE_MAX live in the row itself (head and body pickled together): one SQLite read, no file.
- for a URL whose response has Vary, a small index row at the bare cache key lists the Vary field
  names, so a lookup is: index row -> variant row (both usually served from memory).
- counters ("#stats:*") are rows without a tag; the purge generation, which every lookup reads,
  is a small mapped file beside the database (cache.generation).
- GET and HEAD share the rows (the key has no method).

Eviction is diskcache's own culling with a policy (cache.eviction) ordering rows by the GDSF
score kept in the indexed `tag` column: each commit culls at most `cull_limit` rows when over
capacity; `maintain()` (for an executor) culls until under capacity. Popularity (hits, last
use) is counted in memory and written in one transaction at most once a second.

A body is written to DIR/tmp/<pid>-<start>-<random>.part while it streams; commit renames it
into diskcache's file layout and inserts the row in one transaction, so a reader sees the whole
entry or nothing. A process killed at any point leaves at most a .part file (removed at the next
open once its process is gone) or, in the instant between rename and insert, an unreferenced
file that is never served.

The private diskcache hooks used: `Cache._sql` for reads and in-place updates that diskcache has
no public call for (key ranges, updating the head after a 304, batched hit counts).
"""

from __future__ import annotations

import os
import pickle
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import diskcache

from cache import eviction, vary
from cache.collapse import Flights
from cache.fill import INLINE_MAX, Fill, process_tag
from cache.freshness import stale_at
from cache.generation import Generation
from cache.key import BadURL, split_url
from cache.memory import MemoryTier
from cache.model import Headers, Policy, StoredResponse
from cache.rows import MODE_FILE, MODE_INDEX, MODE_INLINE, EntryDisk, Row, VaryIndex, dump_head, load_head
from cache.writefailures import WriteFailures, describe

_MODES_SQL = f"({MODE_INLINE}, {MODE_FILE}, {MODE_INDEX})"
_ENTRY_MODES_SQL = f"({MODE_INLINE}, {MODE_FILE})"
SEP = "\x01"  # between a cache key and a secondary key; cannot occur in a request target
STAT_PREFIX = "#stats:"
STAT_NAMES = ("hits", "mem_hits", "misses", "bytes_saved", "evictions")
# Active refresh (webproxy.refresher): refreshes run, of which 304 (freshness extended), replaced
# (a new body), failed (entry left as it was), and client hits on entries a refresh kept fresh.
REFRESH_STAT_NAMES = ("refreshes", "refresh_304", "refresh_replaced", "refresh_failed", "refresh_hits")
COUNTER_NAMES = STAT_NAMES + REFRESH_STAT_NAMES
FLUSH_INTERVAL = 1.0
_HEAD_COST = 1024  # memory-tier cost of a stored head whose body stays on disk


class StoreWriteError(Exception):
    """The store could not be changed (a full disk, a read-only directory); the message says why."""


@dataclass(slots=True)
class Hit:
    """A stored response found for a request. The body is `body` when it is in memory, else the
    open `file` (send `stored.body_size` bytes from `offset`, with sendfile where possible).
    The file was opened by the lookup, so its bytes stay valid even if another process culls or
    purges the entry meanwhile; close() it when done (or use the Hit as a context manager).
    `in_memory`: the body came from the memory tier (TCP_MEM_HIT)."""

    key: str
    stored: StoredResponse
    body: bytes | None
    path: str | None
    offset: int = 0
    in_memory: bool = False
    file: BinaryIO | None = None

    @property
    def size(self) -> int:
        return self.stored.body_size or 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> Hit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Cache(diskcache.Cache):
    """diskcache.Cache counting the rows its per-commit culling removes (diskcache does not say;
    SQLite's total_changes() does, and only deletes happen inside _cull)."""

    culled = 0

    def _cull(self, now: float, sql: Any, cleanup: Any, limit: int | None = None) -> None:
        (before,) = sql("SELECT total_changes()").fetchone()
        super()._cull(now, sql, cleanup, limit)
        (after,) = sql("SELECT total_changes()").fetchone()
        self.culled += after - before


def _open_cache(directory: str, timeout: float, settings: dict[str, Any]) -> _Cache:
    # diskcache's constructor runs a few statements without its busy-retry (the tag index), so
    # opening while another process writes can fail with "database is locked": retry briefly.
    deadline = time.monotonic() + max(timeout, 5.0)
    while True:
        try:
            return _Cache(directory, timeout=timeout, disk=EntryDisk, **settings)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Store:
    def __init__(
        self,
        directory: str,
        capacity: int | None = None,
        max_object_size: int = 256 << 20,
        memory_capacity: int = 64 << 20,
        memory_object_size: int = 64 << 10,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = 2.0,
        cull_limit: int = 4,
    ) -> None:
        self.directory = directory
        self.max_object_size = max_object_size
        self.policy = policy or Policy()
        self.clock = clock
        settings: dict[str, Any] = {
            "eviction_policy": eviction.POLICY_NAME,
            # diskcache's own (tag, rowid) index, which the eviction policy walks; without this
            # setting diskcache drops that index on every open.
            "tag_index": True,
            "statistics": False,
            # Rows culled per commit when over capacity: small, so a commit stays cheap and does
            # not evict far more than it needs; maintain() catches up after large commits.
            "cull_limit": cull_limit,
            "disk_min_file_size": INLINE_MAX,
        }
        if capacity is not None:
            settings["size_limit"] = capacity
        self._cache = _open_cache(directory, timeout, settings)
        self.memory = MemoryTier(memory_capacity, memory_object_size)
        self.flights = Flights()
        self.write_failures = WriteFailures()
        self._undeleted: set[str] = set()  # abandoned body files that could not be removed yet
        self._tmp_dir = os.path.join(directory, "tmp")
        os.makedirs(self._tmp_dir, exist_ok=True)
        self._tag_pid = -1
        self._tag = ""
        self._uses: dict[str, list[int]] = {}
        self._counts = dict.fromkeys(COUNTER_NAMES, 0)
        self.flush_interval = FLUSH_INTERVAL
        self._flushed = time.monotonic()
        self.generation = Generation(directory)
        self._gen = self.generation.value()
        self.clean_orphans()

    # --- housekeeping -----------------------------------------------------------------------

    @property
    def _sql(self) -> Callable[..., sqlite3.Cursor]:
        # diskcache keeps one SQLite connection per thread: take the calling thread's, so
        # maintain() and the refresher's scans may run in an executor thread.
        return self._cache._sql

    @property
    def capacity(self) -> int:
        return self._cache.size_limit

    def clean_orphans(self) -> int:
        """Remove .part files left by processes that no longer run (killed mid-fill)."""
        removed = 0
        for name in os.listdir(self._tmp_dir):
            pid_s, _, rest = name.partition("-")
            start = rest.partition("-")[0]
            alive = pid_s.isdigit() and process_tag(int(pid_s)) in (f"{pid_s}-{start}", f"{pid_s}-0")
            if not alive:
                try:
                    os.unlink(os.path.join(self._tmp_dir, name))
                    removed += 1
                except OSError:
                    pass
        return removed

    def discard(self, path: str) -> None:
        """Remove an abandoned body file (a fill that did not complete). One that cannot be removed
        now (the directory turned read-only) is tried again by maintain(), so its space comes back."""
        try:
            os.unlink(path)
            self._undeleted.discard(path)
        except FileNotFoundError:
            self._undeleted.discard(path)
        except OSError:
            self._undeleted.add(path)

    def tmp_path(self) -> str:
        pid = os.getpid()
        if pid != self._tag_pid:  # also right after a fork
            self._tag_pid, self._tag = pid, process_tag(pid) or f"{pid}-0"
        return os.path.join(self._tmp_dir, f"{self._tag}-{secrets.token_hex(8)}.part")

    def close(self) -> None:
        self.flush()
        self._cache.close()
        self.generation.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------------

    def _get(self, key: str, memory_only: bool = False) -> tuple[tuple, bool] | None:
        """(record, from_memory); record is ("index", names) or ("entry", head, body, path)."""
        rec = self.memory.get(key)
        if rec is not None:
            return rec, True
        if memory_only:
            return None
        try:
            value = self._cache.get(key)
        except (diskcache.Timeout, sqlite3.OperationalError):
            return None  # the database is busy: a miss is the safe answer
        if value is None:
            return None
        if isinstance(value, VaryIndex):
            rec = ("index", value.names)
            self.memory.put(key, rec, 64)
            return rec, False
        if not isinstance(value, tuple):
            return None
        head, body, filename = value
        stored = load_head(head)
        path = None if filename is None else os.path.join(self.directory, filename)
        if body is None and path is not None and (stored.body_size or 0) <= self.memory.max_object:
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except FileNotFoundError:
                return None
            if len(body) != stored.body_size:
                return None
        rec = ("entry", stored, body, path)
        # Large bodies stay on disk, but their head is kept in memory so the next hit costs a dict
        # lookup and an open(); if the file went away meanwhile, the open fails and it is a miss.
        self.memory.put(key, rec, len(body) if body is not None else _HEAD_COST)
        return rec, False

    def lookup(self, url_key: str, request_headers: Headers, count_use: bool = True,
               memory_only: bool = False) -> Hit | None:
        """The stored response for `url_key` whose Vary matches `request_headers`, or None.
        Counts as a use of the entry (popularity), whatever is then decided about it, unless
        `count_use` is False (the refresher's own look-ups; a caller that counts later with
        count_use()). `memory_only`: only the in-process memory tier is consulted (no SQLite)."""
        gen = self.generation.value()
        if gen != self._gen:  # another process purged: what the memory tier holds may be gone
            self._gen = gen
            self.memory.clear()
        if time.monotonic() - self._flushed >= self.flush_interval:
            self.flush()
        got = self._get(url_key, memory_only)
        if got is None:
            return None
        rec, _ = got
        key = url_key
        if rec[0] == "index":
            pairs = tuple((n, vary.normalise(request_headers, n)) for n in rec[1])
            key = url_key + SEP + vary.signature(pairs)
            got = self._get(key, memory_only)
            if got is None or got[0][0] != "entry":
                return None
            rec, _ = got
        _, stored, body, path = rec
        file = None
        if body is None and path is not None:
            try:
                file = open(path, "rb")
            except FileNotFoundError:  # culled or replaced by a process since we saw it
                self.memory.pop(key)
                return None
        if count_use:
            self.count_use(key, stored.body_size or 0)
        return Hit(key, stored, body, path, 0, body is not None and got[1], file)

    def count_use(self, key: str, size: int) -> None:
        """One client use of row `key` (popularity, for eviction and active refresh)."""
        use = self._uses.get(key)
        if use is None:
            self._uses[key] = [1, size]
        else:
            use[0] += 1

    # --- writing ----------------------------------------------------------------------------

    def begin_fill(self, url_key: str, stored: StoredResponse) -> Fill:
        """Start storing the response `stored` (headers already filtered by
        storable.headers_to_store, vary recorded) for `url_key`."""
        return Fill(self, url_key, stored)

    def _variant_keys(self, url_key: str) -> list[str]:
        rows = self._sql(
            "SELECT key FROM Cache WHERE raw = 1 AND key >= ? AND key < ?", (url_key + SEP, url_key + "\x02")
        ).fetchall()
        return [r[0] for r in rows]

    def publish(self, url_key: str, stored: StoredResponse, body: bytes | None, tmp: str | None) -> bool:
        names = vary.vary_names(stored.headers)
        if names == ["*"]:
            return False
        key = url_key if not names else url_key + SEP + vary.signature(stored.vary)
        now = self.clock()
        size = stored.body_size or 0
        tag = eviction.score(now, 0, size, stale_at(stored, self.policy))
        head = dump_head(stored)
        filename = None
        dropped: list[str] = []
        try:
            if tmp is not None:
                filename, full = self._cache.disk.filename()
                os.makedirs(os.path.dirname(full), exist_ok=True)
                # Same filesystem: the body appears under its final name whole, never partly.
                os.rename(tmp, full)
                row = Row(MODE_FILE, pickle.dumps(head), filename, size)
            else:
                row = Row(MODE_INLINE, pickle.dumps((head, body)), None, 0)
            with self._cache.transact():
                if names:
                    old = self._cache.get(url_key)
                    if old != VaryIndex(tuple(names)):
                        dropped = self._variant_keys(url_key)
                        index = Row(MODE_INDEX, pickle.dumps(tuple(names)), None, 0)
                        self._cache.set(url_key, index, tag=now + eviction.INDEX_CREDIT)
                else:
                    dropped = self._variant_keys(url_key)
                for k in dropped:
                    self._cache.delete(k)
                self._cache.set(key, row, tag=tag)
        except diskcache.Timeout:  # busy: not a failure of the disk
            if filename is not None:
                self._cache.disk.remove(filename)
            return False
        except (sqlite3.Error, OSError) as e:  # a full disk, a read-only directory
            self.write_failures.failed("storing an entry", e)
            if filename is not None:
                self._cache.disk.remove(filename)
            return False
        self.write_failures.stored()
        for k in dropped:
            self.memory.pop(k)
        self.memory.pop(url_key)
        if body is not None:
            self.memory.put(key, ("entry", stored, body, None), len(body))
        elif size > self.memory.max_object:
            path = os.path.join(self.directory, filename)
            self.memory.put(key, ("entry", stored, None, path), _HEAD_COST)
        # (a body small enough for memory but spilled to a file is loaded on its first hit)
        return True

    def update(self, hit: Hit, stored: StoredResponse) -> bool:
        """Replace the stored head of `hit` (after a 304, see conditional.merge_304) without
        touching the body. False when the entry changed or vanished meanwhile."""
        stored = stored.with_(body_size=hit.stored.body_size)
        filename = None if hit.path is None else os.path.relpath(hit.path, self.directory)
        if filename is None:
            if hit.body is None:
                return False
            blob, mode = pickle.dumps((dump_head(stored), hit.body)), MODE_INLINE
        else:
            blob, mode = pickle.dumps(dump_head(stored)), MODE_FILE
        try:
            with self._cache.transact():
                cur = self._sql(
                    "UPDATE Cache SET value = ? WHERE key = ? AND raw = 1 AND mode = ? AND filename IS ?",
                    (sqlite3.Binary(blob), hit.key, mode, filename),
                )
                changed = cur.rowcount == 1
        except diskcache.Timeout:
            return False
        except (sqlite3.Error, OSError) as e:
            self.write_failures.failed("updating an entry", e)
            return False
        if changed:
            size = len(hit.body) if hit.body is not None else _HEAD_COST
            self.memory.put(hit.key, ("entry", stored, hit.body, hit.path), size)
        return changed

    # --- counters and popularity ------------------------------------------------------------

    def count_hit(self, nbytes: int, memory: bool = False) -> None:
        """A request answered from the cache with `nbytes` of body (bytes saved upstream)."""
        self._counts["hits"] += 1
        if memory:
            self._counts["mem_hits"] += 1
        self._counts["bytes_saved"] += nbytes

    def count_miss(self) -> None:
        self._counts["misses"] += 1

    def count_refresh(self, name: str, n: int = 1) -> None:
        """Add to one of REFRESH_STAT_NAMES (persisted with the other counters)."""
        self._counts[name] += n

    def usage(self, since: float = 0.0) -> list[tuple[str, int, float, float]]:
        """(row key, access_count, access_time, store_time) of every stored response used or
        stored at or after `since` (access_time is the flush time of its last counted use).
        Safe to call from an executor thread."""
        try:
            return self._sql(
                "SELECT key, access_count, access_time, store_time FROM Cache"
                f" WHERE raw = 1 AND mode IN {_ENTRY_MODES_SQL} AND access_time >= ?",
                (since,),
            ).fetchall()
        except sqlite3.Error:
            return []

    def stored_head(self, key: str) -> StoredResponse | None:
        """The stored head of row `key` as the directory holds it now (not the memory tier,
        which may predate another process's update), or None."""
        try:
            row = self._sql(
                f"SELECT mode, value FROM Cache WHERE key = ? AND raw = 1 AND mode IN {_ENTRY_MODES_SQL}", (key,)
            ).fetchone()
        except sqlite3.Error:
            return None
        if row is None:
            return None
        mode, blob = row
        try:
            value = pickle.loads(blob)
            return load_head(value[0] if mode == MODE_INLINE else value)
        except Exception:
            return None

    def flush(self) -> None:
        """Write batched hit counts and counters (one transaction). Called by lookup at most
        once a second; call it on shutdown (close does) or from a timer."""
        self._flushed = time.monotonic()
        uses, self._uses = self._uses, {}
        counts, self._counts = self._counts, dict.fromkeys(COUNTER_NAMES, 0)
        counts["evictions"] += self._cache.culled
        self._cache.culled = 0
        if not uses and not any(counts.values()):
            return
        now = self.clock()
        try:
            with self._cache.transact():
                for key, (n, size) in uses.items():
                    self._sql(
                        "UPDATE Cache SET access_count = access_count + ?, access_time = ?,"
                        f" tag = ? + ? * (1 + access_count + ?) WHERE key = ? AND raw = 1 AND mode IN {_ENTRY_MODES_SQL}",
                        (n, now, now, eviction.unit_credit(size), n, key),
                    )
                for name, delta in counts.items():
                    if delta:
                        self._cache.incr(STAT_PREFIX + name, delta)
        except (diskcache.Timeout, sqlite3.Error):
            for key, (n, size) in uses.items():  # try again next time
                self._uses.setdefault(key, [0, size])[0] += n
            for name, delta in counts.items():
                self._counts[name] += delta

    def stats(self) -> dict[str, Any]:
        """Entries, bytes, capacity, hits, misses, hit_ratio, bytes_saved: as persisted in the
        directory (every process's flushed counters), plus this process's unflushed ones."""
        self.flush()
        (entries,) = self._sql(f"SELECT COUNT(*) FROM Cache WHERE mode IN {_ENTRY_MODES_SQL}").fetchone()
        out: dict[str, Any] = {"entries": entries, "bytes": self._cache.volume(), "capacity": self.capacity}
        for name in COUNTER_NAMES:
            out[name] = self._cache.get(STAT_PREFIX + name, 0)
        total = out["hits"] + out["misses"]
        out["hit_ratio"] = out["hits"] / total if total else 0.0
        return out

    # --- eviction ---------------------------------------------------------------------------

    def maintain(self) -> int:
        """Flush counters, remove abandoned body files left behind, and cull until under capacity
        (in batches of 10 rows per transaction). Meant for an executor thread or a timer; commits
        already cull a bounded batch."""
        self.flush()
        for path in list(self._undeleted):
            self.discard(path)
        try:
            n = self._cache.cull()
        except diskcache.Timeout as e:
            n = e.args[0] if e.args else 0
        except (sqlite3.Error, OSError) as e:
            self.write_failures.failed("evicting", e)
            return 0
        self._cache.culled += n
        return n

    # --- removal ----------------------------------------------------------------------------

    def _keys(self, where: str = "", params: tuple = ()) -> list[str]:
        sql = f"SELECT key FROM Cache WHERE raw = 1 AND mode IN {_MODES_SQL} {where} ORDER BY key"
        return [r[0] for r in self._sql(sql, params).fetchall()]

    def _remove(self, keys: list[str], dry_run: bool) -> list[str]:
        urls: list[str] = []
        seen = set()
        for k in keys:
            url = k.split(SEP, 1)[0]
            if url not in seen:
                seen.add(url)
                urls.append(url)
        if dry_run or not keys:
            return urls
        try:
            for i in range(0, len(keys), 200):
                with self._cache.transact(retry=True):
                    for k in keys[i : i + 200]:
                        self._cache.delete(k, retry=True)
        except (sqlite3.Error, OSError) as e:  # a full disk: even a delete needs room in the log
            self.write_failures.failed("removing entries", e)
            raise StoreWriteError(f"cannot remove from the cache: {describe(e)}") from None
        finally:
            # Whatever went, no process may serve it from memory any more.
            self._gen = self.generation.bump()
            self.memory.clear()
        return urls

    def purge(self, url_key: str, dry_run: bool = False) -> bool:
        """Remove every variant stored for one cache key; False when nothing was stored."""
        keys = self._keys("AND (key = ? OR (key >= ? AND key < ?))", (url_key, url_key + SEP, url_key + "\x02"))
        return bool(self._remove(keys, dry_run))

    def purge_prefix(self, prefix: str, dry_run: bool = False) -> list[str]:
        """Remove every URL starting with `prefix`; returns the URLs removed."""
        if not prefix:
            return self.purge_all(dry_run)
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return self._remove(self._keys("AND key >= ? AND key < ?", (prefix, upper)), dry_run)

    def purge_domain(self, domain: str, dry_run: bool = False) -> list[str]:
        """Remove every URL whose host is `domain` or a subdomain of it."""
        domain = domain.lower().strip(".")
        keys = []
        for k in self._keys():
            try:
                host = split_url(k.split(SEP, 1)[0])[1]
            except BadURL:
                continue
            if host == domain or host.endswith("." + domain):
                keys.append(k)
        return self._remove(keys, dry_run)

    def purge_all(self, dry_run: bool = False) -> list[str]:
        return self._remove(self._keys(), dry_run)

    def invalidate(self, url_keys: list[str]) -> int:
        """Invalidation after an unsafe method (see cache.invalidation): how many URLs were removed.
        A store that cannot be written (a full disk) removes what it can and says so through
        `write_failures`: the unsafe method's own answer must still reach its client."""
        removed = 0
        for k in url_keys:
            try:
                removed += self.purge(k)
            except StoreWriteError:
                pass
        return removed

    def urls(self) -> list[str]:
        """Every cached URL (for listings)."""
        return self._remove(self._keys(), dry_run=True)


def open_store(settings: dict[str, Any], **kw: Any) -> Store:
    """A Store from the [cache] config section (a plain dict: this package never imports webproxy)."""
    return Store(
        settings["directory"],
        capacity=settings.get("capacity"),
        max_object_size=settings.get("max_object_size", 256 << 20),
        memory_capacity=settings.get("memory_capacity", 64 << 20),
        memory_object_size=settings.get("memory_object_size", 64 << 10),
        policy=policy_from_settings(settings),
        **kw,
    )


def policy_from_settings(settings: dict[str, Any]) -> Policy:
    return Policy(
        heuristic_fraction=settings.get("heuristic_fraction", 0.1),
        heuristic_max=settings.get("heuristic_max", 86400.0),
        serve_stale_on_error=settings.get("serve_stale_on_error", False),
    )
