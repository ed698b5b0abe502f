"""A cache directory on a small tmpfs that fills up or turns read-only (issue 15, item 8): every
client still gets its whole response from the origin, nothing half-written is ever served, the
space of abandoned fills comes back, one log line says why the cache cannot store, and storing
resumes by itself when space returns. The tmpfs is mounted by the test (root or CAP_SYS_ADMIN)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support import curl, proxy_get

TMPFS_SIZE = 16 << 20
OBJECT_SIZE = 3 << 20  # larger than what is left free: every fill fails mid-body
CLIENTS = 30  # as many concurrent fills as the issue saw cut short


def mount(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["mount", *args], capture_output=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path):
    d = tmp_path / "cache"
    d.mkdir()
    r = mount("-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(d))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the cache directory (needs root or CAP_SYS_ADMIN): "
                    f"{r.stderr.decode(errors='replace').strip()}")
    yield d
    for sub in (d / "tmp", d):
        subprocess.run(["umount", "-l", str(sub)], capture_output=True, timeout=30)


@pytest.fixture
def disk_proxy(make_proxy, small_disk):
    return make_proxy({"refresh": {"enabled": False}, "cache": {"directory": str(small_disk)}})


def fill_up(d: Path, leave: int) -> Path:
    """Fill the filesystem of `d` with one file until only `leave` bytes are free."""
    filler = d / "filler"
    with open(filler, "wb") as f:
        block = b"\0" * (1 << 20)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def download_all(proxy, urls: list[str]) -> list[tuple[int, bytes]]:
    results: dict[str, tuple[int, bytes]] = {}

    def one(url: str) -> None:
        status, _, body = proxy_get(proxy, url, timeout=60)
        results[url] = (status, body)

    threads = [threading.Thread(target=one, args=(u,)) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return [results.get(u, (0, b"")) for u in urls]


def body_of(i: int) -> bytes:
    return bytes([i % 251]) * OBJECT_SIZE


def cannot_store_lines(proxy) -> list[str]:
    return [line for line in proxy.stderr().splitlines() if "cache: cannot store" in line]


def part_files(d: Path) -> list[str]:
    return os.listdir(d / "tmp")


def test_a_full_disk_never_cuts_a_download_and_storing_resumes_when_space_returns(disk_proxy, small_disk, origin):
    tag = f"full-{time.monotonic_ns()}"
    urls = [origin.put(f"{tag}-{i}", body_of(i), Cache_Control="max-age=600") for i in range(CLIENTS)]
    small = origin.put(f"{tag}-small", b"s" * 1000, Cache_Control="max-age=600")
    posted = origin.put(f"{tag}-posted", b"p" * 1000, Cache_Control="max-age=600")
    assert proxy_get(disk_proxy, posted)[2] == b"p" * 1000  # stored while there is space
    filler = fill_up(small_disk, leave=512 << 10)
    free_before = shutil.disk_usage(small_disk).free

    results = download_all(disk_proxy, urls)
    assert [(s, len(b)) for s, b in results] == [(200, OBJECT_SIZE)] * CLIENTS
    assert all(b == body_of(i) for i, (_, b) in enumerate(results))
    # The space of the abandoned fills came back.
    assert part_files(small_disk) == []
    assert shutil.disk_usage(small_disk).free >= free_before - (256 << 10)
    for _ in range(3):  # small objects too (inline in SQLite): served whole, whatever is stored
        assert proxy_get(disk_proxy, small)[2] == b"s" * 1000
    fill_up(small_disk, leave=0)  # not a page left, for SQLite either
    for _ in range(3):
        assert proxy_get(disk_proxy, small)[2] == b"s" * 1000
    # A POST invalidates what is stored for its URL (RFC 9111 4.4): its answer is relayed even
    # when the database cannot be written.
    r = curl("-x", disk_proxy.url, "-s", "-X", "POST", "-d", "x", "-w", " %{http_code}", posted)
    assert r.stdout == b"p" * 1000 + b" 200", r.stdout[-200:]

    # Nothing half-written: the next request for each is a miss, served whole from the origin.
    names = [f"{tag}-{i}" for i in range(CLIENTS)]
    assert [origin.full[n] for n in names] == [1] * CLIENTS
    status, fields, body = proxy_get(disk_proxy, urls[0])
    assert (status, body) == (200, body_of(0)) and fields["x-cache"].startswith("MISS")
    assert origin.full[names[0]] == 2
    # One line says why, however many fills failed; no traceback.
    lines = cannot_store_lines(disk_proxy)
    assert len(lines) == 1 and "No space left on device" in lines[0], disk_proxy.stderr()[-2000:]
    assert "Traceback" not in disk_proxy.stderr() and "internal error" not in disk_proxy.stderr()

    # Space returns: storing resumes by itself.
    filler.unlink()
    again = origin.put(f"{tag}-again", body_of(7), Cache_Control="max-age=600")
    assert proxy_get(disk_proxy, again)[2] == body_of(7)
    _, fields, body = proxy_get(disk_proxy, again)
    assert body == body_of(7) and fields["x-cache"].startswith("HIT") and origin.full[f"{tag}-again"] == 1
    deadline = time.monotonic() + 10
    while "cache: storing again" not in disk_proxy.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "cache: storing again" in disk_proxy.stderr()
    assert len(cannot_store_lines(disk_proxy)) == 1


def test_a_read_only_cache_directory_never_cuts_a_download(disk_proxy, small_disk, origin):
    """The body-file directory turns read-only (a read-only bind mount over it: a mount with the
    database open for writing cannot be remounted read-only as a whole)."""
    tag = f"ro-{time.monotonic_ns()}"
    tmp = small_disk / "tmp"
    assert mount("--bind", str(tmp), str(tmp)).returncode == 0
    r = mount("-o", "remount,ro,bind", str(tmp))
    if r.returncode != 0:
        pytest.skip(f"cannot make the cache directory read-only here: {r.stderr.decode(errors='replace').strip()}")
    urls = [origin.put(f"{tag}-{i}", body_of(i), Cache_Control="max-age=600") for i in range(4)]
    results = download_all(disk_proxy, urls)
    assert [(s, len(b)) for s, b in results] == [(200, OBJECT_SIZE)] * 4
    assert all(b == body_of(i) for i, (_, b) in enumerate(results))
    lines = cannot_store_lines(disk_proxy)
    assert len(lines) == 1 and "Read-only file system" in lines[0], disk_proxy.stderr()[-2000:]
    assert "Traceback" not in disk_proxy.stderr()

    # Writable again: storing resumes.
    assert subprocess.run(["umount", str(tmp)], capture_output=True).returncode == 0
    url = urls[0]
    assert proxy_get(disk_proxy, url)[2] == body_of(0)
    _, fields, body = proxy_get(disk_proxy, url)
    assert body == body_of(0) and fields["x-cache"].startswith("HIT") and origin.full[f"{tag}-0"] == 2
