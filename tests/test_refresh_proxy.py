"""Active refresh end to end: a real webproxy process (refresher on), a real origin that counts
full and conditional requests, a real client. Short max-age values and small windows; every
wait is a bounded poll."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.support import ROOT, Origin, ProxyProcess

REFRESH = {"enabled": True, "window": 0.5, "min_window": 1.0, "popularity_window": 60.0, "min_hits": 2,
           "max_per_second": 50.0, "max_concurrent": 4, "max_client_rate": 10000.0, "max_upstream_fetches": 32,
           "interval": 0.1}


@pytest.fixture
def make_refreshing_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    procs: list[ProxyProcess] = []

    def make(refresh: dict[str, Any] | None = None, **sections: dict[str, Any]) -> ProxyProcess:
        d = tmp_path / f"proxy{len(procs)}"
        d.mkdir()
        p = ProxyProcess(d, {"refresh": {**REFRESH, **(refresh or {})}, **sections})
        procs.append(p)
        return p.start()

    yield make
    for p in procs:
        p.stop()


class Obj:
    """One origin object with an ETag; counts full and conditional requests and what it answered."""

    def __init__(self, body: bytes, max_age: int = 4, delay: float = 0.0, group: list[int] | None = None) -> None:
        self.group = group if group is not None else [0, 0]  # [in flight, most in flight] across objects
        self.body = body
        self.max_age = max_age
        self.delay = delay
        self.version = 1
        self.fail = False
        self.full = 0
        self.conditional = 0
        self.answered: list[int] = []
        self.seen: list[dict[str, str]] = []  # request fields, in order
        self.vary: str | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.conditional_starts: list[float] = []

    @property
    def requests(self) -> int:
        return self.full + self.conditional

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        inm = request.headers.get("If-None-Match")
        if inm is None:
            self.full += 1
        else:
            self.conditional += 1
            self.conditional_starts.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.group[0] += 1
        self.group[1] = max(self.group[1], self.group[0])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            variant = request.headers.get(self.vary, "") if self.vary else ""
            etag = f'"v{self.version}{variant}"'
            fields = {"Cache-Control": f"max-age={self.max_age}", "ETag": etag}
            if self.vary:
                fields["Vary"] = self.vary
            if self.fail:
                resp = web.Response(status=503, text="down\n")
            elif inm == etag:
                resp = web.Response(status=304, headers=fields)
            else:
                body = self.body if self.version == 1 else self.body.upper()
                resp = web.Response(body=body, headers={**fields, "Content-Type": "text/plain"})
            self.answered.append(resp.status)
            return resp
        finally:
            self.in_flight -= 1
            self.group[0] -= 1


def serve(origin: Origin, objs: dict[str, Obj]) -> Origin:
    for path, obj in objs.items():
        origin.route("GET", path, obj.handle)
    return origin.start()


def get(proxy: ProxyProcess, url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """(status, X-Cache, body) of one request through the proxy."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request("GET", url, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("X-Cache") or "", resp.read()
    finally:
        conn.close()


def wait_until(pred: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def make_popular(proxy: ProxyProcess, url: str, hits: int = 3, headers: dict[str, str] | None = None) -> None:
    status, xcache, _ = get(proxy, url, headers)
    assert status == 200 and xcache.startswith("MISS")
    for _ in range(hits):
        assert get(proxy, url, headers)[1].startswith("HIT")


def cache_stats(proxy: ProxyProcess) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "webproxy", "cache", "-c", str(proxy.config_path), "stats", "--json"],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def refresh_lines(proxy: ProxyProcess, wait_for: str, timeout: float = 10.0) -> list[str]:
    lines: list[str] = []

    def found() -> bool:
        nonlocal lines
        lines = [ln for ln in proxy.access_lines() if "ACTIVE_REFRESH" in ln]
        return any(wait_for in ln for ln in lines)

    wait_until(found, timeout)
    return lines


def body_files(proxy: ProxyProcess) -> list[tuple[str, int, int]]:
    """(path, inode, mtime_ns) of every stored body file."""
    out = []
    for root, _, files in os.walk(proxy.tmp / "cache"):
        for name in files:
            if name.endswith(".val"):
                st = os.stat(os.path.join(root, name))
                out.append((os.path.join(root, name), st.st_ino, st.st_mtime_ns))
    return sorted(out)


def test_popular_object_is_refreshed_in_its_window_and_the_next_request_is_a_hit_without_the_origin(
        make_origin, make_refreshing_proxy):
    pop = Obj(b"popular\n")
    origin = serve(make_origin(), {"/pop": pop})
    proxy = make_refreshing_proxy()
    make_popular(proxy, origin.url("/pop"))
    assert wait_until(lambda: pop.conditional >= 1)
    before = pop.requests
    status, xcache, body = get(proxy, origin.url("/pop"))
    assert (status, body) == (200, b"popular\n") and xcache.startswith("HIT")
    assert pop.requests == before and pop.full == 1 and pop.answered[1] == 304
    lines = refresh_lines(proxy, "TCP_ACTIVE_REFRESH_UNMODIFIED/304")
    assert lines and re.match(r"\S+ +\d+ - TCP_ACTIVE_REFRESH_UNMODIFIED/304 0 GET http://127\.0\.0\.1:\d+/pop - "
                              r"HIER_DIRECT/127\.0\.0\.1 text/plain$", lines[0]), lines


