"""Benchmark the TCP forwarder against socat, side by side in one run (loopback only).

    python3 bench/tunnel_bench.py [--seconds 5] [--connections 50] [--skip-conn]

Throughput: iperf3 through each forwarder (and direct, as the ceiling).
New connections per second: wrk with `Connection: close` against nginx (a temporary config serving
a 1 KiB file on a loopback port) through each forwarder, so every request is a new bridge.
Forwarders: `webproxy tunnel` with the splice engine, with the copy engine, and
`socat TCP-LISTEN:p,fork,reuseaddr TCP:127.0.0.1:q`. Prints figures and ratios to socat.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
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
    procs.start(["socat", f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1", f"TCP:127.0.0.1:{target}"])
    ports["socat"] = port
    for p in ports.values():
        wait_port(p)
    return ports


def iperf(port: int, seconds: int) -> float:
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(out.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3 through port {port}: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(port: int, seconds: int, connections: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-H", "Connection: close",
                          f"http://127.0.0.1:{port}/1k"], capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    errors = re.search(r"Socket errors: (.*)", out.stdout)
    if errors:
        print(f"    (port {port}: socket errors {errors.group(1)})")
    return float(m.group(1)) if m else 0.0


def nginx_conf(root: Path, port: int) -> Path:
    (root / "www").mkdir()
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


def report(title: str, unit: str, results: dict[str, float]) -> None:
    print(f"\n{title}")
    base = results.get("socat") or 0
    for name, value in results.items():
        ratio = f"{value / base:.2f}x socat" if base and name != "socat" else ""
        print(f"  {name:18s} {value:10.2f} {unit}  {ratio}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1, help="repeat each measurement, keep the best")
    ap.add_argument("--skip-conn", action="store_true", help="throughput only (no nginx/wrk)")
    args = ap.parse_args()
    for tool in ("iperf3", "socat") + (() if args.skip_conn else ("nginx", "wrk")):
        if not shutil.which(tool):
            print(f"tunnel_bench: {tool} is not installed", file=sys.stderr)
            return 2
    procs = Procs()
    try:
        iperf_port = free_port()
        procs.start(["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"])
        wait_port(iperf_port)
        fwd = start_forwarders(procs, iperf_port)
        results = {"direct": 0.0, **{k: 0.0 for k in fwd}}
        for _ in range(args.rounds):
            results["direct"] = max(results["direct"], iperf(iperf_port, args.seconds))
            for name, port in fwd.items():
                results[name] = max(results[name], iperf(port, args.seconds))
        report(f"Throughput, iperf3 {args.seconds}s, one stream", "Gbit/s", results)

        if not args.skip_conn:
            with tempfile.TemporaryDirectory(prefix="tunnel-bench-") as tmp:
                nport = free_port()
                (Path(tmp) / "tmp").mkdir()
                conf = nginx_conf(Path(tmp), nport)
                procs.start(["nginx", "-c", str(conf), "-p", tmp])
                wait_port(nport)
                fwd = start_forwarders(procs, nport)
                results = {"direct": 0.0, **{k: 0.0 for k in fwd}}
                for _ in range(args.rounds):
                    results["direct"] = max(results["direct"], wrk(nport, args.seconds, args.connections))
                    for name, port in fwd.items():
                        results[name] = max(results[name], wrk(port, args.seconds, args.connections))
                report(f"New connections, wrk -c{args.connections} {args.seconds}s, Connection: close, "
                       "nginx 1 KiB", "conn/s", results)
                procs.stop_all()
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
