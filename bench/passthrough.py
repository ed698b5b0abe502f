#!/usr/bin/env python3
"""Pass-through throughput: nginx direct vs Squid (cache deny all), tinyproxy and webproxy (cache off).

Every request is for a 1 KiB object the origin marks `Cache-Control: no-store`, so each one goes
to the origin.  wrk keeps CONNECTIONS keep-alive connections open for DURATION seconds per target;
proxies get absolute-form requests (`GET http://127.0.0.1:ORIGIN/nocache/1k.bin HTTP/1.1`).
Each proxy runs alone (the others are stopped) and first proves it returns 200 with the right bytes.

    python3 bench/passthrough.py [--duration 10] [--connections 50] [--only webproxy,squid]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CLOSE_NOTE,
    Bench,
    Origin,
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

TARGETS = ["direct", "squid", "tinyproxy", "webproxy"]
OBJECT = "1k"
PATH = "/nocache/1k.bin"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per target (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first (default 2)")
    p.add_argument("--connections", type=int, default=50, help="keep-alive connections (default 50)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these targets (repeat or comma-separate): {', '.join(TARGETS)}")
    p.add_argument("--workers", type=int, default=1, help="webproxy [server] workers (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (configs, logs)")
    args = p.parse_args(argv)
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in only if n not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    args.targets = [t for t in TARGETS if not only or t in only]
    return args


def measure(bench: Bench, origin: Origin, name: str, args: argparse.Namespace) -> WrkResult:
    """Start `name`, check it, warm it up, measure it, stop it."""
    peer = None
    if name == "direct":
        port, target = origin.port, PATH
    else:
        if name == "squid":
            peer = bench.start_squid(origin, cache=False)
        elif name == "tinyproxy":
            peer = bench.start_tinyproxy()
        else:
            peer = bench.start_webproxy(cache=False, workers=args.workers)
        port, target = peer.port, origin.url(PATH)
    try:
        check_object(port, target, origin.authority, OBJECT)
        if args.warmup > 0:
            run_wrk(port, target, origin.authority, args.warmup, args.connections, args.threads)
        before = origin.request_count()
        result = run_wrk(port, target, origin.authority, args.duration, args.connections, args.threads)
        reached = origin.request_count() - before
        if reached < result.requests:
            # no-store must never be answered without the origin; if it is, the figure is not pass-through.
            print(f"warning: {name} answered {result.requests} requests but the origin saw only {reached}",
                  file=sys.stderr)
        return result
    finally:
        if peer is not None:
            bench.stop(peer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, WrkResult | None] = {}
    failures: dict[str, str] = {}
    note = machine_note()
    started = time.monotonic()
    with Bench(keep=args.keep) as bench:
        progress("starting nginx origin")
        origin = bench.start_origin()
        for name in args.targets:
            progress(f"{name}: check, {args.warmup:g}s warm-up, {args.duration:g}s measured")
            try:
                results[name] = measure(bench, origin, name, args)
            except PeerFailed as e:
                results[name] = None
                failures[name] = str(e)
                print(f"{name}: n/a: {explain_failure(str(e))}", file=sys.stderr)
        if args.keep:
            print(f"configs and logs kept in {bench.dir}", file=sys.stderr)

    print()
    print(f"Pass-through, GET {PATH} (1 KiB, Cache-Control: no-store), {args.connections} keep-alive "
          f"connections, {args.threads} wrk threads, {args.duration:g}s each")
    print(note)
    rows = []
    for name in args.targets:
        r = results.get(name)
        label = "nginx direct" if name == "direct" else name
        if r is None:
            rows.append([label, "n/a", "n/a", "n/a", "n/a", "n/a"])
        else:
            rows.append([label, fmt_num(r.rps), fmt_us(r.lat_p50_us), fmt_us(r.lat_p99_us), fmt_num(r.requests),
                         r.errors_text()])
    print_table(["target", "req/s", "p50", "p99", "requests", "errors"], rows)

    def rps(name: str) -> float | None:
        r = results.get(name)
        return r.rps if r else None

    print()
    print(f"webproxy/tinyproxy req/s: {ratio(rps('webproxy'), rps('tinyproxy'))}")
    print(f"webproxy/squid     req/s: {ratio(rps('webproxy'), rps('squid'))}")
    print(f"webproxy/direct    req/s: {ratio(rps('webproxy'), rps('direct'))}")
    if any(r and r.closes_every_connection for r in results.values()):
        print(CLOSE_NOTE)
    for name, why in failures.items():
        print(f"\n{name} was not measured: {explain_failure(why)}")
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    write_json(args.json, {"benchmark": "passthrough", "args": vars(args), "machine": note,
                           "results": results, "failures": failures})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; peers stopped", file=sys.stderr)
        sys.exit(130)