def test_unpopular_object_is_left_to_expire(make_origin, make_refreshing_proxy):
    pop, cold = Obj(b"popular\n"), Obj(b"cold\n")
    origin = serve(make_origin(), {"/pop": pop, "/cold": cold})
    proxy = make_refreshing_proxy()
    assert get(proxy, origin.url("/cold"))[1].startswith("MISS")
    assert get(proxy, origin.url("/cold"))[1].startswith("HIT")  # one hit: below min_hits = 2
    stored = time.monotonic()
    make_popular(proxy, origin.url("/pop"))
    # Until the cold object has expired (and the popular one has been refreshed meanwhile):
    assert wait_until(lambda: pop.conditional >= 1 and time.monotonic() > stored + cold.max_age + 0.5)
    assert (cold.full, cold.conditional) == (1, 0)
    get(proxy, origin.url("/cold"))
    assert cold.conditional == 1  # the client waits for the revalidation


def test_a_304_extends_freshness_without_rewriting_the_body(make_origin, make_refreshing_proxy):
    body = bytes(range(256)) * 400  # 100 KiB: stored as a file
    pop = Obj(body)
    origin = serve(make_origin(), {"/big": pop})
    proxy = make_refreshing_proxy()
    make_popular(proxy, origin.url("/big"))
    stored_at = time.monotonic()
    files = body_files(proxy)
    assert len(files) == 1
    assert wait_until(lambda: pop.conditional >= 1)
    # Past the moment the original response went stale: still a fresh hit, from the same file.
    assert wait_until(lambda: time.monotonic() > stored_at + pop.max_age + 0.2)
    before = pop.requests
    status, xcache, got = get(proxy, origin.url("/big"))
    assert (status, got) == (200, body) and xcache.startswith("HIT") and pop.requests == before
    assert body_files(proxy) == files
    assert pop.full == 1 and set(pop.answered[1:]) == {304}
    # `webproxy cache stats` counts the refresh, its 304, and the hit it produced.
    stats: dict[str, Any] = {}

    def counted() -> bool:
        nonlocal stats
        stats = cache_stats(proxy)
        return stats["refresh_hits"] >= 1

    assert wait_until(counted), stats
    assert stats["refreshes"] >= 1 and stats["refresh_304"] == stats["refreshes"] and stats["refresh_failed"] == 0


def test_refresh_sends_the_vary_selected_fields_stored_with_the_entry(make_origin, make_refreshing_proxy):
    pop = Obj(b"negotiated\n")
    pop.vary = "Accept-Language"
    origin = serve(make_origin(), {"/v": pop})
    proxy = make_refreshing_proxy()
    make_popular(proxy, origin.url("/v"), headers={"Accept-Language": "fr"})
    assert get(proxy, origin.url("/v"), {"Accept-Language": "de"})[1].startswith("MISS")  # the other, unpopular
    assert wait_until(lambda: pop.conditional >= 1)
    refresh = next(h for h in pop.seen if "If-None-Match" in h)
    assert refresh["If-None-Match"] == '"v1fr"' and refresh["Accept-Language"] == "fr"
    assert pop.answered[pop.seen.index(refresh)] == 304
    before = pop.requests
    assert get(proxy, origin.url("/v"), {"Accept-Language": "fr"})[1].startswith("HIT") and pop.requests == before


def test_a_changed_object_is_replaced_by_the_refresh(make_origin, make_refreshing_proxy):
    pop = Obj(b"version one\n")
    origin = serve(make_origin(), {"/doc": pop})
    proxy = make_refreshing_proxy()
    make_popular(proxy, origin.url("/doc"))
    pop.version = 2
    assert wait_until(lambda: 200 in pop.answered[1:])
    refresh_lines(proxy, "TCP_ACTIVE_REFRESH_MODIFIED/200")
    before = pop.requests
    status, xcache, got = get(proxy, origin.url("/doc"))
    assert (status, got) == (200, b"VERSION ONE\n") and xcache.startswith("HIT") and pop.requests == before
    assert pop.full == 1  # the replacement came from the conditional request's 200


def test_an_origin_error_leaves_the_stored_entry_untouched(make_origin, make_refreshing_proxy):
    body = b"keep me\n" * 8192  # 64 KiB: stored as a file
    pop = Obj(body)
    origin = serve(make_origin(), {"/k": pop})
    proxy = make_refreshing_proxy()
    make_popular(proxy, origin.url("/k"))
    files = body_files(proxy)
    pop.fail = True
    assert wait_until(lambda: 503 in pop.answered)
    lines = refresh_lines(proxy, "TCP_ACTIVE_REFRESH_FAIL/503")
    assert any("TCP_ACTIVE_REFRESH_FAIL/503" in ln for ln in lines)
    before = pop.requests
    status, xcache, got = get(proxy, origin.url("/k"))  # still within the original freshness
    assert (status, got) == (200, body) and xcache.startswith("HIT") and pop.requests == before
    assert body_files(proxy) == files


