"""The diskcache store, on a real temporary directory (and real subprocesses where the test is
about other processes or crashes)."""

from __future__ import annotations

import asyncio
import builtins
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

import cache.fill
from cache.generation import Generation
from cache.model import StoredResponse
from cache.store import Store, StoreWriteError
from cache.writefailures import WriteFailures
from tests.cache_support import ROOT, T0, Clock


def head(size: int | None, *extra, cc="max-age=3600", vary_pairs=()) -> StoredResponse:
    headers = [("Cache-Control", cc), ("Content-Type", "application/octet-stream"), *extra]
    if size is not None:
        headers.append(("Content-Length", str(size)))
    return StoredResponse(200, "OK", headers, T0, T0, tuple(vary_pairs), None)


def body_of(key: str, size: int) -> bytes:
    seed = (key.encode() + b"|") * (size // (len(key) + 1) + 1)
    return seed[:size]


def fill(store: Store, key: str, size: int, chunk: int = 16384, **kw) -> bool:
    f = store.begin_fill(key, head(size, **kw))
    data = body_of(key, size)
    for i in range(0, size, chunk):
        f.write(data[i : i + chunk])
    return f.commit()


def read_hit(hit) -> bytes:
    if hit.body is not None:
        return hit.body
    with hit:
        hit.file.seek(hit.offset)
        return hit.file.read(hit.size)


def run_py(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "c"), capacity=64 << 20, memory_object_size=64 << 10, clock=Clock())
    yield s
    s.close()


def tmp_files(store: Store) -> list[str]:
    return os.listdir(os.path.join(store.directory, "tmp"))


def test_entry_is_visible_only_after_commit(store):
    f = store.begin_fill("http://e.com/a", head(100_000))
    f.write(b"x" * 60_000)
    assert store.lookup("http://e.com/a", []) is None
    f.write(b"y" * 40_000)
    assert store.lookup("http://e.com/a", []) is None
    assert f.commit()
    hit = store.lookup("http://e.com/a", [])
    assert hit is not None and read_hit(hit) == b"x" * 60_000 + b"y" * 40_000
    assert hit.stored.body_size == 100_000


def test_small_body_is_served_from_memory_and_large_from_a_file(store):
    assert fill(store, "http://e.com/small", 1000)
    assert fill(store, "http://e.com/large", 1 << 20)
    small = store.lookup("http://e.com/small", [])
    assert small.in_memory and small.body == body_of("http://e.com/small", 1000)
    large = store.lookup("http://e.com/large", [])
    assert large.body is None and large.path.startswith(store.directory) and large.offset == 0
    assert os.path.getsize(large.path) == 1 << 20
    assert read_hit(large) == body_of("http://e.com/large", 1 << 20)


def test_object_read_from_disk_once_is_then_served_from_memory(tmp_path):
    s1 = Store(str(tmp_path / "c"))
    assert fill(s1, "http://e.com/m", 40_000)  # above the inline size: a file
    s1.close()
    s2 = Store(str(tmp_path / "c"))
    first = s2.lookup("http://e.com/m", [])
    second = s2.lookup("http://e.com/m", [])
    assert not first.in_memory and second.in_memory and second.body == body_of("http://e.com/m", 40_000)
    s2.close()


def test_aborted_fill_leaves_nothing(store):
    f = store.begin_fill("http://e.com/a", head(200_000))
    f.write(b"z" * 100_000)
    f.abort()
    assert f.commit() is False
    assert store.lookup("http://e.com/a", []) is None
    assert tmp_files(store) == []


def test_leaving_a_fill_block_without_commit_aborts(store):
    with pytest.raises(RuntimeError):
        with store.begin_fill("http://e.com/a", head(100_000)) as f:
            f.write(b"z" * 50_000)
            raise RuntimeError("client went away")
    assert store.lookup("http://e.com/a", []) is None and tmp_files(store) == []


def test_short_body_is_not_stored(store):
    f = store.begin_fill("http://e.com/a", head(100_000))
    f.write(b"z" * 99_999)
    assert f.commit() is False
    assert store.lookup("http://e.com/a", []) is None and tmp_files(store) == []


def test_long_body_is_not_stored(store):
    f = store.begin_fill("http://e.com/a", head(10))
    f.write(b"z" * 11)
    assert f.commit() is False
    assert store.lookup("http://e.com/a", []) is None


