"""Benchmark the tunnels against socat, side by side in one run (loopback only).

    python3 bench/tunnel_bench.py [--seconds 5] [--rounds 2] [--connections 50] [--stream-gib 2]
                                  [--parts iperf,stream,wrk,tunnels] [--keep]

Paths measured, each against the same target:
  direct             the target itself (the ceiling; for `tunnels`, the client's own ceiling)
  webproxy-splice    `webproxy tunnel` (the standalone forwarder), splice engine
  webproxy-copy      `webproxy tunnel`, copy engine
  socat              `socat TCP-LISTEN:p,fork,reuseaddr,backlog=1024 TCP:127.0.0.1:q`
  webproxy-CONNECT   `python3 -m webproxy run` (one worker, cache and refresh off, no access log):
                     the client sends `CONNECT 127.0.0.1:q`, waits for the 200, then talks to q

Parts:
  iperf    iperf3 -c through each forwarder, one stream (iperf3 cannot speak CONNECT, so no CONNECT row)
  stream   bulk throughput with a Python sender (this process) and a Python sink (its own process):
           the sender writes STREAM_GIB GiB in 1 MiB sendall() calls, half-closes, and the clock stops
           when the sink answers with the byte count it read. Same sender and sink on every path,
           so the CONNECT row is comparable with the others.
  wrk      new connections/s: wrk with `Connection: close` against nginx (1 KiB) through each
           forwarder, so every request is a new bridge (no CONNECT row: wrk cannot send CONNECT)
  tunnels  new tunnels/s with an asyncio (uvloop) client: open, [CONNECT + wait for 200], send
           `GET /1k` with `Connection: close`, read to EOF, close. Once with one connection at a time
           (sequential), once with --connections at a time (concurrent). On the forwarders and
           socat there is no CONNECT step: socat is the plain forwarder baseline.

Prints figures and ratios to socat; with --rounds N each figure is the best of N, with the range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

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

PARTS = ("iperf", "stream", "wrk", "tunnels")
CONNECT_ROW = "webproxy-CONNECT"

# The stream sink: reads each connection to EOF, then answers with the byte count it read.
# With a second argument "sized" it reads an 8-byte length first and stops there instead of at
# EOF (for relays that do not pass a half-close on, such as microsocks).
SINK = """
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(64)
sized = sys.argv[2:] == ["sized"]
def serve(c):
    want = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big") if sized else 1 << 62
    buf = bytearray(1 << 20)
    total = 0
    while total < want and (n := c.recv_into(buf, min(len(buf), want - total))):
        total += n
    c.sendall(b"%d\\n" % total)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait for a listener without connecting to it (iperf3 takes any connection as a test)."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                if any(want in line and line.split()[3] == "0A" for line in f):
                    return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Procs:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def start_forwarders(procs: Procs, target: int) -> dict[str, int]:
    """name -> listening port, each forwarding to 127.0.0.1:target."""
    ports = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for engine in ("splice", "copy"):
        port = free_port()
        procs.start([sys.executable, "-m", "webproxy.cmd_tunnel", f"127.0.0.1:{port}", f"127.0.0.1:{target}",
                     "--relay-engine", engine, "--max-connections", "0"], cwd=ROOT, env=env)
        ports[f"webproxy-{engine}"] = port
    port = free_port()
    # socat's default listen backlog is 5: with 50 clients connecting at once, SYNs would be dropped
    # and retried after a second, which measures the backlog, not the forwarder.
    procs.start(["socat", f"TCP-LISTEN:{port},fork,reuseaddr,backlog=1024,bind=127.0.0.1",
                 f"TCP:127.0.0.1:{target}"])
    ports["socat"] = port
    for p in ports.values():
        wait_port(p)
    return ports


# --- connecting, directly or through CONNECT ------------------------------------------------


def connect_head(target: int) -> bytes:
    return f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\nHost: 127.0.0.1:{target}\r\n\r\n".encode()


def open_path(port: int, connect_to: int | None) -> socket.socket:
    """A blocking socket to 127.0.0.1:port; with connect_to, after a successful CONNECT to that port."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    if connect_to is None:
        return s
    s.sendall(connect_head(connect_to))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            s.close()
            raise RuntimeError(f"proxy closed the connection after CONNECT: {head[:200]!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        s.close()
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise RuntimeError(f"CONNECT refused: {status}")
    if not head.endswith(b"\r\n\r\n"):
        s.close()
        raise RuntimeError("the proxy sent bytes after the CONNECT answer")
    return s


# --- measurements ---------------------------------------------------------------------------


def iperf(port: int, seconds: int) -> float:
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(out.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 through port {port}: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


STREAM_BLOCK = memoryview(bytes(1 << 20))


def stream(port: int, connect_to: int | None, nbytes: int) -> float:
    """Send nbytes to the sink over one connection; Gbit/s from the first byte to the sink's count."""
    return timed_send(open_path(port, connect_to), nbytes)


