#!/usr/bin/env python3
"""Pass-through through a parent proxy: what the child hop costs, webproxy vs Squid as the child.

Every request is for a 1 KiB `Cache-Control: no-store` object, so each one crosses every hop. The
parent is always the same Squid (`cache deny all`); the children are webproxy (`[cache] enabled =
false`, `[[upstream.parent]]` = that Squid) and Squid (`cache_peer ... parent`, `never_direct allow
all`). Beside them, webproxy and Squid going direct, so the price of the extra hop shows too. CPU
per request is the child's own process (the parent's CPU is the same in both chains).

    python3 bench/parent_chain.py [--duration 10] [--connections 50] [--rounds 3]
                                  [--only webproxy,webproxy-via-squid,squid,squid-via-squid]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RUN_HEADERS,
    RUN_NOTE,
    Bench,
    Origin,
    PeerFailed,
    Run,
    add_common_args,
    best,
    check_object,
    describe_checkout,
    explain_failure,
    machine_note,
    measured_run,
    parse_only,
    print_table,
    progress,
    ratio,
    run_cells,
    run_main,
    write_json,
)

TARGETS = ["webproxy", "webproxy-via-squid", "squid", "squid-via-squid"]
OBJECT = "1k"
PATH = "/nocache/1k.bin"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "target", TARGETS)
    args = p.parse_args(argv)
    args.targets = parse_only(p, args, TARGETS)
    args.new_conns = False  # keep-alive only: the parent hop is what is measured, not accept()
    return args


def measure(bench: Bench, origin: Origin, name: str, args: argparse.Namespace) -> Run:
    peers = []
    try:
        if name.endswith("-via-squid"):
            parent = bench.start_squid(origin, cache=False, name="squid-parent")
            peers.append(parent)
        if name == "webproxy":
            child = bench.start_webproxy(cache=False, workers=args.workers, root=args.webproxy_root)
        elif name == "webproxy-via-squid":
            child = bench.start_webproxy(cache=False, workers=args.workers, root=args.webproxy_root, extra_toml=(
                f'[upstream]\nnever_direct = true\n[[upstream.parent]]\naddress = "127.0.0.1:{parent.port}"\n'))
        elif name == "squid":
            child = bench.start_squid(origin, cache=False)
        else:
            child = bench.start_squid(origin, cache=False, name="squid-child", extra_conf=(
                "visible_hostname squid-child\n"  # the parent would take a Via with its own name for a loop
                f"cache_peer 127.0.0.1 parent {parent.port} 0 no-query no-digest default\nnever_direct allow all\n"))
        peers.append(child)
        check_object(child.port, origin.url(PATH), origin.authority, OBJECT)
        progress(f"{name}: {args.warmup:g}s warm-up, {args.duration:g}s measured")
        run = measured_run(child.port, origin.url(PATH), origin, args, child)
        if run.origin_requests < run.wrk.requests:
            print(f"warning: {name} answered {run.wrk.requests} requests but the origin saw only "
                  f"{run.origin_requests}", file=sys.stderr)
        return run
    finally:
        for peer in reversed(peers):
            bench.stop(peer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, list[Run]] = {}
    failures: dict[str, str] = {}
    note = machine_note()
    started = time.monotonic()
    with Bench(keep=args.keep) as bench:
        origin = bench.start_origin()
        for rnd in range(1, args.rounds + 1):
            for name in args.targets:
                if name in failures:
                    continue
                progress(f"{name}: round {rnd} of {args.rounds}")
                try:
                    results.setdefault(name, []).append(measure(bench, origin, name, args))
                except PeerFailed as e:
                    failures[name] = str(e)
                    print(f"{name}: n/a: {explain_failure(str(e))}", file=sys.stderr)

    def rps(name: str) -> float | None:
        r = best(results.get(name))
        return r.wrk.rps if r is not None else None

    def cpu(name: str) -> float | None:
        r = best(results.get(name))
        return r.cpu_us_per_request if r is not None else None

    print()
    print(f"Pass-through through a parent (Squid, cache deny all), GET {PATH} (1 KiB, no-store), "
          f"{args.connections} keep-alive connections, {args.duration:g}s each, best of {args.rounds} round(s)")
    print(note)
    print(f"webproxy from {describe_checkout(args.webproxy_root)}, {args.workers} worker(s)")
    print_table(["child", *RUN_HEADERS], [[n, *run_cells(results.get(n))] for n in args.targets])
    print(RUN_NOTE)
    print()
    print(f"child hop req/s, webproxy/squid (both via the same Squid parent): "
          f"{ratio(rps('webproxy-via-squid'), rps('squid-via-squid'))}")
    print(f"child CPU us/req, webproxy/squid: {ratio(cpu('webproxy-via-squid'), cpu('squid-via-squid'))}")
    print(f"webproxy via a parent / webproxy direct, req/s: {ratio(rps('webproxy-via-squid'), rps('webproxy'))}")
    print(f"squid via a parent / squid direct, req/s: {ratio(rps('squid-via-squid'), rps('squid'))}")
    for name, why in failures.items():
        print(f"\n{name} was not measured: {explain_failure(why)}")
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    write_json(args.json, {"benchmark": "parent_chain", "args": vars(args), "machine": note,
                           "results": {n: best(r) for n, r in results.items()}, "rounds": results,
                           "failures": failures})
    return 0


if __name__ == "__main__":
    run_main(main)