def test_body_without_content_length_is_stored_with_its_length(store):
    f = store.begin_fill("http://e.com/a", head(None))
    f.write(b"abc")
    assert f.commit()
    assert store.lookup("http://e.com/a", []).stored.body_size == 3


def test_object_over_max_object_size_is_not_stored(tmp_path):
    s = Store(str(tmp_path / "c"), max_object_size=50_000)
    assert not fill(s, "http://e.com/big", 60_000)
    f = s.begin_fill("http://e.com/nolen", head(None))
    f.write(b"x" * 60_000)
    assert not f.commit()
    assert s.lookup("http://e.com/big", []) is None and s.lookup("http://e.com/nolen", []) is None
    assert tmp_files(s) == []
    s.close()


def test_new_fill_replaces_the_old_entry_and_its_file(store):
    assert fill(store, "http://e.com/a", 100_000)
    old = store.lookup("http://e.com/a", []).path
    f = store.begin_fill("http://e.com/a", head(100_000))
    f.write(b"n" * 100_000)
    assert f.commit()
    hit = store.lookup("http://e.com/a", [])
    assert read_hit(hit) == b"n" * 100_000 and not os.path.exists(old)


def test_304_update_changes_the_head_and_keeps_the_body_file(store):
    assert fill(store, "http://e.com/a", 100_000)
    hit = store.lookup("http://e.com/a", [])
    st = os.stat(hit.path)
    new = hit.stored.with_(headers=hit.stored.headers + [("X-Revalidated", "1")], response_time=T0 + 500)
    assert store.update(hit, new)
    again = store.lookup("http://e.com/a", [])
    assert ("X-Revalidated", "1") in again.stored.headers and again.stored.response_time == T0 + 500
    assert again.path == hit.path and os.stat(again.path).st_mtime_ns == st.st_mtime_ns
    assert read_hit(again) == body_of("http://e.com/a", 100_000)


def test_304_update_of_a_small_inline_entry_keeps_the_body(store):
    assert fill(store, "http://e.com/s", 500)
    hit = store.lookup("http://e.com/s", [])
    assert store.update(hit, hit.stored.with_(headers=[("X-New", "1")]))
    store.memory.clear()
    again = store.lookup("http://e.com/s", [])
    assert again.stored.headers == [("X-New", "1")] and again.body == body_of("http://e.com/s", 500)


def test_vary_variants_are_stored_and_found_separately(store):
    url = "http://e.com/v"
    for enc in ("gzip", "br"):
        f = store.begin_fill(url, head(5, ("Vary", "Accept-Encoding"), vary_pairs=[("accept-encoding", enc)]))
        f.write(enc.encode().ljust(5, b"."))
        assert f.commit()
    assert store.lookup(url, [("Accept-Encoding", "GZIP")]).body == b"gzip."
    assert store.lookup(url, [("Accept-Encoding", "br")]).body == b"br..."
    assert store.lookup(url, [("Accept-Encoding", "identity")]) is None
    assert store.lookup(url, []) is None


def test_a_response_without_vary_replaces_all_variants(store):
    url = "http://e.com/v"
    f = store.begin_fill(url, head(1, ("Vary", "Accept-Encoding"), vary_pairs=[("accept-encoding", "gzip")]))
    f.write(b"g")
    assert f.commit()
    assert fill(store, url, 3)
    assert store.lookup(url, [("Accept-Encoding", "gzip")]).body == body_of(url, 3)
    assert store.urls() == [url] and store.stats()["entries"] == 1


def test_purge_removes_every_variant(store):
    url = "http://e.com/v"
    for enc in ("gzip", "br"):
        f = store.begin_fill(url, head(1, ("Vary", "Accept-Encoding"), vary_pairs=[("accept-encoding", enc)]))
        f.write(b"x")
        assert f.commit()
    assert fill(store, "http://e.com/v2", 10)
    assert store.purge(url)
    assert store.lookup(url, [("Accept-Encoding", "gzip")]) is None
    assert store.lookup(url, [("Accept-Encoding", "br")]) is None
    assert store.lookup("http://e.com/v2", []) is not None
    assert not store.purge(url)