def timed_send(s: socket.socket, nbytes: int, length_prefix: bool = False) -> float:
    """Send nbytes on `s` (after an 8-byte length when `length_prefix`, else followed by a
    half-close), wait for the sink's count, close; Gbit/s."""
    try:
        start = time.perf_counter()
        if length_prefix:
            s.sendall(nbytes.to_bytes(8, "big"))
        left = nbytes
        while left:
            n = min(left, len(STREAM_BLOCK))
            s.sendall(STREAM_BLOCK[:n])
            left -= n
        if not length_prefix:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            answer += chunk
        elapsed = time.perf_counter() - start
    finally:
        s.close()
    if answer.strip() != str(nbytes).encode():
        raise RuntimeError(f"the sink read {answer.strip().decode() or 'nothing'}, not {nbytes} bytes")
    return nbytes * 8 / elapsed / 1e9


def wrk(port: int, seconds: int, connections: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-H", "Connection: close",
                          f"http://127.0.0.1:{port}/1k"], capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    if errors:
        print(f"    (port {port}: socket errors {errors.group(1)})", file=sys.stderr)
    return float(m.group(1)) if m else 0.0


REQUEST_1K = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def _one_tunnel(port: int, connect_to: int | None) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if connect_to is not None:
            writer.write(connect_head(connect_to))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"CONNECT refused: {head[:60]!r}")
        writer.write(REQUEST_1K)
        reply = await reader.read(-1)
        if not reply.startswith(b"HTTP/1.1 200") or len(reply) < 1024:
            raise RuntimeError(f"bad reply through the tunnel: {reply[:60]!r}")
    finally:
        writer.close()


async def _rate(one, seconds: float, concurrency: int) -> tuple[float, int, str]:
    """Run the coroutine function `one` back to back in `concurrency` workers for `seconds`:
    (completed per second, failures, the first failure)."""
    done = errors = 0
    first_error = ""
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, errors, first_error
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(one(), 30)
                done += 1
            except (TimeoutError, OSError, RuntimeError, asyncio.IncompleteReadError) as e:
                errors += 1
                first_error = first_error or f"{type(e).__name__}: {e}"

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - start), errors, first_error


def rate(one, seconds: float, concurrency: int, what: str) -> float:
    """Completions of `one()` per second (see _rate); failures are reported on stderr."""
    per_second, errors, first = run_async(_rate(one, seconds, concurrency))
    if errors:
        print(f"    ({what}: {errors} failed, first: {first})", file=sys.stderr)
    return per_second


def tunnels(port: int, connect_to: int | None, seconds: float, concurrency: int) -> float:
    """Completed open/[CONNECT]/GET 1 KiB/close cycles per second over `seconds`."""
    return rate(lambda: _one_tunnel(port, connect_to), seconds, concurrency, f"port {port} tunnels")


# --- peers ----------------------------------------------------------------------------------


