#!/usr/bin/env python3
"""A fleet behind HAProxy against one big cache: hit ratio under a Zipf workload (issue 14).

    python3 bench/fleet.py [--quick] [--rounds N] [--urls 10000] [--zipf 1.0] [--object-kib 4]
                           [--big-share 0.4] [--connections 16] [--json FILE] [--keep]

Every configuration replays the same seeded request stream: --urls distinct URLs of --object-kib
KiB each, drawn with Zipf exponent --zipf, from an nginx origin (`Cache-Control: max-age=3600`).

  big       one webproxy node with the whole capacity C (--big-share of the URL set's bytes), direct
  fleet-1   HAProxy (conf/haproxy-fleet.cfg itself, node addresses filled in) and 1 node of C/3
  fleet-2   the same with 2 nodes of C/3 each
  fleet-3   the same with 3 nodes of C/3 each: as much capacity as `big`, split by URL hash

Each node's `cache.memory_capacity` is an eighth of its `cache.capacity`, so the disk capacity binds
(a bigger memory tier would hold the whole URL set). The capacity counts the SQLite pages the entries
take (a 4 KiB object ~4.6 KiB), so 40% of the URL set's bytes holds ~35% of its URLs; the table
shows the entries each configuration ended with and how many it evicted. A configuration runs --warmup requests, then
--measure requests; its hit ratio is the share of measured requests that never reached the origin
(nginx's access log counts them). Then fleet-3 goes on under load: node2 stops (SIGTERM) for
--leave requests, then starts again on its cache directory, and --back more requests are sent once
HAProxy has it UP again; the hit ratio, node2's state in HAProxy and node2's share of the requests
are printed per batch of --batch requests, to show the dip and the recovery.

Target (issue 14): fleet-3 within 5 percentage points of big. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common import (
    REPO_ROOT,
    Bench,
    Origin,
    Peer,
    PeerFailed,
    describe_checkout,
    explain_failure,
    free_port,
    machine_note,
    print_table,
    progress,
    run_async,
    run_main,
    write_json,
)

SHIPPED = REPO_ROOT / "conf" / "haproxy-fleet.cfg"
TARGET_PP = 5.0  # issue 14: the fleet's hit ratio within 5 percentage points of one big cache


# --- peers --------------------------------------------------------------------------------------


def start_origin(bench: Bench, object_size: int) -> Origin:
    """nginx serving one pseudo-random object under every /obj/N."""
    origin = bench.start_origin(files={"obj.bin": random.Random("fleet-object").randbytes(object_size)}, locations="""
        location /obj/ {
            add_header Cache-Control "max-age=3600" always;
            try_files /obj.bin =404;
        }""")
    return origin


def node_toml(port: int, name: str, cache_dir: Path, capacity: int) -> str:
    """A fleet node as the README sets one up: HAProxy (loopback here) is its only client."""
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
name = "{name}"
grace_period = 2.0
[access]
allow_clients = ["127.0.0.1/32"]
max_connections_per_client = 0
[log]
access_log = ""
level = "warning"
[cache]
directory = "{cache_dir}"
capacity = {capacity}
memory_capacity = {capacity // 8}
[refresh]
enabled = false
"""


def start_node(bench: Bench, name: str, capacity: int, port: int | None = None) -> Peer:
    """`python3 -m webproxy run` for one node; with `port`, a restart on the same port and directory."""
    d = bench.dir / name
    d.mkdir(exist_ok=True)
    port = port or free_port()
    conf = d / "webproxy.toml"
    conf.write_text(node_toml(port, name, d / "cache", capacity))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    peer = bench._spawn(name, [sys.executable, "-m", "webproxy", "run", "-c", str(conf)], port, env=env)
    return bench._start(peer, timeout=20.0)


def cache_stats(nodes: list[Peer]) -> dict[str, int]:
    """Entries and evictions summed over `nodes` (`webproxy cache stats` on each one's config)."""
    out = {"entries": 0, "evictions": 0}
    for node in nodes:
        text = subprocess.run([sys.executable, "-m", "webproxy", "cache", "stats", "-c", str(node.dir / "webproxy.toml")],
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT).stdout
        for key in out:
            m = re.search(rf"^{key}\s+(\d+)", text, re.M)
            out[key] += int(m.group(1)) if m else 0
    return out