def test_purge_by_prefix_domain_and_all_with_dry_run(store):
    urls = ["http://e.com/a/1", "http://e.com/a/2", "http://e.com/b", "http://sub.e.com/x",
            "http://note.com/y", "http://e.com:8080/p"]
    for u in urls:
        assert fill(store, u, 100_000 if u.endswith("1") else 10)
    assert store.purge_prefix("http://e.com/a/", dry_run=True) == ["http://e.com/a/1", "http://e.com/a/2"]
    assert store.lookup("http://e.com/a/1", []) is not None
    assert store.purge_prefix("http://e.com/a/") == ["http://e.com/a/1", "http://e.com/a/2"]
    assert store.lookup("http://e.com/a/1", []) is None and store.lookup("http://e.com/b", []) is not None
    assert sorted(store.purge_domain("e.com")) == ["http://e.com/b", "http://e.com:8080/p", "http://sub.e.com/x"]
    assert store.purge_all() == ["http://note.com/y"]
    assert store.stats()["entries"] == 0
    assert [f for _, _, files in os.walk(store.directory) for f in files if f.endswith(".val")] == []


def test_invalidate_removes_the_listed_urls(store):
    assert fill(store, "http://e.com/a", 10)
    assert store.invalidate(["http://e.com/a", "http://e.com/never"]) == 1
    assert store.lookup("http://e.com/a", []) is None


def test_stats_count_hits_misses_and_bytes_saved(store):
    assert fill(store, "http://e.com/a", 10)
    store.count_hit(10, memory=True)
    store.count_hit(10)
    store.count_miss()
    s = store.stats()
    assert (s["entries"], s["hits"], s["mem_hits"], s["misses"], s["bytes_saved"]) == (1, 2, 1, 1, 20)
    assert s["hit_ratio"] == pytest.approx(2 / 3) and s["capacity"] == 64 << 20 and s["bytes"] > 0


def test_stats_are_shared_with_other_processes(store):
    store.count_hit(100)
    store.flush()
    code = """
        import sys
        from cache.store import Store
        s = Store(sys.argv[1])
        s.count_hit(50); s.count_miss(); s.close()
        print(Store(sys.argv[1]).stats()["hits"])
    """
    out = run_py(code, store.directory)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
    s = store.stats()
    assert (s["hits"], s["misses"], s["bytes_saved"]) == (2, 1, 150)


def test_memory_tier_drops_an_entry_purged_by_another_process(store):
    assert fill(store, "http://e.com/hot", 100)
    assert store.lookup("http://e.com/hot", []).in_memory
    out = run_py("import sys\nfrom cache.store import Store\nprint(Store(sys.argv[1]).purge('http://e.com/hot'))",
                 store.directory)
    assert out.stdout.strip() == "True", out.stderr
    assert store.lookup("http://e.com/hot", []) is None  # the very next lookup: no memory-tier lag


def test_popularity_is_written_in_batches_not_per_hit(store):
    assert fill(store, "http://e.com/p", 10)
    store.flush_interval = 3600
    for _ in range(5):
        store.lookup("http://e.com/p", [])
    sql = "SELECT access_count FROM Cache WHERE key = ?"
    assert store._sql(sql, ("http://e.com/p",)).fetchone()[0] == 0
    store.flush()
    assert store._sql(sql, ("http://e.com/p",)).fetchone()[0] == 5


def test_eviction_keeps_small_popular_objects_over_large_rarely_used_ones(tmp_path):
    clock = Clock()
    s = Store(str(tmp_path / "c"), capacity=3 << 20, clock=clock)
    small = [f"http://e.com/small/{i}" for i in range(30)]
    large = [f"http://e.com/large/{i}" for i in range(30)]
    for u in small:
        assert fill(s, u, 2048)
    for u in small:  # popular: asked for again and again
        for _ in range(5):
            assert s.lookup(u, []) is not None
    s.flush()
    for u in large:  # 30 x 200 KiB = 6 MiB through a 3 MiB cache, each used once
        clock.t += 1
        assert fill(s, u, 200 << 10)
        s.lookup(u, [])
    s.maintain()
    survivors = [u for u in large if s.lookup(u, []) is not None]
    assert all(s.lookup(u, []) is not None for u in small)
    assert len(survivors) < len(large) / 2
    assert s.stats()["bytes"] <= 3 << 20
    s.close()


