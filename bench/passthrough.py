#!/usr/bin/env python3
"""Pass-through throughput: nginx direct vs Squid (cache deny all), tinyproxy and webproxy (cache off).

Every request is for a 1 KiB object the origin marks `Cache-Control: no-store`, so each one goes
to the origin.  wrk keeps CONNECTIONS keep-alive connections open for DURATION seconds per target;
proxies get absolute-form requests (`GET http://127.0.0.1:ORIGIN/nocache/1k.bin HTTP/1.1`).  Then
the same with `Connection: close` on every request: new connections per second.
Each proxy runs alone (the others are stopped) and first proves it returns 200 with the right bytes.

    python3 bench/passthrough.py [--duration 10] [--connections 50] [--only webproxy,squid]
                                 [--webproxy-root /other/checkout] [--profile DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CLOSE_NOTE,
    GOALS,
    RUN_HEADERS,
    RUN_NOTE,
    Bench,
    Comparison,
    Origin,
    PeerFailed,
    Run,
    add_common_args,
    auth_cost,
    best,
    check_object,
    describe_checkout,
    explain_failure,
    load_average,
    machine_note,
    measured_run,
    parse_only,
    print_comparisons,
    print_table,
    profile_run,
    progress,
    ratio,
    run_cells,
    run_main,
    write_json,
)

# webproxy-auth: the same with [auth] on (htpasswd, bcrypt), every request carrying the same
# Proxy-Authorization (after the first, answered from the verdict cache): the cost of auth.
TARGETS = ["direct", "squid", "tinyproxy", "webproxy", "webproxy-auth"]
OBJECT = "1k"
PATH = "/nocache/1k.bin"
MODES = {"keep-alive": False, "close": True}  # the connection column: Connection: close on every request?


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "target and connection mode", TARGETS)
    args = p.parse_args(argv)
    args.targets = parse_only(p, args, TARGETS)
    return args


def measure(bench: Bench, origin: Origin, name: str, args: argparse.Namespace, profile: bool) -> dict[str, Run]:
    """Start `name`, check it, measure it keep-alive (and with Connection: close), stop it."""
    peer = None
    if name == "direct":
        port, target = origin.port, PATH
    else:
        if name == "squid":
            peer = bench.start_squid(origin, cache=False)
        elif name == "tinyproxy":
            peer = bench.start_tinyproxy()
        else:
            peer = bench.start_webproxy(cache=False, workers=args.workers, root=args.webproxy_root,
                                        auth=name == "webproxy-auth")
        port, target = peer.port, origin.url(PATH)
    runs = {}
    try:
        check_object(port, target, origin.authority, OBJECT, proxy_auth=peer and peer.proxy_auth)
        for mode, close in MODES.items():
            if close and not args.new_conns:
                continue
            progress(f"{name}: {mode}: {args.warmup:g}s warm-up, {args.duration:g}s measured")
            run = runs[mode] = measured_run(port, target, origin, args, peer, close=close)
            if run.origin_requests < run.wrk.requests:
                # no-store must never be answered without the origin; if it is, the figure is not pass-through.
                print(f"warning: {name} answered {run.wrk.requests} requests but the origin saw only "
                      f"{run.origin_requests}", file=sys.stderr)
        if name.startswith("webproxy") and profile:
            for mode, close in MODES.items():
                if args.new_conns or not close:
                    profile_run(peer, port, target, origin, args, f"passthrough-1k-{mode}", close)
        return runs
    finally:
        if peer is not None:
            bench.stop(peer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # results[target][mode]: one Run per round; mode is "keep-alive" or "close"
    results: dict[str, dict[str, list[Run]]] = {}
    failures: dict[str, str] = {}
    note = machine_note()
    started = time.monotonic()
    with Bench(keep=args.keep) as bench:
        progress("starting nginx origin")
        origin = bench.start_origin()
        for rnd in range(1, args.rounds + 1):
            for name in args.targets:
                if name in failures:
                    continue
                progress(f"{name}: round {rnd} of {args.rounds}: check")
                try:
                    per = measure(bench, origin, name, args, profile=bool(args.profile) and rnd == args.rounds)
                except PeerFailed as e:
                    failures[name] = str(e)
                    print(f"{name}: n/a: {explain_failure(str(e))}", file=sys.stderr)
                    continue
                for mode, r in per.items():
                    results.setdefault(name, {}).setdefault(mode, []).append(r)
        if args.keep:
            print(f"configs and logs kept in {bench.dir}", file=sys.stderr)

    def run(name: str, mode: str = "keep-alive") -> Run | None:
        return best(results.get(name, {}).get(mode))

    def figure(name: str, attr: str, mode: str = "keep-alive") -> float | None:
        r = run(name, mode)
        if r is None:
            return None
        return r.cpu_us_per_request if attr == "cpu" else getattr(r.wrk, attr)

    print()
    print(f"Pass-through, GET {PATH} (1 KiB, Cache-Control: no-store), {args.connections} connections, "
          f"{args.threads} wrk threads, {args.duration:g}s each, best of {args.rounds} round(s); "
          f"close = Connection: close on every request")
    print(note)
    print(f"webproxy from {describe_checkout(args.webproxy_root)}, {args.workers} worker(s)")
    rows = []
    for mode in MODES:
        if mode == "close" and not args.new_conns:
            continue
        for name in args.targets:
            rows.append(["nginx direct" if name == "direct" else name, mode,
                         *run_cells(results.get(name, {}).get(mode))])
    print_table(["target", "connection", *RUN_HEADERS], rows)
    print(RUN_NOTE)

    comparisons = [
        Comparison("1 KiB pass-through req/s", figure("webproxy", "rps"), figure("squid", "rps"), GOALS["pass-1k"]),
        Comparison("  CPU us/request", figure("webproxy", "cpu"), figure("squid", "cpu"), lower_is_better=True),
        Comparison("  p99 latency", figure("webproxy", "lat_p99_us"), figure("squid", "lat_p99_us"),
                   lower_is_better=True),
    ]
    if args.new_conns:
        comparisons += [
            Comparison("new connections/s (pass-through)", figure("webproxy", "rps", "close"),
                       figure("squid", "rps", "close"), GOALS["new-conns"]),
            Comparison("  CPU us/request", figure("webproxy", "cpu", "close"), figure("squid", "cpu", "close"),
                       lower_is_better=True),
        ]
    print()
    print_comparisons(comparisons, [r for name in ("webproxy", "squid") for mode in MODES
                                    if (r := run(name, mode)) is not None])
    for mode in MODES:
        if run("webproxy-auth", mode) is not None:
            print(auth_cost(f"pass-through {mode}", figure("webproxy-auth", "rps", mode), figure("webproxy", "rps", mode),
                            figure("webproxy-auth", "cpu", mode), figure("webproxy", "cpu", mode)))
    for other in ("tinyproxy", "direct"):
        if figure("webproxy", "rps") and figure(other, "rps"):
            print(f"webproxy/{other:<9} req/s: {ratio(figure('webproxy', 'rps'), figure(other, 'rps'))}")
    if any(r.wrk.closes_every_connection and not r.close
           for per in results.values() for rounds in per.values() for r in rounds):
        print(CLOSE_NOTE)
    for name, why in failures.items():
        print(f"\n{name} was not measured: {explain_failure(why)}")
    end_load = load_average()
    print(f"\n(total {time.monotonic() - started:.0f}s; load average {end_load} at the end)")
    write_json(args.json, {
        "benchmark": "passthrough", "args": vars(args), "machine": note, "load_at_end": end_load,
        "webproxy": describe_checkout(args.webproxy_root),
        "results": {name: best(per.get("keep-alive")) for name, per in results.items()},
        "new_connections": {name: best(per["close"]) for name, per in results.items() if "close" in per},
        "comparisons": comparisons, "rounds": results, "failures": failures})
    return 0


if __name__ == "__main__":
    run_main(main)
