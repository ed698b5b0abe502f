#!/usr/bin/env python3
"""Cache-hit throughput: webproxy (cache on) vs Squid (cache_mem + ufs cache_dir).

The origin marks /cache/* `Cache-Control: max-age=3600`.  For each object (1 KiB, 64 KiB, 10 MiB)
the cache is warmed first, then wrk keeps CONNECTIONS keep-alive connections busy for DURATION
seconds.  A figure only counts as a hit figure if the origin's access log did not grow during the
measured run (and, for Squid, its check reply said `X-Cache: HIT`).

    python3 bench/cache_hits.py [--duration 10] [--connections 50] [--only webproxy] [--objects 1k,10m]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CLOSE_NOTE,
    OBJECT_PATHS,
    OBJECTS,
    Bench,
    Origin,
    Peer,
    PeerFailed,
    WrkResult,
    check_object,
    explain_failure,
    fmt_num,
    fmt_us,
    machine_note,
    print_table,
    progress,
    ratio,
    run_wrk,
    write_json,
)

PROXIES = ["squid", "webproxy"]
LABELS = {"1k": "1 KiB", "64k": "64 KiB", "10m": "10 MiB"}


@dataclasses.dataclass
class HitRun:
    wrk: WrkResult
    origin_fetches: int  # requests the origin saw during the measured run; 0 means all hits
    hit_header: str | None  # X-Cache of the last check reply, when the proxy sends one


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per object (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first (default 2)")
    p.add_argument("--connections", type=int, default=50, help="keep-alive connections (default 50)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these proxies (repeat or comma-separate): {', '.join(PROXIES)}")
    p.add_argument("--objects", default="1k,64k,10m", help="objects to fetch (default 1k,64k,10m)")
    p.add_argument("--workers", type=int, default=1, help="webproxy [server] workers (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (configs, logs, caches)")
    args = p.parse_args(argv)
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    bad = [n for n in only if n not in PROXIES]
    if bad:
        p.error(f"unknown proxy {', '.join(bad)}; choose from {', '.join(PROXIES)}")
    args.proxies = [x for x in PROXIES if not only or x in only]
    args.object_list = [o.strip() for o in args.objects.split(",") if o.strip()]
    bad = [o for o in args.object_list if o not in OBJECTS]
    if bad:
        p.error(f"unknown object {', '.join(bad)}; choose from {', '.join(OBJECTS)}")
    return args


def warm(peer: Peer, origin: Origin, obj: str) -> str | None:
    """Fetch until the proxy answers from its cache; raise PeerFailed if it never does."""
    url = origin.url(f"/cache/{OBJECT_PATHS[obj]}")
    check_object(peer.port, url, origin.authority, obj)  # the miss that fills the cache
    before = origin.request_count()
    reply = None
    for _ in range(2):
        reply = check_object(peer.port, url, origin.authority, obj)
    fetched = origin.request_count() - before
    x_cache = reply.headers.get("X-Cache") if reply else None
    if fetched:
        raise PeerFailed(f"{peer.name} did not cache /cache/{OBJECT_PATHS[obj]}: the origin saw {fetched} "
                         f"of 2 repeat requests (X-Cache: {x_cache})")
    if x_cache is not None and "HIT" not in x_cache.upper():
        raise PeerFailed(f"{peer.name} says X-Cache: {x_cache} for a repeat request of /cache/{OBJECT_PATHS[obj]}")
    return x_cache


def measure(peer: Peer, origin: Origin, obj: str, args: argparse.Namespace) -> HitRun:
    url = origin.url(f"/cache/{OBJECT_PATHS[obj]}")
    x_cache = warm(peer, origin, obj)
    if args.warmup > 0:
        run_wrk(peer.port, url, origin.authority, args.warmup, args.connections, args.threads)
    before = origin.request_count()
    result = run_wrk(peer.port, url, origin.authority, args.duration, args.connections, args.threads)
    return HitRun(result, origin.request_count() - before, x_cache)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: dict[str, dict[str, HitRun | None]] = {p: {} for p in args.proxies}
    failures: dict[str, str] = {}
    note = machine_note()
    started = time.monotonic()
    with Bench(keep=args.keep) as bench:
        progress("starting nginx origin")
        origin = bench.start_origin()
        for name in args.proxies:
            progress(f"{name}: starting with its cache enabled")
            try:
                if name == "squid":
                    peer = bench.start_squid(origin, cache=True)
                else:
                    peer = bench.start_webproxy(cache=True, workers=args.workers)
            except PeerFailed as e:
                failures[name] = str(e)
                print(f"{name}: n/a: {explain_failure(str(e))}", file=sys.stderr)
                continue
            try:
                for obj in args.object_list:
                    progress(f"{name}: {LABELS[obj]}: warm cache, {args.warmup:g}s warm-up, {args.duration:g}s measured")
                    try:
                        runs[name][obj] = measure(peer, origin, obj, args)
                    except PeerFailed as e:
                        runs[name][obj] = None
                        failures[f"{name} {LABELS[obj]}"] = str(e)
                        print(f"{name} {LABELS[obj]}: n/a: {explain_failure(str(e))}", file=sys.stderr)
            finally:
                bench.stop(peer)
        if args.keep:
            print(f"configs, logs and caches kept in {bench.dir}", file=sys.stderr)

    print()
    print(f"Cache hits, GET /cache/* (Cache-Control: max-age=3600), {args.connections} keep-alive connections, "
          f"{args.threads} wrk threads, {args.duration:g}s each; MB/s = 10^6 bytes/s received, heads included")
    print(note)
    rows = []
    for name in PROXIES:
        if name not in args.proxies:
            continue
        for obj in args.object_list:
            run = runs[name].get(obj)
            if run is None:
                rows.append([name, LABELS[obj], "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"])
                continue
            r = run.wrk
            hits = "all" if run.origin_fetches == 0 else f"NO: origin saw {run.origin_fetches}"
            rows.append([name, LABELS[obj], fmt_num(r.rps), fmt_num(r.mbps, 1), fmt_us(r.lat_p50_us),
                         fmt_us(r.lat_p99_us), hits, r.errors_text()])
    print_table(["proxy", "object", "req/s", "MB/s", "p50", "p99", "hits", "errors"], rows)

    def figure(name: str, obj: str, attr: str) -> float | None:
        run = runs.get(name, {}).get(obj)
        return getattr(run.wrk, attr) if run else None

    print()
    for obj in args.object_list:
        attr, unit = ("mbps", "MB/s") if obj == "10m" else ("rps", "req/s")
        print(f"webproxy/squid {LABELS[obj]:>6} {unit}: {ratio(figure('webproxy', obj, attr), figure('squid', obj, attr))}")
    if any(run and run.wrk.closes_every_connection for per in runs.values() for run in per.values()):
        print(CLOSE_NOTE)
    for what, why in failures.items():
        print(f"\n{what} was not measured: {explain_failure(why)}")
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    write_json(args.json, {"benchmark": "cache_hits", "args": vars(args), "machine": note,
                           "results": runs, "failures": failures})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; peers stopped", file=sys.stderr)
        sys.exit(130)