def test_expired_entries_nobody_asked_for_go_first(tmp_path):
    clock = Clock()
    s = Store(str(tmp_path / "c"), capacity=1 << 20, clock=clock, cull_limit=1)
    assert fill(s, "http://e.com/expired", 100 << 10, cc="max-age=1")
    assert fill(s, "http://e.com/fresh", 100 << 10, cc="max-age=86400")
    clock.t += 10
    i = 0
    while s.lookup("http://e.com/expired", []) is not None:
        s.memory.clear()
        assert fill(s, f"http://e.com/filler/{i}", 100 << 10)
        i += 1
        assert i < 50
    s.memory.clear()
    assert s.lookup("http://e.com/fresh", []) is not None
    s.close()


def test_kill_9_mid_fill_leaves_nothing_servable(tmp_path):
    d = str(tmp_path / "c")
    code = """
        import sys, time
        from cache.model import StoredResponse
        from cache.store import Store
        s = Store(sys.argv[1])
        h = StoredResponse(200, "OK", [("Content-Length", str(8 << 20))], 0.0, 0.0, (), None)
        f = s.begin_fill("http://e.com/big", h)
        f.write(b"x" * (3 << 20))
        print("half", flush=True)
        time.sleep(60)
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), d], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "half"
        assert len(os.listdir(os.path.join(d, "tmp"))) == 1  # the partial body is on disk...
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    s = Store(d)
    assert s.lookup("http://e.com/big", []) is None
    assert os.listdir(os.path.join(d, "tmp")) == []  # ...and reopening removed it
    s.close()


def test_kill_9_at_any_point_of_many_fills_leaves_only_complete_entries(tmp_path):
    d = str(tmp_path / "c")
    code = """
        import sys
        from cache.model import StoredResponse
        from cache.store import Store
        s = Store(sys.argv[1], capacity=4 << 20)
        i = 0
        while True:
            key = f"http://e.com/{i % 40}"
            size = 1000 + (i * 7919) % 300000
            h = StoredResponse(200, "OK", [("Content-Length", str(size)), ("X-Seq", str(i))], 0.0, 0.0, (), None)
            f = s.begin_fill(key, h)
            data = str(i).encode().ljust(size, b".")
            for j in range(0, size, 65536):
                f.write(data[j:j + 65536])
            f.commit()
            i += 1
            if i == 60:
                print("running", flush=True)
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), d], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "running"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    s = Store(d)
    seen = 0
    for n in range(40):
        hit = s.lookup(f"http://e.com/{n}", [])
        if hit is None:
            continue
        seen += 1
        seq = dict(hit.stored.headers)["X-Seq"]
        body = read_hit(hit)
        assert len(body) == hit.stored.body_size == int(dict(hit.stored.headers)["Content-Length"])
        assert body == seq.encode().ljust(len(body), b".")
    assert seen > 0
    assert os.listdir(os.path.join(d, "tmp")) == []
    s.close()


async def test_concurrent_misses_wait_for_one_fill(store):
    flight, leader = store.flights.join("http://e.com/c")
    assert leader
    waiters = []
    for _ in range(3):
        f2, lead2 = store.flights.join("http://e.com/c")
        assert not lead2 and f2 is flight
        waiters.append(asyncio.ensure_future(f2.wait(30)))
    await asyncio.sleep(0)
    f = store.begin_fill("http://e.com/c", head(3))
    f.write(b"abc")
    assert f.commit()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert store.lookup("http://e.com/c", []).body == b"abc"
    assert store.flights.get("http://e.com/c") is None


async def test_waiters_are_told_when_the_fill_fails(store):
    flight, _ = store.flights.join("http://e.com/c")
    w = asyncio.ensure_future(store.flights.join("http://e.com/c")[0].wait(30))
    await asyncio.sleep(0)
    f = store.begin_fill("http://e.com/c", head(10))
    f.write(b"abc")
    assert not f.commit()
    assert await w is False


async def test_collapsed_wait_is_bounded(store):
    store.flights.join("http://e.com/slow")
    flight, leader = store.flights.join("http://e.com/slow")
    assert not leader
    assert await flight.wait(0.01) is False


def test_a_hit_being_served_survives_a_purge_by_another_process(store):
    assert fill(store, "http://e.com/big", 300_000)
    hit = store.lookup("http://e.com/big", [])
    out = run_py("import sys\nfrom cache.store import Store\nprint(Store(sys.argv[1]).purge('http://e.com/big'))",
                 store.directory)
    assert out.stdout.strip() == "True", out.stderr
    assert not os.path.exists(hit.path)
    assert read_hit(hit) == body_of("http://e.com/big", 300_000)  # the open file keeps its bytes
    assert store.lookup("http://e.com/big", []) is None  # and the next lookup misses


