"""What the store offers the refresher: recent use counts, the directory's stored head, uses the
refresher takes back, refresh counters shown by `webproxy cache stats`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from cache.model import StoredResponse
from cache.store import Store
from tests.cache_support import ROOT, T0, Clock


def put(store: Store, url: str, body: bytes, cc: str = "max-age=60", etag: str = '"v1"') -> None:
    stored = StoredResponse(200, "OK", [("Cache-Control", cc), ("ETag", etag), ("Content-Length", str(len(body)))],
                            store.clock(), store.clock())
    f = store.begin_fill(url, stored)
    f.write(body)
    assert f.commit()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = Store(str(tmp_path / "cache"), clock=clock)
    yield s
    s.close()


def uses(store: Store, since: float = 0.0) -> dict[str, tuple[int, float]]:
    return {k: (n, t) for k, n, t, _ in store.usage(since)}


def test_usage_lists_use_counts_of_rows_touched_since_a_time(store, clock):
    # diskcache stamps a new row with the wall clock; flushed uses carry the store's clock.
    clock.t = now = time.time()
    put(store, "http://e.com/a", b"a")
    put(store, "http://e.com/b", b"b")
    clock.t = now + 100
    for _ in range(3):
        store.lookup("http://e.com/a", []).close()
    store.flush()
    got = uses(store)
    assert got["http://e.com/a"] == (3, now + 100) and got["http://e.com/b"][0] == 0
    assert uses(store, since=now + 50) == {"http://e.com/a": (3, now + 100)}


def test_usage_tells_a_replaced_row_by_its_store_time(store, clock):
    put(store, "http://e.com/a", b"a")
    store.lookup("http://e.com/a", []).close()
    store.flush()
    (_, n1, _, stored1), = store.usage()
    clock.t = T0 + 5
    put(store, "http://e.com/a", b"new")
    (_, n2, _, stored2), = store.usage()
    assert (n1, n2) == (1, 0) and stored2 > stored1


def test_a_lookup_that_is_not_a_clients_use_is_not_counted(store):
    put(store, "http://e.com/a", b"a")
    store.lookup("http://e.com/a", []).close()
    store.lookup("http://e.com/a", [], count_use=False).close()
    store.flush()
    assert uses(store)["http://e.com/a"][0] == 1


def test_a_memory_only_lookup_never_reads_the_directory(store, tmp_path):
    put(store, "http://e.com/a", b"a")
    other = Store(str(tmp_path / "cache"))
    assert other.lookup("http://e.com/a", [], memory_only=True) is None
    assert other.lookup("http://e.com/a", []) is not None
    assert other.lookup("http://e.com/a", [], memory_only=True) is not None
    other.close()


def test_stored_head_reads_the_directory_not_the_memory_tier(store, tmp_path):
    put(store, "http://e.com/a", b"x" * 100_000, etag='"v1"')
    put(store, "http://e.com/small", b"s", etag='"s1"')
    assert store.lookup("http://e.com/a", []) is not None  # now in this process's memory tier
    other = Store(str(tmp_path / "cache"))
    put(other, "http://e.com/a", b"y" * 10, etag='"v2"')
    other.close()
    assert store.stored_head("http://e.com/a").etag == '"v2"'
    assert store.stored_head("http://e.com/small").etag == '"s1"'
    assert store.stored_head("http://e.com/none") is None


def test_flush_from_another_thread_writes_use_counts(store):
    # maintain() runs in an executor thread; diskcache's connections are per thread.
    put(store, "http://e.com/a", b"a")
    store.lookup("http://e.com/a", []).close()
    t = threading.Thread(target=store.maintain)
    t.start()
    t.join()
    assert store._uses == {}
    assert uses(store)["http://e.com/a"][0] == 1


def test_refresh_counters_persist_and_show_in_cache_stats(store, tmp_path):
    for name, n in (("refreshes", 5), ("refresh_304", 3), ("refresh_replaced", 1), ("refresh_failed", 1),
                    ("refresh_hits", 17)):
        store.count_refresh(name, n)
    store.flush()
    conf = tmp_path / "w.toml"
    conf.write_text(f'[cache]\ndirectory = "{tmp_path / "cache"}"\n')
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = [sys.executable, "-m", "webproxy", "cache", "-c", str(conf), "stats"]
    r = subprocess.run([*run, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["refreshes"], s["refresh_304"], s["refresh_replaced"], s["refresh_failed"], s["refresh_hits"]) == \
        (5, 3, 1, 1, 17)
    text = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60).stdout
    assert "refreshes    5 (3 not modified, 1 replaced, 1 failed)" in text
    assert "refresh hits 17" in text
