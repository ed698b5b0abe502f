#!/usr/bin/env python3
"""Cache-hit throughput: webproxy (cache on) vs Squid (cache_mem + ufs cache_dir).

The origin marks /cache/* `Cache-Control: max-age=3600`.  For each object (1 KiB, 64 KiB, 10 MiB)
the cache is warmed first, then wrk keeps CONNECTIONS keep-alive connections busy for DURATION
seconds; for 1 KiB also with `Connection: close` on every request (new connections per second).
A figure only counts as a hit figure if the origin's access log did not grow during the measured
run (and, for Squid, its check reply said `X-Cache: HIT`).

    python3 bench/cache_hits.py [--duration 10] [--connections 50] [--only webproxy] [--objects 1k,10m]
                                [--webproxy-root /other/checkout] [--profile DIR]
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
    GOALS,
    OBJECT_PATHS,
    OBJECTS,
    RUN_HEADERS,
    RUN_NOTE,
    Bench,
    Comparison,
    Origin,
    Peer,
    PeerFailed,
    Run,
    add_common_args,
    auth_cost,
    best,
    check_object,
    describe_checkout,
    explain_failure,
    fmt_num,
    load_average,
    machine_note,
    measured_run,
    parse_only,
    print_comparisons,
    print_table,
    profile_run,
    progress,
    run_cells,
    run_main,
    write_json,
)

# webproxy-auth: the same with [auth] on (htpasswd, bcrypt), every request carrying the same
# Proxy-Authorization (answered from the verdict cache in the hit path): the cost of auth.
PROXIES = ["squid", "webproxy", "webproxy-auth"]
LABELS = {"1k": "1 KiB", "64k": "64 KiB", "10m": "10 MiB"}
NEW_CONNS_OBJECT = "1k"  # the object of the Connection: close run


@dataclasses.dataclass
class HitRun:
    run: Run
    hit_header: str | None  # X-Cache of the last check reply, when the proxy sends one

    @property
    def origin_fetches(self) -> int:
        """Requests the origin saw during the measured run; 0 means all hits."""
        return self.run.origin_requests

    def summary(self) -> dict:
        return {**self.run.summary(), "origin_fetches": self.origin_fetches, "hit_header": self.hit_header}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "object and connection mode", PROXIES)
    p.add_argument("--objects", default="1k,64k,10m", help="objects to fetch (default 1k,64k,10m)")
    args = p.parse_args(argv)
    args.proxies = parse_only(p, args, PROXIES)
    args.object_list = [o.strip() for o in args.objects.split(",") if o.strip()]
    bad = [o for o in args.object_list if o not in OBJECTS]
    if bad:
        p.error(f"unknown object {', '.join(bad)}; choose from {', '.join(OBJECTS)}")
    return args


def warm(peer: Peer, origin: Origin, obj: str) -> str | None:
    """Fetch until the proxy answers from its cache; raise PeerFailed if it never does."""
    url = origin.url(f"/cache/{OBJECT_PATHS[obj]}")
    check_object(peer.port, url, origin.authority, obj, peer.proxy_auth)  # the miss that fills the cache
    before = origin.request_count()
    reply = None
    for _ in range(2):
        reply = check_object(peer.port, url, origin.authority, obj, peer.proxy_auth)
    fetched = origin.request_count() - before
    x_cache = reply.headers.get("X-Cache") if reply else None
    if fetched:
        raise PeerFailed(f"{peer.name} did not cache /cache/{OBJECT_PATHS[obj]}: the origin saw {fetched} "
                         f"of 2 repeat requests (X-Cache: {x_cache})")
    if x_cache is not None and "HIT" not in x_cache.upper():
        raise PeerFailed(f"{peer.name} says X-Cache: {x_cache} for a repeat request of /cache/{OBJECT_PATHS[obj]}")
    return x_cache


def measure(peer: Peer, origin: Origin, obj: str, args: argparse.Namespace, close: bool = False) -> HitRun:
    x_cache = warm(peer, origin, obj)
    return HitRun(measured_run(peer.port, origin.url(f"/cache/{OBJECT_PATHS[obj]}"), origin, args, peer, close),
                  x_cache)


def measure_proxy(bench: Bench, origin: Origin, name: str, plan: list[tuple[str, str]], args: argparse.Namespace,
                  runs: dict[tuple[str, str], list[HitRun]], failures: dict[str, str], profile: bool) -> None:
    """One round for one proxy: start it (its cache directory carries over from an earlier round), measure
    every (object, mode) from a warmed cache, stop it."""
    progress(f"{name}: starting with its cache enabled")
    try:
        if name == "squid":
            peer = bench.start_squid(origin, cache=True)
        else:
            peer = bench.start_webproxy(cache=True, workers=args.workers, root=args.webproxy_root,
                                        auth=name == "webproxy-auth")
    except PeerFailed as e:
        failures[name] = str(e)
        print(f"{name}: n/a: {explain_failure(str(e))}", file=sys.stderr)
        return
    try:
        for obj, mode in plan:
            what = f"{name} {LABELS[obj]} {mode}"
            if what in failures:
                continue
            progress(f"{what}: warm cache, {args.warmup:g}s warm-up, {args.duration:g}s measured")
            try:
                runs.setdefault((obj, mode), []).append(measure(peer, origin, obj, args, close=mode == "close"))
            except PeerFailed as e:
                failures[what] = str(e)
                print(f"{what}: n/a: {explain_failure(str(e))}", file=sys.stderr)
        if name.startswith("webproxy") and profile:
            for obj, mode in plan:
                profile_run(peer, peer.port, origin.url(f"/cache/{OBJECT_PATHS[obj]}"), origin, args,
                            f"hits-{obj}-{mode}", close=mode == "close")
    finally:
        bench.stop(peer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # runs[proxy][(object, mode)]: one HitRun per round; mode is "keep-alive" or "close" (Connection:
    # close on every request)
    runs: dict[str, dict[tuple[str, str], list[HitRun]]] = {p: {} for p in args.proxies}
    plan = [(obj, "keep-alive") for obj in args.object_list]
    if args.new_conns and NEW_CONNS_OBJECT in args.object_list:
        plan.append((NEW_CONNS_OBJECT, "close"))
    failures: dict[str, str] = {}
    note = machine_note()
    started = time.monotonic()
    with Bench(keep=args.keep) as bench:
        progress("starting nginx origin")
        origin = bench.start_origin()
        for rnd in range(1, args.rounds + 1):
            for name in args.proxies:
                if name not in failures:
                    measure_proxy(bench, origin, name, plan, args, runs[name], failures,
                                  profile=bool(args.profile) and rnd == args.rounds)
        if args.keep:
            print(f"configs, logs and caches kept in {bench.dir}", file=sys.stderr)

    def best_hit(name: str, obj: str, mode: str = "keep-alive") -> HitRun | None:
        hits = runs.get(name, {}).get((obj, mode))
        top = best([h.run for h in hits]) if hits else None
        return next(h for h in hits if h.run is top) if top else None

    def figure(name: str, obj: str, attr: str, mode: str = "keep-alive") -> float | None:
        hit = best_hit(name, obj, mode)
        if hit is None:
            return None
        return hit.run.cpu_us_per_request if attr == "cpu" else getattr(hit.run.wrk, attr)

    print()
    print(f"Cache hits, GET /cache/* (Cache-Control: max-age=3600), {args.connections} connections, "
          f"{args.threads} wrk threads, {args.duration:g}s each, best of {args.rounds} round(s); close = "
          f"Connection: close on every request; MB/s = 10^6 bytes/s received, heads included")
    print(note)
    print(f"webproxy from {describe_checkout(args.webproxy_root)}, {args.workers} worker(s)")
    rows = []
    for name in args.proxies:
        for obj, mode in plan:
            hit = best_hit(name, obj, mode)
            cells = run_cells([h.run for h in runs[name].get((obj, mode), [])])
            mbps = fmt_num(hit.run.wrk.mbps, 1) if hit else "n/a"
            fetched = sum(h.origin_fetches for h in runs[name].get((obj, mode), []))
            if hit is None:
                hits = "n/a"
            else:
                hits = "all" if fetched == 0 else f"NO: origin saw {fetched}"
            rows.append([name, LABELS[obj], mode, cells[0], mbps, *cells[1:], hits])
    print_table(["proxy", "object", "connection", RUN_HEADERS[0], "MB/s", *RUN_HEADERS[1:], "hits"], rows)
    print(RUN_NOTE)

    comparisons = []
    for obj in args.object_list:
        attr, unit = ("mbps", "MB/s") if obj == "10m" else ("rps", "req/s")
        goal = GOALS.get(f"hit-{obj}")
        comparisons += [
            Comparison(f"{LABELS[obj]} hits {unit}", figure("webproxy", obj, attr), figure("squid", obj, attr), goal),
            Comparison("  CPU us/request", figure("webproxy", obj, "cpu"), figure("squid", obj, "cpu"),
                       lower_is_better=True),
            Comparison("  p99 latency", figure("webproxy", obj, "lat_p99_us"), figure("squid", obj, "lat_p99_us"),
                       lower_is_better=True),
        ]
    if (NEW_CONNS_OBJECT, "close") in plan:
        comparisons += [
            Comparison(f"new connections/s ({LABELS[NEW_CONNS_OBJECT]} hits)",
                       figure("webproxy", NEW_CONNS_OBJECT, "rps", "close"),
                       figure("squid", NEW_CONNS_OBJECT, "rps", "close"), GOALS["new-conns"]),
            Comparison("  CPU us/request", figure("webproxy", NEW_CONNS_OBJECT, "cpu", "close"),
                       figure("squid", NEW_CONNS_OBJECT, "cpu", "close"), lower_is_better=True),
        ]
    print()
    print_comparisons(comparisons, [hit.run for name in ("webproxy", "squid") for key in plan
                                    if (hit := best_hit(name, *key)) is not None])
    for obj, mode in plan:
        if best_hit("webproxy-auth", obj, mode) is not None:
            attr = "mbps" if obj == "10m" else "rps"
            print(auth_cost(f"{LABELS[obj]} hits {mode}" + (" (MB/s)" if attr == "mbps" else ""),
                            figure("webproxy-auth", obj, attr, mode), figure("webproxy", obj, attr, mode),
                            figure("webproxy-auth", obj, "cpu", mode), figure("webproxy", obj, "cpu", mode)))
    if any(hit.run.wrk.closes_every_connection and not hit.run.close
           for per in runs.values() for hits in per.values() for hit in hits):
        print(CLOSE_NOTE)
    for what, why in failures.items():
        print(f"\n{what} was not measured: {explain_failure(why)}")
    end_load = load_average()
    print(f"\n(total {time.monotonic() - started:.0f}s; load average {end_load} at the end)")
    write_json(args.json, {
        "benchmark": "cache_hits", "args": vars(args), "machine": note, "load_at_end": end_load,
        "webproxy": describe_checkout(args.webproxy_root),
        "results": {name: {obj: best_hit(name, obj) for obj in args.object_list} for name in runs},
        "new_connections": {name: best_hit(name, NEW_CONNS_OBJECT, "close") for name in runs
                            if (NEW_CONNS_OBJECT, "close") in runs[name]},
        "comparisons": comparisons,
        "rounds": {name: {f"{obj} {mode}": hits for (obj, mode), hits in per.items()} for name, per in runs.items()},
        "failures": failures})
    return 0


if __name__ == "__main__":
    run_main(main)
