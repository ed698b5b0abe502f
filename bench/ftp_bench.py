"""FTP download throughput on loopback: a direct aioftp download against webproxy.ftp.fetch.

    python3 bench/ftp_bench.py [--size-mib 100] [--rounds 3]

pyftpdlib serves one file of random bytes from a subprocess (so the server has its own
interpreter and GIL). Each case downloads the whole file `rounds` times in turn and reports the best
and median MB/s (1 MB = 10^6 bytes) and the ratio to the direct aioftp download. Add cases (the HTTP
proxy path, a cached hit) to CASES.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aioftp  # noqa: E402

from webproxy.ftp import CHUNK, FtpPool, fetch  # noqa: E402

SERVER = """
import logging, sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
logging.basicConfig(level=logging.WARNING)
auth = DummyAuthorizer()
auth.add_anonymous(sys.argv[1])
handler = type("H", (FTPHandler,), {"authorizer": auth})
server = FTPServer(("127.0.0.1", 0), handler)
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


CASES: list[tuple[str, Callable[[int, str, dict], Awaitable[int]]]] = [
    ("direct aioftp", direct_aioftp),
    ("webproxy.ftp.fetch", via_fetch),
]


async def run(port: int, name: str, size: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {label: [] for label, _ in CASES}
    states: dict[str, dict] = {label: {} for label, _ in CASES}
    for _ in range(rounds):
        for label, case in CASES:  # interleaved, so drift affects every case alike
            start = time.perf_counter()
            got = await case(port, name, states[label])
            elapsed = time.perf_counter() - start
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
    args = ap.parse_args()
    size = args.size_mib << 20
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"

    with tempfile.TemporaryDirectory(prefix="ftp_bench_") as root:
        name = "big.bin"
        with open(os.path.join(root, name), "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        server = subprocess.Popen([sys.executable, "-c", SERVER, root], stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            results = asyncio.run(run(port, name, size, args.rounds))
        finally:
            server.terminate()
            server.wait(10)

    print(f"{args.size_mib} MiB file, pyftpdlib on 127.0.0.1, {loop_name}, {args.rounds} rounds, "
          f"chunk {CHUNK >> 10} KiB")
    base = statistics.median(results[CASES[0][0]])
    for label, speeds in results.items():
        med = statistics.median(speeds)
        print(f"  {label:<22} best {max(speeds):8.1f} MB/s  median {med:8.1f} MB/s  "
              f"ratio {med / base:5.2f}")


if __name__ == "__main__":
    main()