def haproxy_cfg(listen: int, node_ports: list[int], stats_socket: Path) -> str:
    """conf/haproxy-fleet.cfg with this run's addresses: its server lines become one per node, the
    Debian service lines (log socket, chroot, user, daemon, admin socket path) a foreground run's.
    Hashing, checks and timeouts are the shipped ones."""
    text = SHIPPED.read_text()
    servers = re.findall(r"^    server node\d+ .*\n", text, re.M)
    if len(servers) != 3:
        raise PeerFailed("conf/haproxy-fleet.cfg: expected three `server nodeN` lines")
    text = text.replace("".join(servers), "".join(
        f"    server node{i} 127.0.0.1:{p} id {i}\n" for i, p in enumerate(node_ports, 1)))
    swaps = {"    bind :3128 ": f"    bind 127.0.0.1:{listen} ",
             "    log /dev/log local0 ": "    # (no log: a line per request would cost CPU here) ",
             "/run/haproxy/admin.sock": str(stats_socket),
             "    chroot /var/lib/haproxy\n": "", "    user haproxy\n": "", "    group haproxy\n": "",
             "    daemon\n": ""}
    for old, new in swaps.items():
        if old not in text:
            raise PeerFailed(f"conf/haproxy-fleet.cfg no longer has {old.strip()!r}")
        text = text.replace(old, new)
    return text


class Fleet:
    """HAProxy in front of N nodes of one capacity each."""

    def __init__(self, bench: Bench, label: str, n: int, capacity: int) -> None:
        self.bench = bench
        self.capacity = capacity
        self.nodes = {f"{label}-node{i}": start_node(bench, f"{label}-node{i}", capacity) for i in range(1, n + 1)}
        d = bench.dir / f"{label}-haproxy"
        d.mkdir()
        self.socket = d / "admin.sock"
        port = free_port()
        cfg = d / "haproxy.cfg"
        cfg.write_text(haproxy_cfg(port, [p.port for p in self.nodes.values()], self.socket))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.haproxy = bench._start(bench._spawn(f"{label}-haproxy", [haproxy, "-db", "-f", str(cfg)], port))
        self.port = port
        self.wait_states({f"node{i}": "UP" for i in range(1, n + 1)})

    def stats(self) -> dict[str, dict[str, str]]:
        """`show stat` for the backend's servers: {nodeN: {field: value}}."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        lines = out.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line)
        return {r["svname"]: r for r in rows if r.get("pxname") == "fleet_nodes" and r["svname"].startswith("node")}

    def wait_states(self, want: dict[str, str], timeout: float = 30.0) -> float:
        """Seconds until HAProxy reports these servers in these states (UP / DOWN)."""
        t0 = time.monotonic()
        while True:
            states = {k: v["status"].split()[0] for k, v in self.stats().items()}
            if all(states.get(k) == v for k, v in want.items()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise PeerFailed(f"HAProxy did not see {want} within {timeout:.0f}s (it says {states})")
            time.sleep(0.1)

    def shares(self) -> dict[str, int]:
        """Requests HAProxy has sent to each node so far."""
        return {k: int(v["stot"]) for k, v in self.stats().items()}


# --- the workload -------------------------------------------------------------------------------


def zipf_stream(n_urls: int, s: float, count: int, seed: int) -> list[int]:
    """`count` URL numbers with P(rank k) ~ 1/k^s; ranks are shuffled onto URL numbers."""
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / k ** s for k in range(1, n_urls + 1)))
    ids = list(range(n_urls))
    rng.shuffle(ids)
    total = cum[-1]
    return [ids[min(bisect.bisect_left(cum, rng.random() * total), n_urls - 1)] for _ in range(count)]


class OriginCount:
    """Requests nginx has logged (it writes each line unbuffered)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.count = 0

    def now(self) -> int:
        try:
            with self.log.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        last = data.rfind(b"\n") + 1
        self.count += data.count(b"\n")
        self.offset += last
        return self.count


async def replay(port: int, origin_port: int, ids: list[int], connections: int) -> int:
    """Send GET http://origin/obj/ID for every id through 127.0.0.1:port on `connections`
    keep-alive connections; returns the answers that were not 200."""
    queue = iter(ids)
    bad = 0

    async def one_connection() -> None:
        nonlocal bad
        reader = writer = None
        for i in queue:
            for _attempt in range(3):
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(f"GET http://127.0.0.1:{origin_port}/obj/{i} HTTP/1.1\r\n"
                                 f"Host: 127.0.0.1:{origin_port}\r\n\r\n".encode())
                    head = await reader.readuntil(b"\r\n\r\n")
                    m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
                    await reader.readexactly(int(m.group(1)) if m else 0)
                    if not head.startswith(b"HTTP/1.1 200"):
                        bad += 1
                    if re.search(rb"\r\nconnection: *close", head, re.I):
                        writer.close()
                        writer = None
                    break
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    if writer is not None:
                        writer.close()
                    writer = None
            else:
                bad += 1
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return bad