def test_refresh_waits_while_upstream_fetches_are_at_the_threshold(make_origin, make_refreshing_proxy):
    pop = Obj(b"popular\n")
    origin = serve(make_origin(), {"/pop": pop})
    proxy = make_refreshing_proxy({"max_upstream_fetches": 1})
    make_popular(proxy, origin.url("/pop"))
    stored_at = time.monotonic()
    # A client fetch that holds one upstream fetch open until the object has expired.
    slow = threading.Thread(target=get, args=(proxy, origin.url(f"/slow?s={pop.max_age + 1}")))
    slow.start()
    slow.join(30)
    assert time.monotonic() > stored_at + pop.max_age
    assert pop.conditional == 0 and not [ln for ln in proxy.access_lines() if "ACTIVE_REFRESH" in ln]
    # Quiet again: the next request pays for the revalidation, and the refresher resumes after it.
    get(proxy, origin.url("/pop"))
    assert pop.conditional == 1
    lines = refresh_lines(proxy, "TCP_ACTIVE_REFRESH_UNMODIFIED")
    assert any("TCP_ACTIVE_REFRESH_UNMODIFIED/304" in ln for ln in lines)


def test_refresh_waits_while_the_client_request_rate_is_above_the_threshold(make_origin, make_refreshing_proxy):
    pop = Obj(b"popular\n")
    origin = serve(make_origin(), {"/pop": pop})
    proxy = make_refreshing_proxy({"max_client_rate": 5.0})
    make_popular(proxy, origin.url("/pop"))
    stored_at = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    busy = 0
    while time.monotonic() < stored_at + pop.max_age + 0.5:  # far above 5 requests/s, past expiry
        conn.request("GET", origin.url("/pop"))
        conn.getresponse().read()
        busy += 1
        time.sleep(0.01)
    conn.close()
    assert busy > 10 * (pop.max_age + 0.5)
    assert not [ln for ln in proxy.access_lines() if "ACTIVE_REFRESH" in ln]
    assert pop.conditional >= 1  # the clients revalidated it themselves, after it expired


def test_caps_hold_under_a_burst_of_objects_expiring_together(make_origin, make_refreshing_proxy):
    group = [0, 0]
    objs = {f"/o{i}": Obj(f"object {i}\n".encode(), max_age=8, delay=0.3, group=group) for i in range(12)}
    origin = serve(make_origin(), objs)
    proxy = make_refreshing_proxy({"max_per_second": 4.0, "max_concurrent": 2})
    for path in objs:
        make_popular(proxy, origin.url(path))
    # On a loaded machine the first refreshes may start while the last client misses are still at
    # the origin; the cap is on the refresher, so count from here on, when only refreshes are left.
    group[1] = group[0]
    assert wait_until(lambda: all(o.conditional >= 1 for o in objs.values()), timeout=30)
    # Never more than max_concurrent refreshes at once at the origin...
    assert 1 <= group[1] <= 2
    starts = sorted(o.conditional_starts[0] for o in objs.values())
    # ...and spread out: 4 per second with a burst of at most 4 takes at least 2 s for 12.
    assert starts[-1] - starts[0] >= 1.9
    assert all(o.full == 1 for o in objs.values())  # every refresh a 304, no client had to wait


def _lock_holders(lock: Path) -> list[int]:
    ino = os.stat(lock).st_ino
    pids = []
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].split(":")[-1] == str(ino):
            pids.append(int(parts[4]))
    return pids


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_one_refresher_per_cache_directory_with_two_worker_processes(make_origin, make_refreshing_proxy):
    # The other worker's uses reach the directory within its maintenance interval (5 s): a
    # lifetime long enough for them to count before the window.
    pop = Obj(b"popular\n", max_age=12)
    origin = serve(make_origin(), {"/pop": pop})
    proxy = make_refreshing_proxy(server={"workers": 2})
    assert proxy.proc is not None
    pid = proxy.proc.pid
    assert wait_until(lambda: len(_children(pid)) == 2)
    workers = _children(pid)
    lock = proxy.tmp / "cache" / "refresh.lock"
    assert wait_until(lock.exists)
    holders: list[int] = []

    def one_holder() -> bool:
        nonlocal holders
        holders = _lock_holders(lock)
        return len(holders) == 1

    assert wait_until(one_holder)
    assert holders[0] in workers
    # Requests land on either worker; a worker may not see the other's fill until it commits.
    hits = 0
    for _ in range(50):
        hits += get(proxy, origin.url("/pop"))[1].startswith("HIT")
        if hits == 6:
            break
    assert hits == 6
    assert wait_until(lambda: pop.conditional >= 1)
    first = holders[0]
    # The holder goes away: the other worker takes over.
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: one_holder() and holders[0] != first)
    assert holders[0] in workers
