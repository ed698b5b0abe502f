"""`webproxy purge` and `webproxy cache stats`, run as the user runs them (subprocesses) against a
store filled by the test, which stays open like a running proxy's."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from cache.model import StoredResponse
from cache.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The real entry point; until every subcommand module exists on this branch (the dispatcher
# imports them all), the same two subcommands are dispatched by an equivalent shim.
_ENTRY = ["-m", "webproxy"] if importlib.util.find_spec("webproxy.cmd_run") else ["-c", """
import argparse, sys
from webproxy import cmd_cache
p = argparse.ArgumentParser(prog="webproxy")
sub = p.add_subparsers(dest="command")
cmd_cache.add_purge_arguments(sub.add_parser("purge"))
cmd_cache.add_cache_arguments(sub.add_parser("cache"))
a = p.parse_args()
sys.exit(cmd_cache.purge_main(a) if a.command == "purge" else cmd_cache.cache_main(a))
"""]


def webproxy(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *_ENTRY, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def put(store: Store, url: str, body: bytes, vary_pairs=()) -> None:
    headers = [("Content-Length", str(len(body)))]
    if vary_pairs:
        headers.append(("Vary", ", ".join(n for n, _ in vary_pairs)))
    f = store.begin_fill(url, StoredResponse(200, "OK", headers, 0.0, 0.0, tuple(vary_pairs), None))
    f.write(body)
    assert f.commit()


@pytest.fixture
def setup(tmp_path):
    d = tmp_path / "cache"
    conf = tmp_path / "webproxy.toml"
    conf.write_text(f'[cache]\ndirectory = "{d}"\n')
    store = Store(str(d), capacity=8 << 20)
    put(store, "http://e.com/a", b"a" * 100)
    put(store, "http://e.com/v", b"g", [("accept-encoding", "gzip")])
    put(store, "http://e.com/v", b"b", [("accept-encoding", "br")])
    put(store, "http://e.com/dir/1", b"1" * 50_000)
    put(store, "http://e.com/dir/2", b"2")
    put(store, "http://img.e.com/x.png", b"x")
    put(store, "http://other.org/y", b"y")
    yield store, str(conf)
    store.close()


def test_purge_removes_a_url_and_prints_it(setup):
    store, conf = setup
    r = webproxy("purge", "-c", conf, "http://E.com/a")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["http://e.com/a"]
    assert store.lookup("http://e.com/a", []) is None


def test_purge_removes_all_vary_variants(setup):
    store, conf = setup
    r = webproxy("purge", "-c", conf, "http://e.com/v")
    assert r.returncode == 0 and r.stdout.splitlines() == ["http://e.com/v"]
    assert store.lookup("http://e.com/v", [("Accept-Encoding", "gzip")]) is None
    assert store.lookup("http://e.com/v", [("Accept-Encoding", "br")]) is None


def test_purge_exits_1_when_a_url_was_not_cached(setup):
    store, conf = setup
    r = webproxy("purge", "-c", conf, "http://e.com/a", "http://e.com/nope")
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["http://e.com/a"] and "not cached: http://e.com/nope" in r.stderr


def test_purge_prefix(setup):
    store, conf = setup
    r = webproxy("purge", "-c", conf, "--prefix", "http://e.com/dir/")
    assert r.returncode == 0 and r.stdout.splitlines() == ["http://e.com/dir/1", "http://e.com/dir/2"]
    assert store.lookup("http://e.com/a", []) is not None


def test_purge_domain_includes_subdomains(setup):
    store, conf = setup
    r = webproxy("purge", "-c", conf, "--domain", "e.com")
    assert r.returncode == 0
    assert sorted(r.stdout.splitlines()) == sorted(
        ["http://e.com/a", "http://e.com/v", "http://e.com/dir/1", "http://e.com/dir/2", "http://img.e.com/x.png"]
    )
    assert store.urls() == ["http://other.org/y"]


def test_purge_dry_run_removes_nothing(setup):
    store, conf = setup
    r = webproxy("purge", "-c", conf, "--dry-run", "--all")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 6
    assert len(store.urls()) == 6


def test_purge_all(setup):
    store, conf = setup
    r = webproxy("purge", "-c", conf, "--all")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 6
    assert store.urls() == []


def test_after_purge_returns_the_running_stores_next_lookup_is_a_miss(setup):
    store, conf = setup
    for url in ("http://e.com/a", "http://e.com/dir/2", "http://other.org/y"):
        store.lookup(url, [])  # (each purge empties the memory tier: load it again)
        assert store.lookup(url, []).in_memory
        assert webproxy("purge", "-c", conf, url).returncode == 0
        assert store.lookup(url, []) is None  # no lag: the memory copy is gone at once


def test_cache_stats_shows_the_running_stores_numbers(setup):
    store, conf = setup
    store.count_hit(100, memory=True)
    store.count_hit(50_000)
    store.count_miss()
    store.flush()
    r = webproxy("cache", "-c", conf, "stats", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["entries"], s["hits"], s["misses"], s["bytes_saved"], s["capacity"]) == (7, 2, 1, 50_100, 8 << 20)
    text = webproxy("cache", "-c", conf, "stats").stdout
    assert "hit ratio    66.7%" in text and "entries      7" in text


def test_commands_on_a_missing_cache_directory_fail_clearly(tmp_path):
    conf = tmp_path / "w.toml"
    conf.write_text(f'[cache]\ndirectory = "{tmp_path / "none"}"\n')
    r = webproxy("cache", "-c", str(conf), "stats")
    assert r.returncode == 1 and "no cache at" in r.stderr