def test_head_of_a_large_entry_is_kept_in_memory_but_the_body_is_read_from_disk(store):
    assert fill(store, "http://e.com/big", 300_000)
    with store.lookup("http://e.com/big", []) as hit:
        assert hit.body is None and not hit.in_memory and hit.file is not None
    assert store.memory.get(hit.key) is not None


def test_two_processes_fill_one_directory_at_the_same_time(tmp_path):
    d = str(tmp_path / "c")
    Store(d).close()
    code = """
        import sys
        from cache.model import StoredResponse
        from cache.store import Store
        s = Store(sys.argv[1])
        for i in range(40):
            key = f"http://e.com/{sys.argv[2]}/{i}"
            size = 100 + i * 3001
            f = s.begin_fill(key, StoredResponse(200, "OK", [("Content-Length", str(size))], 0.0, 0.0, (), None))
            f.write(key.encode().ljust(size, b"."))
            assert f.commit(), key
            s.count_hit(1)
        s.close()
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), d, name], env=env)
             for name in ("p1", "p2")]
    assert [p.wait(60) for p in procs] == [0, 0]
    s = Store(d)
    for name in ("p1", "p2"):
        for i in range(40):
            key = f"http://e.com/{name}/{i}"
            assert read_hit(s.lookup(key, [])) == key.encode().ljust(100 + i * 3001, b".")
    st = s.stats()
    assert st["entries"] == 80 and st["hits"] == 80
    s.close()


def test_cull_walks_the_score_index_after_a_reopen(tmp_path):
    # Bounded eviction work: the cull query must read the lowest scores off an index, not sort
    # the whole table (diskcache drops that index on open unless told to keep it).
    Store(str(tmp_path / "c")).close()
    s = Store(str(tmp_path / "c"))
    plan = s._sql("EXPLAIN QUERY PLAN SELECT rowid FROM Cache WHERE tag IS NOT NULL ORDER BY tag LIMIT 4").fetchall()
    assert "INDEX Cache_tag_rowid" in str(plan) and "TEMP B-TREE" not in str(plan)
    s.close()


def test_a_file_backed_body_small_enough_for_memory_is_served_from_memory_after_its_first_hit(store):
    assert fill(store, "http://e.com/m", 64 << 10)  # stored in a file (above the inline size)
    first = store.lookup("http://e.com/m", [])
    second = store.lookup("http://e.com/m", [])
    assert first.body == second.body == body_of("http://e.com/m", 64 << 10)
    assert second.in_memory and second.file is None


class FailingFile:
    """A body file whose writes fail as on a full disk."""

    def __init__(self, path: str) -> None:
        self.path = path
        open(path, "wb").close()

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device", self.path)

    def close(self) -> None:
        raise OSError(28, "No space left on device", self.path)


async def test_a_write_error_abandons_the_fill_quietly_releases_its_waiters_and_removes_its_file(store, monkeypatch):
    def failing_open(path, mode="r", *args, **kw):
        return FailingFile(path) if "w" in mode else builtins.open(path, mode, *args, **kw)

    monkeypatch.setattr(cache.fill, "open", failing_open, raising=False)
    store.flights.join("http://e.com/full")
    waiter = asyncio.ensure_future(store.flights.join("http://e.com/full")[0].wait(30))
    await asyncio.sleep(0)
    f = store.begin_fill("http://e.com/full", head(100_000))
    for _ in range(10):
        f.write(b"x" * 10_000)  # never raises
    assert not f.active and not f.commit()
    assert await waiter is False
    assert tmp_files(store) == [] and store.lookup("http://e.com/full", []) is None
    assert store.write_failures.unreported == 1 and "No space left on device" in store.write_failures.reason


def test_a_fill_in_a_directory_that_cannot_be_written_stores_nothing_and_raises_nothing(store, monkeypatch):
    monkeypatch.setattr(store, "tmp_path", lambda: os.path.join(store.directory, "gone", "x.part"))
    f = store.begin_fill("http://e.com/ro", head(50_000))
    f.write(b"y" * 50_000)
    assert not f.commit() and store.lookup("http://e.com/ro", []) is None
    assert store.write_failures.failing
    assert fill(store, "http://e.com/small", 100)  # inline entries still go to SQLite
    assert not store.write_failures.failing


def test_a_body_file_that_cannot_be_removed_now_is_removed_by_maintain(store, monkeypatch):
    path = os.path.join(store.directory, "tmp", "left.part")
    open(path, "wb").close()
    real_unlink = os.unlink

    def read_only(p):
        raise OSError(30, "Read-only file system", p)

    monkeypatch.setattr(os, "unlink", read_only)
    store.discard(path)
    assert os.path.exists(path)
    monkeypatch.setattr(os, "unlink", real_unlink)
    store.maintain()
    assert not os.path.exists(path)


def test_write_failures_are_reported_at_most_once_a_minute_and_recovery_once():
    w = WriteFailures(every=60)
    assert w.report(0) is None
    for _ in range(17):
        w.failed("writing a body", OSError(28, "No space left on device"))
    line = w.report(100)
    assert line is not None and "No space left on device" in line and "17 failed write(s)" in line
    w.failed("storing an entry", OSError(28, "No space left on device"))
    assert [w.report(t) for t in (101, 130, 159.9)] == [None, None, None]
    line = w.report(160)
    assert line is not None and "1 failed write(s)" in line and "storing an entry" in line
    w.stored()
    assert w.report(161) == "cache: storing again"
    assert w.report(162) is None
    w.stored()  # nothing failed since: nothing to say
    assert w.report(300) is None


def test_storage_flapping_between_failing_and_working_logs_at_most_one_line_of_each_kind_a_minute():
    w = WriteFailures(every=60)
    lines = []
    for t in range(120):  # a failure and a success every second for two minutes
        w.failed("writing a body", OSError(28, "No space left on device"))
        lines.append(w.report(t))
        w.stored()
        lines.append(w.report(t + 0.5))
    said = [line for line in lines if line]
    assert [line.split(" (")[0].split(";")[0] for line in said] == ["cache: cannot store", "cache: storing again"] * 2


def test_a_purge_on_a_full_disk_raises_one_clear_error_and_an_invalidation_raises_none(store, monkeypatch):
    assert fill(store, "http://e.com/stuck", 100)
    assert store.lookup("http://e.com/stuck", []).in_memory

    def full(*args, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store._cache, "transact", full)
    with pytest.raises(StoreWriteError, match="database or disk is full"):
        store.purge("http://e.com/stuck")
    assert store.invalidate(["http://e.com/stuck"]) == 0
    assert store.write_failures.failing
    hit = store.lookup("http://e.com/stuck", [])
    assert hit is not None and not hit.in_memory  # the memory copy went; the row could not


async def test_a_fill_that_released_its_waiters_still_stores_and_never_ends_the_next_flight(store):
    flight, _ = store.flights.join("http://e.com/r")
    f = store.begin_fill("http://e.com/r", head(3))
    f.release_waiters()  # its client stopped reading
    assert await flight.wait(1) is False
    newer, leader = store.flights.join("http://e.com/r")
    assert leader and newer is not flight
    f.write(b"abc")
    assert f.commit() and store.lookup("http://e.com/r", []).body == b"abc"
    assert store.flights.get("http://e.com/r") is newer and newer.committed is None


def test_the_purge_generation_is_shared_through_the_directory_and_never_repeats(tmp_path):
    a, b = Generation(str(tmp_path)), Generation(str(tmp_path))  # as two processes would map it
    seen = {a.value()}
    for _ in range(5):
        token = b.bump()
        assert a.value() == token and token not in seen
        seen.add(token)
    out = run_py("import sys\nfrom cache.generation import Generation\nGeneration(sys.argv[1]).bump()", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert a.value() not in seen


def test_a_database_that_turned_read_only_stores_nothing_and_leaves_no_body_file(store, monkeypatch):
    def read_only(*args, **kw):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(store._cache, "transact", read_only)
    f = store.begin_fill("http://e.com/ro-db", head(100_000))
    f.write(b"z" * 100_000)  # a body file
    assert not f.commit()
    assert tmp_files(store) == [] and store.write_failures.failing
    assert "readonly database" in store.write_failures.reason
    monkeypatch.undo()
    assert store.lookup("http://e.com/ro-db", []) is None
    files = [n for _, _, names in os.walk(store.directory) for n in names if n.endswith(".val")]
    assert files == []  # the body renamed into place was removed again
