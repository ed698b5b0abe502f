"""Benchmark SOCKS5 CONNECT: webproxy's [socks] listener beside Dante and microsocks, same run.

    python3 bench/socks_bench.py [--seconds 5] [--rounds 2] [--connections 50] [--stream-gib 1]
                                 [--only webproxy,dante,microsocks] [--workers 1] [--keep]

Paths, each to the same target on loopback:
  direct      the target itself (the ceiling)
  webproxy    `python3 -m webproxy run` with `[socks] listen`, --workers (1), no access log, cache off
  dante       `danted` (Debian dante-server), method none, CONNECT only
  microsocks  `microsocks` (Debian), no authentication

Figures:
  stream      bulk throughput through one session: this process sends STREAM_GIB GiB (after an 8-byte
              length), the sink (its own process) answers with the byte count it read; the clock
              stops at that answer
  sessions    new sessions/s with an asyncio (uvloop) client: open, SOCKS5 greeting, CONNECT to nginx
              by address, `GET /1k` with `Connection: close`, read to EOF, close; --connections at a
              time (concurrent) and one at a time (sequential)

Prints each figure (best of --rounds, with the range) and its ratio to Dante.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import sys

from common import Bench, PeerFailed, exit_on_signals, explain_failure, machine_note, progress
from tunnel_bench import REQUEST_1K, SINK, Procs, Table, free_port, nginx_conf, rate, timed_send, wait_port

PEERS = ("webproxy", "dante", "microsocks")
GREETING = b"\x05\x01\x00"


def connect_request(target: int) -> bytes:
    """RFC 1928 CONNECT to 127.0.0.1:target (IPv4 address, no name to resolve)."""
    return b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big")


# --- peers ----------------------------------------------------------------------------------


def start_webproxy(bench: Bench, workers: int = 1) -> int:
    port = free_port()
    # deny_networks = []: the target is on loopback, which the shipped defaults refuse.
    bench.start_webproxy(cache=False, workers=workers, extra_toml=f'\n[socks]\nlisten = ["127.0.0.1:{port}"]\ndeny_networks = []\n'
                                                 "idle_timeout = 0.0\n\n[refresh]\nenabled = false\n")
    return port


def start_dante(bench: Bench) -> int:
    port = free_port()
    d = bench.dir / "dante"
    d.mkdir(exist_ok=True)
    conf = d / "danted.conf"
    conf.write_text(f"""
logoutput: {d}/danted.log
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}
""")
    peer = bench._spawn("dante", ["danted", "-f", str(conf), "-p", str(d / "danted.pid")], port)
    bench._start(peer)
    return port


def start_microsocks(bench: Bench) -> int:
    port = free_port()
    peer = bench._spawn("microsocks", ["microsocks", "-i", "127.0.0.1", "-p", str(port)], port)
    bench._start(peer)
    return port


STARTERS = {"webproxy": start_webproxy, "dante": start_dante, "microsocks": start_microsocks}
TOOLS = {"webproxy": None, "dante": "danted", "microsocks": "microsocks"}


# --- measurements ---------------------------------------------------------------------------


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise RuntimeError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def open_socks(port: int | None, target: int) -> socket.socket:
    """A blocking socket to the target, through the SOCKS server on `port` (None: direct)."""
    if port is None:
        return socket.create_connection(("127.0.0.1", target), timeout=60)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(GREETING)
    if recv_exact(s, 2) != b"\x05\x00":
        raise RuntimeError("the SOCKS server refused the method")
    s.sendall(connect_request(target))
    reply = recv_exact(s, 10)
    if reply[1] != 0:
        raise RuntimeError(f"CONNECT refused with reply code {reply[1]}")
    return s


def stream(port: int | None, sink: int, nbytes: int) -> float:
    return timed_send(open_socks(port, sink), nbytes, length_prefix=True)


async def _one_session(port: int | None, target: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port or target)
    try:
        if port is not None:
            writer.write(GREETING)
            if await reader.readexactly(2) != b"\x05\x00":
                raise RuntimeError("the SOCKS server refused the method")
            writer.write(connect_request(target))
            reply = await reader.readexactly(10)
            if reply[1] != 0:
                raise RuntimeError(f"CONNECT refused with reply code {reply[1]}")
        writer.write(REQUEST_1K)
        body = await reader.read(-1)
        if not body.startswith(b"HTTP/1.1 200") or len(body) < 1024:
            raise RuntimeError(f"bad reply through the session: {body[:60]!r}")
    finally:
        writer.close()


def sessions(port: int | None, target: int, seconds: float, concurrency: int) -> float:
    return rate(lambda: _one_session(port, target), seconds, concurrency, f"port {port} sessions")


# --- the run --------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5, help="per sessions figure (default 5)")
    ap.add_argument("--connections", type=int, default=50, help="concurrent clients (default 50)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each measurement, keep the best")
    ap.add_argument("--stream-gib", type=float, default=1.0, help="GiB per stream figure (default 1)")
    ap.add_argument("--only", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--workers", type=int, default=1,
                    help="webproxy server.workers (Dante forks, microsocks runs a thread per client)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (configs, logs)")
    args = ap.parse_args()
    only = [p for p in args.only.split(",") if p]
    if set(only) - set(PEERS):
        ap.error(f"unknown peer(s) {', '.join(sorted(set(only) - set(PEERS)))}")
    for tool in ["nginx", *(TOOLS[p] for p in only if TOOLS[p])]:
        if not shutil.which(tool):
            print(f"socks_bench: {tool} is not installed (apt-get install nginx dante-server microsocks)",
                  file=sys.stderr)
            return 2
    try:
        import uvloop

        uvloop.install()  # the sessions client; webproxy picks uvloop itself
    except ImportError:
        pass
    print(machine_note())
    procs = Procs()
    with Bench(keep=args.keep) as bench:
        exit_on_signals()
        try:
            sink = free_port()
            procs.start([sys.executable, "-c", SINK, str(sink), "sized"])
            wait_port(sink)
            nport = free_port()
            root = bench.dir / "nginx"
            root.mkdir()
            procs.start(["nginx", "-c", str(nginx_conf(root, nport)), "-p", str(root)])
            wait_port(nport)
            paths: dict[str, int | None] = {"direct": None}
            for name in only:
                progress(f"starting {name}")
                try:
                    paths[name] = start_webproxy(bench, args.workers) if name == "webproxy" else STARTERS[name](bench)
                except PeerFailed as e:
                    print(f"{name}: n/a ({explain_failure(str(e))})", file=sys.stderr)
            nbytes = int(args.stream_gib * (1 << 30))
            tables = [
                Table("stream", f"Throughput through one session, {args.stream_gib:g} GiB", "Gbit/s", "dante"),
                Table("concurrent", f"New sessions/s, {args.connections} at a time, GET 1 KiB each", "/s", "dante"),
                Table("sequential", "New sessions/s, one at a time, GET 1 KiB each", "/s", "dante"),
            ]
            for r in range(args.rounds):
                for name, port in paths.items():
                    progress(f"round {r + 1}/{args.rounds}: {name}")
                    tables[0].measure(name, stream, port, sink, nbytes)
                    tables[1].measure(name, sessions, port, nport, args.seconds, args.connections)
                    tables[2].measure(name, sessions, port, nport, args.seconds, 1)
            for t in tables:
                t.print()
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
