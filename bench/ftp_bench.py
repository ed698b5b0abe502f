"""FTP download throughput on loopback: direct aioftp, webproxy.ftp.fetch, and through the proxy.

    python3 bench/ftp_bench.py [--size-mib 100] [--rounds 3] [--no-proxy] [--keep]

pyftpdlib serves one file of random bytes from a subprocess (so the server has its own
interpreter and GIL); the file's mtime is a month old, so the proxy may cache it by heuristic
freshness. The server logs every RETR, so the bench can tell a cache hit from a transfer.
Each case downloads the whole file `rounds` times in turn and reports the best and median MB/s
(1 MB = 10^6 bytes) and the ratio to the direct aioftp download. The cases:

  direct aioftp          aioftp's own client, straight to the FTP server (the baseline)
  direct curl            `curl ftp://...` straight to the FTP server (C client; the client ceiling)
  webproxy.ftp.fetch     the proxy's FTP fetcher as a library, sessions pooled across rounds
  proxy miss (curl)      `curl -x http://127.0.0.1:PROXY ftp://...` through `python3 -m webproxy run`
                         (one worker, cache on, refresh off, no access log): not in the cache, so
                         the proxy does the FTP transfer while streaming to curl and into the cache
  proxy hit (curl)       the same URL again: must be served from the cache (the bench fails if
                         the FTP server saw a second RETR for it, or the answer lacks X-Cache: HIT)

Every round fetches a different name (hard links to the same file), so each miss is a real miss.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import aioftp  # noqa: E402
from common import (  # noqa: E402
    Bench,
    PeerFailed,
    die_with_parent,
    exit_on_signals,
    explain_failure,
    machine_note,
    progress,
    run_async,
)

from webproxy.ftp import CHUNK, FtpPool, fetch  # noqa: E402

# argv: root directory, RETR log file (one line per RETR: the path asked for).
SERVER = """
import logging, sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
logging.basicConfig(level=logging.WARNING)
auth = DummyAuthorizer()
auth.add_anonymous(sys.argv[1])
retr_log = open(sys.argv[2], "a", buffering=1)
class H(FTPHandler):
    authorizer = auth
    def ftp_RETR(self, file):
        retr_log.write(file + "\\n")
        return super().ftp_RETR(file)
