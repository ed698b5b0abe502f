"""Which entries leave the cache first: a Greedy-Dual-Size-Frequency score kept in diskcache's
indexed `tag` column, and an eviction policy that makes diskcache's own culling use it.

GDSF (Cherkasova 1998) ranks an entry by H = L + F * C / S and evicts the lowest H. Here every
term is in seconds, so H reads as "the time until which this entry has earned its place":

    H = last_use + CREDIT * (1 + hits) * REFERENCE_SIZE / max(size, MIN_SIZE)

- last_use (age): plays the part of GDSF's inflation clock L. An entry nobody has used for a long
  time falls behind everything used since, however popular it once was. Wall time needs no
  shared state, so several processes sharing one directory compute comparable scores.
- hits (popularity, GDSF's F): each use buys more residence, so objects that earn hits stay.
- size (GDSF's S, with cost C = 1 to maximise the hit ratio): the credit is divided by size, so a
  small object that is used as often as a large one keeps its place; the space of one large
  object holds many small ones, each of which may hit. MIN_SIZE stops tiny objects from getting
  unbounded credit (a few KiB is the real cost of any entry: index row, file, page).
- expiry: an entry nobody has asked for since it was stored is capped at the moment it goes
  stale, so once expired and unrequested it ranks below every entry whose score is still in
  the future (whatever its size): those go first, the longest expired first.

Scores are written at store time and when batched hit counts are flushed, never per hit.
"""

from __future__ import annotations

from diskcache.core import EVICTION_POLICY

POLICY_NAME = "webproxy-gdsf"
CREDIT = 3600.0  # seconds of residence one use of a REFERENCE_SIZE object earns
REFERENCE_SIZE = 64 * 1024
MIN_SIZE = 4 * 1024
# Vary index rows are tiny and needed by every variant: they outlive the variants they list.
INDEX_CREDIT = 30 * 86400.0


def unit_credit(size: int) -> float:
    """Seconds earned per use by an entry of `size` body bytes."""
    return CREDIT * REFERENCE_SIZE / max(size, MIN_SIZE)


def score(last_use: float, hits: int, size: int, stale_at: float | None = None) -> float:
    """The eviction priority H (lowest is evicted first)."""
    h = last_use + unit_credit(size) * (1 + hits)
    if hits == 0 and stale_at is not None:
        h = min(h, stale_at)
    return h


def register() -> None:
    """Make POLICY_NAME known to diskcache: cull by ascending tag over the (tag, rowid) index
    (the store opens the cache with tag_index=True so diskcache keeps it). Rows without a tag
    (counters) are never culled. No per-get update: hits are batched."""
    EVICTION_POLICY[POLICY_NAME] = {
        "init": "CREATE INDEX IF NOT EXISTS Cache_tag_rowid ON Cache(tag, rowid)",
        "get": None,
        "cull": "SELECT {fields} FROM Cache WHERE tag IS NOT NULL ORDER BY tag LIMIT ?",
    }


register()
