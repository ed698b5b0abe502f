#!/usr/bin/env python3
"""Active refresh on and off, side by side: a Zipf-distributed request stream over objects with
a short max-age, replayed at the same pace through two webproxy processes (same config except
[refresh] enabled), each with its own origin, in the same run.

Prints, per proxy: the hit ratio (client requests answered without contacting the origin), the
share of client requests that waited for the origin (misses and revalidations), the origin
requests (full and conditional) and what refresh cost in extra origin requests.

    python3 bench/refresh_sim.py [--objects 200] [--zipf 1.0] [--rate 100] [--duration 60] [--max-age 5]

Not a test: it asserts nothing. Loopback only; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import http.client
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parent.parent

# webproxy with the refresher attached after its other layers (idempotent once
# webproxy.composition starts it itself).
LAUNCH = """
import sys
import webproxy.composition as composition
from webproxy import refresher
_attach = composition.attach_layers
async def attach_layers(server):
    await _attach(server)
    refresher.attach(server)
composition.attach_layers = attach_layers
from webproxy.cli import main
sys.exit(main(sys.argv[1:]))
"""

SERVED = {"TCP_HIT", "TCP_MEM_HIT", "TCP_IMS_HIT"}  # answered with no origin contact


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Origin:
    """Static objects with an ETag and max-age; counts full and conditional requests."""

    def __init__(self, max_age: int, size: int) -> None:
        self.max_age = max_age
        self.size = size
        self.counts: Counter[str] = Counter()
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        etag = f'"{name}"'
        fields = {"Cache-Control": f"max-age={self.max_age}", "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            self.counts["conditional"] += 1
            return web.Response(status=304, headers=fields)
        self.counts["full"] += 1
        return web.Response(body=name.encode().ljust(self.size, b"."), headers=fields)

    def start(self) -> Origin:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_get("/obj/{name}", self.handle)
            runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(runner.cleanup())

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)


class Proxy:
    def __init__(self, tmp: Path, name: str, refresh: bool, args: argparse.Namespace) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.port = free_port()
        self.log = self.dir / "access.log"
        min_window = max(1.0, args.max_age * 0.3)
        conf = f"""
[server]
listen = ["127.0.0.1:{self.port}"]
grace_period = 2.0
[log]
access_log = "{self.log}"
[cache]
directory = "{self.dir / 'cache'}"
[refresh]
enabled = {'true' if refresh else 'false'}
window = 0.1
min_window = {min_window}
popularity_window = {args.popularity_window}
min_hits = {args.min_hits}
interval = 0.2
max_per_second = {args.max_per_second}
"""
        (self.dir / "webproxy.toml").write_text(conf)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.err = open(self.dir / "stderr.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "run", "-c", str(self.dir / "webproxy.toml")],
                                     stdout=subprocess.DEVNULL, stderr=self.err, env=env, cwd=str(self.dir))
        deadline = time.monotonic() + 20
        while b"listening on" not in (self.dir / "stderr.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"webproxy did not start: {(self.dir / 'stderr.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()

    def codes(self) -> tuple[Counter[str], Counter[str]]:
        """(client result codes, refresh result codes) from the access log."""
        clients: Counter[str] = Counter()
        refreshes: Counter[str] = Counter()
        for line in self.log.read_text().splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            code = parts[3]
            (refreshes if parts[2] == "-" else clients)[code] += 1
        return clients, refreshes


def zipf_stream(n_objects: int, s: float, count: int, seed: int) -> list[int]:
    weights = [1.0 / (k ** s) for k in range(1, n_objects + 1)]
    cum = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    rnd = random.Random(seed)
    return [bisect.bisect_left(cum, rnd.random() * total) for _ in range(count)]


def replay(proxy: Proxy, origin: Origin, stream: list[int], rate: float, t0: float, late: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    for i, obj in enumerate(stream):
        due = t0 + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            conn.request("GET", f"http://127.0.0.1:{origin.port}/obj/o{obj}")
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    late.append(time.monotonic() - (t0 + len(stream) / rate))
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent")
    ap.add_argument("--rate", type=float, default=100.0, help="client requests per second (per proxy)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--max-age", type=int, default=5)
    ap.add_argument("--size", type=int, default=2048, help="object body bytes")
    ap.add_argument("--popularity-window", type=float, default=30.0)
    ap.add_argument("--min-hits", type=int, default=2)
    ap.add_argument("--max-per-second", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    stream = zipf_stream(args.objects, args.zipf, int(args.rate * args.duration), args.seed)
    origins = {"off": Origin(args.max_age, args.size).start(), "on": Origin(args.max_age, args.size).start()}
    with tempfile.TemporaryDirectory(prefix="refresh-sim-") as tmp:
        proxies: dict[str, Proxy] = {}
        try:
            for name in ("off", "on"):
                proxies[name] = Proxy(Path(tmp), name, name == "on", args)
            print(f"{len(stream)} requests, {args.objects} objects, Zipf s={args.zipf}, {args.rate:g} req/s, "
                  f"max-age {args.max_age}s, {args.duration:g}s; refresh: popularity window "
                  f"{args.popularity_window:g}s, min_hits {args.min_hits}", file=sys.stderr)
            late: list[float] = []
            t0 = time.monotonic() + 0.5
            threads = [threading.Thread(target=replay, args=(proxies[n], origins[n], stream, args.rate, t0, late))
                       for n in ("off", "on")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(1.5)  # the access log is flushed about once a second
        finally:
            for p in proxies.values():
                p.stop()
            for o in origins.values():
                o.stop()
        rows = {}
        for name in ("off", "on"):
            clients, refreshes = proxies[name].codes()
            total = sum(clients.values())
            served = sum(n for c, n in clients.items() if c.split("/")[0] in SERVED)
            o = origins[name].counts
            print(f"{name}: client codes {dict(clients.most_common())}; refresh codes {dict(refreshes)}",
                  file=sys.stderr)
            rows[name] = (total, served, o["full"], o["conditional"], sum(refreshes.values()),
                          sum(n for c, n in refreshes.items() if "UNMODIFIED" in c))
    print(f"{'refresh':8} {'client req':>10} {'hit ratio':>9} {'waited':>7} {'origin full':>11} "
          f"{'origin cond':>11} {'origin total':>12} {'refreshes':>9} {'of which 304':>12}")
    for name, (total, served, full, cond, refreshes, r304) in rows.items():
        hit = served / total if total else 0.0
        print(f"{name:8} {total:10d} {hit:9.1%} {1 - hit:7.1%} {full:11d} {cond:11d} {full + cond:12d} "
              f"{refreshes:9d} {r304:12d}")
    off, on = rows["off"], rows["on"]
    extra = (on[2] + on[3]) - (off[2] + off[3])
    print(f"refresh cost: {extra:+d} origin requests ({extra / max(1, off[2] + off[3]):+.1%} vs off); "
          f"client requests that waited for the origin: {1 - off[1] / max(1, off[0]):.1%} -> "
          f"{1 - on[1] / max(1, on[0]):.1%}")
    if max(late) > 1.0:
        print(f"note: the client fell {max(late):.1f}s behind the schedule (machine busy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