server = FTPServer(("127.0.0.1", 0), H)
print(server.address[1], flush=True)
server.serve_forever(handle_exit=True)
"""


async def direct_aioftp(port: int, name: str, state: dict) -> int:
    """The baseline: what a program using aioftp directly gets (its own iter_by_block reads)."""
    got = 0
    async with aioftp.Client.context("127.0.0.1", port) as client:
        async with client.download_stream(name) as stream:
            async for block in stream.iter_by_block(CHUNK):
                got += len(block)
    return got


async def via_fetch(port: int, name: str, state: dict) -> int:
    """webproxy.ftp.fetch with a pool kept across rounds (the proxy's situation: warm sessions)."""
    pool = state.setdefault("pool", FtpPool({}))
    got = 0
    resp = await fetch(f"ftp://127.0.0.1:{port}/{name}", "GET", [], pool)
    try:
        async for chunk in resp.body():
            got += len(chunk)
    finally:
        await resp.aclose()
    return got


async def curl(url: str, proxy: int | None) -> tuple[int, float, dict[str, str]]:
    """(bytes, seconds, response headers) for one curl download to /dev/null; seconds from curl's
    own time_total, so the fork/exec of curl is not counted."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-D", "-", "-w", "\nCURL %{http_code} %{size_download} %{time_total}\n"]
    if proxy:
        argv += ["-x", f"http://127.0.0.1:{proxy}"]
    proc = await asyncio.create_subprocess_exec(*argv, url, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    text = out.decode(errors="replace")
    last = [line for line in text.splitlines() if line.startswith("CURL ")]
    if proc.returncode or not last:
        raise SystemExit(f"curl {url} (proxy {proxy}) failed: exit {proc.returncode} {err.decode().strip()}")
    _, code, nbytes, seconds = last[-1].split()
    if proxy and code != "200":
        raise SystemExit(f"curl {url} through the proxy: status {code}, want 200")
    headers = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("CURL "):
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(nbytes), float(seconds), headers


async def direct_curl(port: int, name: str, state: dict) -> tuple[int, float]:
    got, seconds, _ = await curl(f"ftp://127.0.0.1:{port}/{name}", None)
    return got, seconds


def retr_count(state: dict, name: str) -> int:
    # pyftpdlib hands ftp_RETR the file-system path
    return sum(line.endswith(f"/{name}") for line in state["retr_log"].read_text().splitlines())


async def proxy_miss(port: int, name: str, state: dict) -> tuple[int, float]:
    before = retr_count(state, name)
    got, seconds, headers = await curl(f"ftp://127.0.0.1:{port}/{name}", state["proxy"])
    if retr_count(state, name) != before + 1:
        raise SystemExit(f"proxy miss: the FTP server saw {retr_count(state, name) - before} RETR of {name}, want 1")
    if "hit" in headers.get("x-cache", "").lower():
        raise SystemExit(f"proxy miss: {name} was already cached (X-Cache: {headers['x-cache']})")
    return got, seconds


async def proxy_hit(port: int, name: str, state: dict) -> tuple[int, float]:
    before = retr_count(state, name)
    got, seconds, headers = await curl(f"ftp://127.0.0.1:{port}/{name}", state["proxy"])
    if retr_count(state, name) != before:
        raise SystemExit(f"proxy hit: the FTP server saw a second RETR of {name}: not served from the cache")
    if "hit" not in headers.get("x-cache", "").lower():
        raise SystemExit(f"proxy hit: no X-Cache: HIT on the second fetch of {name} (got {headers.get('x-cache')!r})")
    return got, seconds


Case = Callable[[int, str, dict], Awaitable["int | tuple[int, float]"]]
CASES: list[tuple[str, Case]] = [
    ("direct aioftp", direct_aioftp),
    ("direct curl", direct_curl),
    ("webproxy.ftp.fetch", via_fetch),
]
PROXY_CASES: list[tuple[str, Case]] = [
    ("proxy miss (curl)", proxy_miss),
    ("proxy hit (curl)", proxy_hit),
]


async def run(port: int, names: list[str], size: int, cases: list[tuple[str, Case]],
              shared: dict) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {label: [] for label, _ in cases}
    states: dict[str, dict] = {label: dict(shared) for label, _ in cases}
    for r, name in enumerate(names):
        progress(f"round {r + 1}/{len(names)}")
        for label, case in cases:  # interleaved, so drift affects every case alike
            start = time.perf_counter()
            got = await case(port, name, states[label])
            elapsed = time.perf_counter() - start
            if isinstance(got, tuple):  # the case timed itself (curl's time_total)
                got, elapsed = got
            if got != size:
                raise SystemExit(f"{label}: got {got} bytes, expected {size}")
            results[label].append(size / elapsed / 1e6)
    for state in states.values():
        if "pool" in state:
            await state["pool"].close()
    return results




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-proxy", action="store_true", help="skip the cases through `webproxy run`")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (configs, logs, cache)")
    args = ap.parse_args()
    size = args.size_mib << 20
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"

    print(machine_note())
    cases = CASES + ([] if args.no_proxy else PROXY_CASES)
    with Bench(keep=args.keep) as bench:
        exit_on_signals()
        root = bench.dir / "ftp"
        root.mkdir()
        month_ago = time.time() - 30 * 86400
        first = root / "big-1.bin"
        with first.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        names = [f"big-{r + 1}.bin" for r in range(args.rounds)]
        for name in names[1:]:
            os.link(first, root / name)  # a fresh URL per round, no extra disk
        os.utime(first, (month_ago, month_ago))
        shared: dict = {"retr_log": bench.dir / "retr.log"}
        shared["retr_log"].touch()
        if not args.no_proxy:
            try:
                shared["proxy"] = bench.start_webproxy(cache=True, extra_toml="\n[refresh]\nenabled = false\n").port
            except PeerFailed as e:
                print(f"webproxy: n/a ({explain_failure(str(e))}); proxy cases skipped", file=sys.stderr)
                cases = CASES
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(shared["retr_log"])],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True,
                                  preexec_fn=die_with_parent)
        try:
            port = int(server.stdout.readline())
            results = run_async(run(port, names, size, cases, shared))
            retrs = {name: retr_count(shared, name) for name in names}
        finally:
            server.terminate()
            server.wait(10)

    print(f"{args.size_mib} MiB file, pyftpdlib on 127.0.0.1, {loop_name}, {args.rounds} rounds, "
          f"chunk {CHUNK >> 10} KiB; proxy: 1 worker, cache on, refresh off")
    base = statistics.median(results[CASES[0][0]])
    for label, speeds in results.items():
        med = statistics.median(speeds)
        print(f"  {label:<22} best {max(speeds):8.1f} MB/s  median {med:8.1f} MB/s  "
              f"ratio {med / base:5.2f}")
    if "proxy hit (curl)" in results:
        direct_fetches = len(cases) - 1  # every case but the hit does one RETR per round
        print(f"  RETR per name on the FTP server: {sorted(set(retrs.values()))} (want [{direct_fetches}]: "
              "each proxy hit was served from the cache, with X-Cache: HIT)")


if __name__ == "__main__":
    main()