def nginx_conf(root: Path, port: int) -> Path:
    (root / "www").mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "www" / "1k").write_bytes(b"x" * 1024)
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ root {root}/www; }}
    }}
}}
""")
    return conf


def start_proxy(bench: Bench, connect_ports: list[int]) -> int | None:
    """Start webproxy (CONNECT allowed to connect_ports) and prove one tunnel works; None on failure."""
    extra = (f"\n[access]\nconnect_ports = [{', '.join(map(str, connect_ports))}]\n"
             "\n[refresh]\nenabled = false\n")
    try:
        peer = bench.start_webproxy(cache=False, extra_toml=extra)
    except PeerFailed as e:
        print(f"webproxy-CONNECT: n/a ({explain_failure(str(e))})", file=sys.stderr)
        return None
    return peer.port




# --- the run --------------------------------------------------------------------------------


class Table:
    """One measurement across paths: every round's value per path, printed best-of with the range."""

    def __init__(self, key: str, title: str, unit: str, baseline: str = "socat"):
        self.key, self.title, self.unit, self.baseline = key, title, unit, baseline
        self.values: dict[str, list[float]] = {}
        self.failed: dict[str, str] = {}

    def measure(self, name: str, fn, *a) -> None:
        if name in self.failed:
            return
        try:
            self.values.setdefault(name, []).append(fn(*a))
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
            self.failed[name] = f"{type(e).__name__}: {e}"

    def best(self, name: str) -> float:
        return max(self.values.get(name) or [0.0]) if name not in self.failed else 0.0

    def print(self) -> None:
        print(f"\n{self.title}")
        base = self.best(self.baseline)
        for name in [*self.values, *(n for n in self.failed if n not in self.values)]:
            if name in self.failed:
                print(f"  {name:18s} {'n/a':>10s} {self.unit:8s}  ({self.failed[name]})")
                continue
            vals = self.values[name]
            spread = f"[{min(vals):.1f}..{max(vals):.1f}]" if len(vals) > 1 else ""
            ratio = f"{self.best(name) / base:.2f}x {self.baseline}" if base and name != self.baseline else ""
            print(f"  {name:18s} {self.best(name):10.2f} {self.unit:8s} {spread:>18s}  {ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="per iperf/wrk/tunnels figure (default 5)")
    ap.add_argument("--connections", type=int, default=50, help="concurrent clients for wrk and tunnels")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each measurement, keep the best")
    ap.add_argument("--stream-gib", type=float, default=2.0, help="GiB per stream figure (default 2)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--skip-conn", action="store_true", help="same as --parts iperf,stream")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory (configs, logs)")
    args = ap.parse_args()
    parts = set(args.parts.split(",")) - ({"wrk", "tunnels"} if args.skip_conn else set())
    if parts - set(PARTS):
        ap.error(f"unknown part(s) {', '.join(sorted(parts - set(PARTS)))}")
    need = ["socat"] + ["iperf3"] * ("iperf" in parts) + ["nginx"] * bool(parts & {"wrk", "tunnels"}) \
        + ["wrk"] * ("wrk" in parts)
    for tool in need:
        if not shutil.which(tool):
            print(f"tunnel_bench: {tool} is not installed", file=sys.stderr)
            return 2

    try:
        import uvloop

        uvloop.install()  # the tunnels client; the proxy and forwarders pick uvloop themselves
    except ImportError:
        pass
    print(machine_note())
    tables: list[Table] = []
    procs = Procs()
    with Bench(keep=args.keep) as bench:
        exit_on_signals()
        try:
            sink_port = free_port()
            nport = free_port()
            if "stream" in parts:
                procs.start([sys.executable, "-c", SINK, str(sink_port)])
                wait_port(sink_port)
            if parts & {"wrk", "tunnels"}:
                root = bench.dir / "nginx"
                root.mkdir()
                procs.start(["nginx", "-c", str(nginx_conf(root, nport)), "-p", str(root)])
                wait_port(nport)
            proxy = start_proxy(bench, [sink_port, nport]) if parts & {"stream", "tunnels"} else None

            if "iperf" in parts:
                iperf_procs = Procs()
                try:
                    iperf_port = free_port()
                    iperf_procs.start(["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"])
                    wait_port(iperf_port)
                    fwd = start_forwarders(iperf_procs, iperf_port)
                    t = Table("iperf3 throughput", f"Throughput, iperf3 {args.seconds}s, one stream", "Gbit/s")
                    for r in range(args.rounds):
                        progress(f"iperf3 round {r + 1}/{args.rounds}")
                        t.measure("direct", iperf, iperf_port, args.seconds)
                        for name, port in fwd.items():
                            t.measure(name, iperf, port, args.seconds)
                    tables.append(t)
                    t.print()
                finally:
                    iperf_procs.stop_all()

            if "stream" in parts:
                nbytes = int(args.stream_gib * (1 << 30))
                fwd_procs = Procs()
                try:
                    fwd = start_forwarders(fwd_procs, sink_port)
                    t = Table("stream throughput", f"Throughput, Python sender -> sink, {args.stream_gib:g} GiB, one connection",
                              "Gbit/s")
                    for r in range(args.rounds):
                        progress(f"stream round {r + 1}/{args.rounds}")
                        t.measure("direct", stream, sink_port, None, nbytes)
                        for name, port in fwd.items():
                            t.measure(name, stream, port, None, nbytes)
                        if proxy:
                            t.measure(CONNECT_ROW, stream, proxy, sink_port, nbytes)
                    tables.append(t)
                    t.print()
                finally:
                    fwd_procs.stop_all()

            if parts & {"wrk", "tunnels"}:
                fwd_procs = Procs()
                try:
                    fwd = start_forwarders(fwd_procs, nport)
                    if "wrk" in parts:
                        t = Table("wrk new connections", f"New connections, wrk -c{args.connections} {args.seconds}s, "
                                  "Connection: close, nginx 1 KiB", "conn/s")
                        for r in range(args.rounds):
                            progress(f"wrk round {r + 1}/{args.rounds}")
                            t.measure("direct", wrk, nport, args.seconds, args.connections)
                            for name, port in fwd.items():
                                t.measure(name, wrk, port, args.seconds, args.connections)
                        tables.append(t)
                        t.print()
                    if "tunnels" in parts:
                        for conc, label in ((1, "sequential"), (args.connections, f"{args.connections} concurrent")):
                            t = Table(f"new tunnels, {label}", f"New tunnels, asyncio client, {label}, {args.seconds}s: open, "
                                      "[CONNECT], GET 1 KiB, close", "tunnels/s")
                            for r in range(args.rounds):
                                progress(f"tunnels {label} round {r + 1}/{args.rounds}")
                                t.measure("direct", tunnels, nport, None, args.seconds, conc)
                                for name, port in fwd.items():
                                    t.measure(name, tunnels, port, None, args.seconds, conc)
                                if proxy:
                                    t.measure(CONNECT_ROW, tunnels, proxy, nport, args.seconds, conc)
                            tables.append(t)
                            t.print()
                finally:
                    fwd_procs.stop_all()
        finally:
            procs.stop_all()

    print("\nRatios to socat (best of each; above 1 is better for webproxy)")
    for t in tables:
        base = t.best("socat")
        cells = [f"{name}/socat {t.best(name) / base:.2f}x" for name in ("webproxy-splice", "webproxy-copy", CONNECT_ROW)
                 if base and t.best(name)]
        print(f"  {t.key:28s} {'  '.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