class Runner:
    def __init__(self, args: argparse.Namespace, origin_port: int, origin: OriginCount) -> None:
        self.args = args
        self.origin_port = origin_port
        self.origin = origin
        self.errors = 0

    def batch(self, port: int, ids: list[int]) -> tuple[float, float]:
        """Replay `ids`: (seconds taken, hit ratio)."""
        t0 = time.monotonic()
        before = self.origin.now()
        self.errors += run_async(replay(port, self.origin_port, ids, self.args.connections))
        return time.monotonic() - t0, 1 - (self.origin.now() - before) / len(ids)

    def hit_ratio(self, port: int, ids: list[int]) -> tuple[float, float]:
        """(hit ratio, requests/s) over `ids`."""
        secs, ratio = self.batch(port, ids)
        return ratio, len(ids) / secs

    def watch(self, fleet: Fleet, ids: Iterator[int], phase: str, t0: float, requests: int,
              until_up: bool = False) -> list[dict]:
        """Batches of --batch requests from `ids`, `requests` of them (with `until_up`: counted from
        when HAProxy has node2 UP again, for at most 60 s before that); per batch its hit ratio,
        node2's state and node2's share of the batch's requests."""
        rows: list[dict] = []
        counted = 0
        while counted < requests:
            before = fleet.shares().get("node2", 0)
            _, ratio = self.batch(fleet.port, list(itertools.islice(ids, self.args.batch)))
            st = fleet.stats()["node2"]
            rows.append({"phase": phase, "t": time.monotonic() - t0, "hit_ratio": ratio,
                         "node2": st["status"].split()[0],
                         "node2_share": (int(st["stot"]) - before) / self.args.batch})
            if not until_up or rows[-1]["node2"] == "UP" or time.monotonic() - t0 > 60:
                counted += self.args.batch
        return rows


# --- main ---------------------------------------------------------------------------------------


def run_round(bench: Bench, args: argparse.Namespace, r: int, origin_port: int, origin: OriginCount,
              total_bytes: int) -> dict:
    big_cap = int(total_bytes * args.big_share)
    node_cap = big_cap // 3
    # (after warm-up and measure: enough for the leave/return phases, however long node2 takes)
    stream = zipf_stream(args.urls, args.zipf, args.warmup + args.measure + args.leave + args.back + 100_000,
                         seed=r)
    warm, measured = stream[:args.warmup], stream[args.warmup:args.warmup + args.measure]
    after = stream[args.warmup + args.measure:]
    run = Runner(args, origin_port, origin)
    result: dict = {"round": r + 1, "capacity_big": big_cap, "capacity_node": node_cap, "configs": {}}

    progress(f"round {r + 1}: big (one node, {big_cap >> 20} MiB)")
    node = start_node(bench, f"r{r}-big", big_cap)
    run.batch(node.port, warm)
    ratio, rate = run.hit_ratio(node.port, measured)
    result["configs"]["big"] = {"hit_ratio": ratio, "rps": rate, **cache_stats([node])}
    bench.stop(node)

    for n in (1, 2, 3):
        progress(f"round {r + 1}: fleet-{n} (HAProxy + {n} x {node_cap >> 20} MiB)")
        fleet = Fleet(bench, f"r{r}-f{n}", n, node_cap)
        run.batch(fleet.port, warm)
        ratio, rate = run.hit_ratio(fleet.port, measured)
        shares = fleet.shares()
        result["configs"][f"fleet-{n}"] = {"hit_ratio": ratio, "rps": rate, "shares": shares,
                                           **cache_stats(list(fleet.nodes.values()))}
        if n < 3:
            for p in [*fleet.nodes.values(), fleet.haproxy]:
                bench.stop(p)
            continue
        # fleet-3 goes on: node2 leaves under load (SIGTERM: it stops accepting at once; HAProxy
        # notices from failed connections or its checks), then starts again on its cache directory
        # (HAProxy takes it back after `rise` good checks).
        progress(f"round {r + 1}: fleet-3, node2 leaves for {args.leave} requests, then returns")
        name, leaver = list(fleet.nodes.items())[1]
        ids = iter(after)
        t_gone = time.monotonic()
        os.killpg(leaver.proc.pid, signal.SIGTERM)
        rows = run.watch(fleet, ids, "node2 gone", t_gone, args.leave)
        bench.stop(leaver)
        fleet.nodes[name] = start_node(bench, name, node_cap, port=leaver.port)
        rows += run.watch(fleet, ids, "node2 back", t_gone, args.back, until_up=True)
        result["leave"] = rows
        for p in [*fleet.nodes.values(), fleet.haproxy]:
            bench.stop(p)
    result["errors"] = run.errors
    return result


def print_results(rounds: list[dict], args: argparse.Namespace) -> None:
    first = rounds[0]
    print(f"\n{args.urls:,} URLs of {args.object_kib} KiB, Zipf s={args.zipf}; big cache "
          f"{first['capacity_big'] / (1 << 20):.1f} MiB ({args.big_share:.0%} of the URL set), node "
          f"{first['capacity_node'] / (1 << 20):.1f} MiB; {args.warmup:,} warm-up + {args.measure:,} measured "
          f"requests, {args.connections} connections\n")
    names = ["big", "fleet-1", "fleet-2", "fleet-3"]
    rows = []
    for name in names:
        ratios = [r["configs"][name]["hit_ratio"] for r in rounds]
        rates = [r["configs"][name]["rps"] for r in rounds]
        shares = rounds[-1]["configs"][name].get("shares")
        share = "" if not shares else " / ".join(f"{v / max(1, sum(shares.values())):.0%}" for v in shares.values())
        rows.append([name, f"{statistics.median(ratios):.1%}",
                     " ".join(f"{x:.1%}" for x in ratios),
                     f"{statistics.median(ratios) - statistics.median([r['configs']['big']['hit_ratio'] for r in rounds]):+.1%}",
                     f"{statistics.median(rates):,.0f}", f"{rounds[-1]['configs'][name]['entries']:,}",
                     f"{rounds[-1]['configs'][name]['evictions']:,}", share])
    print_table(["config", "hit ratio (median)", "rounds", "vs big", "req/s", "entries", "evictions",
                 "requests per node"], rows)
    gap = 100 * (statistics.median([r["configs"]["big"]["hit_ratio"] for r in rounds])
                 - statistics.median([r["configs"]["fleet-3"]["hit_ratio"] for r in rounds]))
    print(f"\nfleet-3 vs big: {gap:+.1f} percentage points below (target: within {TARGET_PP:.0f}): "
          f"{'met' if gap <= TARGET_PP else 'MISSED'}")

    print(f"\nfleet-3, round 1: node2 stopped under load (SIGTERM at 0 s), then started again on its cache "
          f"directory; per batch of {args.batch:,} requests:")
    before = first["configs"]["fleet-3"]["hit_ratio"]
    rows = [["before (measured)", "", f"{before:.1%}", "UP", ""]]
    rows += [[x["phase"], f"{x['t']:.1f}", f"{x['hit_ratio']:.1%}", x["node2"], f"{x['node2_share']:.0%}"]
             for x in first["leave"]]
    print_table(["phase", "s since SIGTERM", "hit ratio", "node2 in HAProxy", "node2's requests"], rows)
    errors = sum(r["errors"] for r in rounds)
    print(f"\nnon-200 answers: {errors}" + ("" if errors == 0 else " (see --keep logs)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=10_000, help="distinct URLs (default 10000)")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s (default 1.0)")
    ap.add_argument("--object-kib", type=int, default=4, help="object size, KiB (default 4)")
    ap.add_argument("--big-share", type=float, default=0.4,
                    help="the big cache's capacity as a share of the URL set's bytes (default 0.4)")
    ap.add_argument("--warmup", type=int, default=30_000, help="unmeasured requests per config (default 30000)")
    ap.add_argument("--measure", type=int, default=20_000, help="measured requests per config (default 20000)")
    ap.add_argument("--leave", type=int, default=12_000, help="requests after a node leaves (default 12000)")
    ap.add_argument("--back", type=int, default=12_000, help="requests after it starts again (default 12000)")
    ap.add_argument("--batch", type=int, default=1_000, help="requests per printed batch (default 1000)")
    ap.add_argument("--connections", type=int, default=16, help="client connections (default 16)")
    ap.add_argument("--quick", action="store_true",
                    help="a third of the requests: a rough figure in about a minute (the big cache just fills)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything, fresh caches (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (configs, logs)")
    args = ap.parse_args()
    if args.quick:
        for k in ("warmup", "measure", "leave", "back"):
            setattr(args, k, getattr(args, k) // 3)
    for tool in ("nginx", "haproxy"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"fleet: {tool} is not installed (apt-get install nginx haproxy)", file=sys.stderr)
            return 2
    print(machine_note())
    print(f"webproxy: {describe_checkout(REPO_ROOT)}")
    rounds = []
    with Bench(keep=args.keep) as bench:
        try:
            origin = start_origin(bench, args.object_kib << 10)
            count = OriginCount(origin.access_log)
            for r in range(args.rounds):
                rounds.append(run_round(bench, args, r, origin.port, count, args.urls * (args.object_kib << 10)))
        except PeerFailed as e:
            print(f"fleet: {explain_failure(str(e))}", file=sys.stderr)
            return 1
        if args.keep:
            print(f"kept: {bench.dir}", file=sys.stderr)
    print_results(rounds, args)
    write_json(args.json, {"args": vars(args), "rounds": rounds})
    return 0


if __name__ == "__main__":
    run_main(main)
