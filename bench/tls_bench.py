#!/usr/bin/env python3
"""Intercepted HTTPS: webproxy (tls.intercept) vs Squid (ssl_bump bump all + its certificate
generator), both caching, against one HTTPS nginx origin, in the same run.

Figures: 1 KiB and 1 MiB cache hits over kept-alive TLS connections through the proxy (CONNECT, TLS
with the proxy's minted certificate, then GETs), and new TLS connections per second (CONNECT + full
TLS handshake + one 1 KiB hit per connection). wrk cannot CONNECT, so the load comes from this
script's own generator: LOAD_PROCS processes of blocking `ssl` sockets in threads (one connection
per thread), each request timed for p50/p99. Clients verify the proxy's certificate against its CA,
as real clients do. Both proxies get the same ECDSA P-256 CA (made by `webproxy ca init`).

A figure counts as a hit figure only if the origin's access log did not grow during the measured run.

    python3 bench/tls_bench.py [--duration 10] [--connections 50] [--only webproxy] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO_ROOT,
    RUN_HEADERS,
    RUN_NOTE,
    Bench,
    Comparison,
    CpuSample,
    Origin,
    Peer,
    PeerFailed,
    Run,
    WrkResult,
    add_common_args,
    best,
    describe_checkout,
    explain_failure,
    fmt_num,
    free_port,
    load_average,
    machine_note,
    parse_only,
    print_comparisons,
    print_table,
    progress,
    run_cells,
    run_main,
    write_json,
)

PROXIES = ["squid", "webproxy"]
OBJECTS = {"1k": 1024, "1m": 1 << 20}
LABELS = {"1k": "1 KiB", "1m": "1 MiB"}
HOST = "localhost"  # the name both proxies mint a certificate for (and resolve to the origin)
LOAD_PROCS = 2  # load generator processes (the GIL: one process cannot keep a fast proxy busy)
# (object, mode): mode "keep-alive" (one TLS connection per thread, many GETs) or "new" (a new
# CONNECT + handshake per request)
PLAN = [("1k", "keep-alive"), ("1m", "keep-alive"), ("1k", "new")]


# --- the load generator (runs in child processes: python3 tls_bench.py --load JSON) ------------------


def _tunnel(proxy_port: int, authority: str, ctx: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("proxy closed the connection after CONNECT")
        head += chunk
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        first = head.split(b"\r\n", 1)[0]
        raise OSError(f"CONNECT answered {first!r}")
    return ctx.wrap_socket(s, server_hostname=HOST)


def _get(s: ssl.SSLSocket, request: bytes, buf: bytearray) -> tuple[int, int]:
    """One GET on a TLS connection: (status, bytes received)."""
    s.sendall(request)
    view = memoryview(buf)
    got = 0
    head_end = -1
    while head_end < 0:
        n = s.recv_into(view[got:])
        if not n:
            raise OSError("connection closed before the response head")
        got += n
        head_end = buf.find(b"\r\n\r\n", 0, got)
    head = bytes(buf[:head_end]).lower()
    status = int(head[9:12])
    i = head.find(b"\ncontent-length:")
    end = head.find(b"\r", i + 1)
    length = int(head[i + 16:end if end >= 0 else len(head)]) if i >= 0 else 0
    total = head_end + 4 + length
    while got < total:
        n = s.recv_into(view[: min(len(buf), total - got)])
        if not n:
            raise OSError("connection closed in the body")
        got += n
    return status, total


def load_process(spec: dict) -> dict:
    """Threads with one TLS connection each until the deadline; counts and per-request latencies."""
    ctx = ssl.create_default_context(cafile=spec["cafile"])
    ctx.set_alpn_protocols(["http/1.1"])
    authority = f"{HOST}:{spec['origin_port']}"
    new = spec["mode"] == "new"
    request = (f"GET {spec['path']} HTTP/1.1\r\nHost: {authority}\r\n"
               + ("Connection: close\r\n" if new else "") + "\r\n").encode()
    deadline = time.monotonic() + spec["duration"]
    lock = threading.Lock()
    totals = {"requests": 0, "bytes": 0, "err_connect": 0, "err_read": 0, "err_status": 0}
    lat: list[float] = []

    def run() -> None:
        buf = bytearray(1 << 16)
        mine: list[float] = []
        n = nbytes = econn = eread = estatus = 0
        s = None
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                if s is None:
                    s = _tunnel(spec["proxy_port"], authority, ctx, 10.0)
            except OSError:
                econn += 1
                time.sleep(0.01)
                continue
            try:
                status, size = _get(s, request, buf)
            except OSError:
                eread += 1
                s.close()
                s = None
                continue
            mine.append(time.perf_counter() - t0)
            n += 1
            nbytes += size
            if status != 200:
                estatus += 1
            if new:
                s.close()
                s = None
        if s is not None:
            s.close()
        with lock:
            totals["requests"] += n
            totals["bytes"] += nbytes
            totals["err_connect"] += econn
            totals["err_read"] += eread
            totals["err_status"] += estatus
            lat.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(spec["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**totals, "lat": lat}


def run_load(proxy_port: int, origin_port: int, obj: str, mode: str, cafile: str, duration: float,
             connections: int) -> WrkResult:
    """LOAD_PROCS generator processes, `connections` threads in all; one WrkResult-shaped summary."""
    procs = []
    per = [connections // LOAD_PROCS + (1 if i < connections % LOAD_PROCS else 0) for i in range(LOAD_PROCS)]
    started = time.monotonic()
    for threads in per:
        if threads:
            spec = {"proxy_port": proxy_port, "origin_port": origin_port, "path": f"/cache/{obj}.bin",
                    "mode": mode, "cafile": cafile, "duration": duration, "threads": threads}
            procs.append(subprocess.Popen([sys.executable, __file__, "--load", json.dumps(spec)],
                                          stdout=subprocess.PIPE))
    results = [json.loads(p.communicate(timeout=duration + 60)[0]) for p in procs]
    elapsed = time.monotonic() - started
    lat = sorted(x for r in results for x in r["lat"])

    def pct(q: float) -> int:
        return int(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else 0

    return WrkResult(requests=sum(r["requests"] for r in results), bytes=sum(r["bytes"] for r in results),
                     duration_us=int(min(elapsed, duration) * 1e6),
                     err_connect=sum(r["err_connect"] for r in results), err_read=sum(r["err_read"] for r in results),
                     err_write=0, err_status=sum(r["err_status"] for r in results), err_timeout=0,
                     lat_p50_us=pct(0.5), lat_p99_us=pct(0.99),
                     lat_mean_us=sum(lat) / len(lat) * 1e6 if lat else 0.0, lat_max_us=pct(1.0))


# --- peers --------------------------------------------------------------------------------------


def make_certs(bench: Bench) -> dict[str, str]:
    """The proxies' CA (webproxy ca init: ECDSA P-256) and the origin's trustme CA and certificate."""
    import trustme  # the test dependency; only the bench's origin needs it

    d = bench.dir / "certs"
    d.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-m", "webproxy", "ca", "init", "--dir", str(d / "proxy-ca")],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise PeerFailed(f"webproxy ca init failed: {r.stderr}")
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, "127.0.0.1")
    paths = {"proxy_ca_dir": str(d / "proxy-ca"), "proxy_ca": str(d / "proxy-ca" / "ca.pem"),
             "proxy_key": str(d / "proxy-ca" / "ca-key.pem"), "origin_ca": str(d / "origin-ca.pem"),
             "origin_cert": str(d / "origin.pem"), "origin_key": str(d / "origin-key.pem")}
    ca.cert_pem.write_to_path(paths["origin_ca"])
    leaf.cert_chain_pems[0].write_to_path(paths["origin_cert"])
    leaf.private_key_pem.write_to_path(paths["origin_key"])
    return paths


def start_tls_origin(bench: Bench, certs: dict[str, str]) -> Origin:
    """nginx over TLS serving /cache/1k.bin and /cache/1m.bin with max-age=3600."""
    d = bench.dir / "nginx-tls"
    (d / "www" / "cache").mkdir(parents=True)
    (d / "tmp").mkdir()
    for name, size in OBJECTS.items():
        (d / "www" / "cache" / f"{name}.bin").write_bytes(os.urandom(size))
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(f"""
user root root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs["origin_cert"]};
        ssl_certificate_key {certs["origin_key"]};
        root {d}/www;
        location /cache/ {{ add_header Cache-Control "max-age=3600" always; }}
    }}
}}
""")
    peer = bench._spawn("nginx-tls", ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)], port)
    return Origin(bench._start(peer), d / "access.log")


def start_squid(bench: Bench, origin: Origin, certs: dict[str, str]) -> tuple[Peer, int]:
    """Squid caching, with an ssl-bump port that bumps every CONNECT; (peer, ssl-bump port)."""
    d = bench.dir / "squid-cache"
    d.mkdir(exist_ok=True)
    db = d / "ssl_db"
    r = subprocess.run(["/usr/lib/squid/security_file_certgen", "-c", "-s", str(db), "-M", "4MB"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerFailed(f"security_file_certgen -c failed: {r.stdout}{r.stderr}")
    shutil.copy(certs["proxy_ca"], d / "bump-ca.pem")
    shutil.copy(certs["proxy_key"], d / "bump-key.pem")
    shutil.copy(certs["origin_ca"], d / "origin-ca.pem")
    bump_port = free_port()
    extra = f"""
http_port 127.0.0.1:{bump_port} ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=4MB tls-cert={d}/bump-ca.pem tls-key={d}/bump-key.pem
sslcrtd_program /usr/lib/squid/security_file_certgen -s {db} -M 4MB
sslcrtd_children 5
ssl_bump bump all
tls_outgoing_options cafile={d}/origin-ca.pem
"""
    peer = bench.start_squid(origin, cache=True, extra_conf=extra)
    return peer, bump_port


def start_webproxy(bench: Bench, origin: Origin, certs: dict[str, str], args: argparse.Namespace) -> Peer:
    return bench.start_webproxy(cache=True, workers=args.workers, root=args.webproxy_root, extra_toml=f"""
[access]
connect_ports = [443, {origin.port}]

[tls]
ca_dir = "{certs["proxy_ca_dir"]}"
intercept = ["{HOST}"]
upstream_ca_file = "{certs["origin_ca"]}"
""")


# --- measuring ------------------------------------------------------------------------------------


def warm(port: int, origin: Origin, obj: str, cafile: str, name: str) -> None:
    """Fetch through the proxy until it answers from its cache; PeerFailed if it never does."""
    ctx = ssl.create_default_context(cafile=cafile)
    authority = f"{HOST}:{origin.port}"
    request = f"GET /cache/{obj}.bin HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    buf = bytearray(1 << 16)
    try:
        with _tunnel(port, authority, ctx, 10.0) as s:
            status, _ = _get(s, request, buf)
            if status != 200:
                raise PeerFailed(f"{name}: GET https://{authority}/cache/{obj}.bin answered {status}")
            time.sleep(0.2)
            before = origin.request_count()
            for _ in range(2):
                _get(s, request, buf)
    except (OSError, ssl.SSLError) as e:
        raise PeerFailed(f"{name}: check request through the intercepting port failed: {e}") from None
    if origin.request_count() != before:
        raise PeerFailed(f"{name} did not cache https://{authority}/cache/{obj}.bin")


def measured(peer: Peer, port: int, origin: Origin, obj: str, mode: str, cafile: str,
             args: argparse.Namespace) -> Run:
    warm(port, origin, obj, cafile, peer.name)
    if args.warmup > 0:
        run_load(port, origin.port, obj, mode, cafile, args.warmup, args.connections)
    before_requests = origin.request_count()
    before = CpuSample.take(peer.proc.pid, origin.peer.proc.pid)
    result = run_load(port, origin.port, obj, mode, cafile, args.duration, args.connections)
    after = CpuSample.take(peer.proc.pid, origin.peer.proc.pid)
    cpu = None if before.peer is None or after.peer is None else after.peer - before.peer
    others = None
    if cpu is not None:
        ours = cpu + (after.children - before.children)
        if before.origin is not None and after.origin is not None:
            ours += after.origin - before.origin
        others = max(0.0, after.machine - before.machine - ours) / (after.at - before.at) / 1e4
    return Run(result, mode == "new", cpu, origin.request_count() - before_requests, others)


def measure_proxy(bench: Bench, origin: Origin, certs: dict[str, str], name: str, args: argparse.Namespace,
                  runs: dict[tuple[str, str], list[Run]], failures: dict[str, str]) -> None:
    progress(f"{name}: starting, intercepting https://{HOST}:{origin.port}")
    try:
        if name == "squid":
            peer, port = start_squid(bench, origin, certs)
        else:
            peer = start_webproxy(bench, origin, certs, args)
            port = peer.port
    except PeerFailed as e:
        failures[name] = str(e)
        print(f"{name}: n/a: {explain_failure(str(e))}", file=sys.stderr)
        return
    try:
        for obj, mode in PLAN:
            what = f"{name} {LABELS[obj]} {mode}"
            if what in failures:
                continue
            progress(f"{what}: warm, {args.warmup:g}s warm-up, {args.duration:g}s measured")
            try:
                runs.setdefault((obj, mode), []).append(
                    measured(peer, port, origin, obj, mode, certs["proxy_ca"], args))
            except PeerFailed as e:
                failures[what] = str(e)
                print(f"{what}: n/a: {explain_failure(str(e))}", file=sys.stderr)
    finally:
        bench.stop(peer)
        # Squid's cache directory is made anew by the next round's start (squid -z); its cert DB too.
        shutil.rmtree(bench.dir / "squid-cache", ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "figure", PROXIES)
    p.add_argument("--load", help=argparse.SUPPRESS)  # internal: run one load generator process
    args = p.parse_args(argv)
    if not args.load:
        args.proxies = parse_only(p, args, PROXIES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load:
        print(json.dumps(load_process(json.loads(args.load))))
        return 0
    runs: dict[str, dict[tuple[str, str], list[Run]]] = {p: {} for p in args.proxies}
    failures: dict[str, str] = {}
    note = machine_note()
    started = time.monotonic()
    with Bench(keep=args.keep) as bench:
        certs = make_certs(bench)
        progress("starting the HTTPS nginx origin")
        origin = start_tls_origin(bench, certs)
        for _ in range(args.rounds):
            for name in args.proxies:
                if name not in failures:
                    measure_proxy(bench, origin, certs, name, args, runs[name], failures)
        if args.keep:
            print(f"configs and logs kept in {bench.dir}", file=sys.stderr)

    def figure(name: str, obj: str, mode: str, attr: str) -> float | None:
        run = best(runs.get(name, {}).get((obj, mode)))
        if run is None:
            return None
        return run.cpu_us_per_request if attr == "cpu" else getattr(run.wrk, attr)

    print()
    print(f"Intercepted HTTPS cache hits (CONNECT + TLS with a minted certificate), {args.connections} "
          f"connections from {LOAD_PROCS} load processes, {args.duration:g}s each, best of {args.rounds} "
          f"round(s); new = a new CONNECT + TLS handshake for every request")
    print(note)
    print(f"webproxy from {describe_checkout(args.webproxy_root)}, {args.workers} worker(s); "
          "Squid with ssl_bump bump all")
    rows = []
    for name in args.proxies:
        for obj, mode in PLAN:
            rl = runs[name].get((obj, mode), [])
            run = best(rl)
            cells = run_cells(rl)
            fetched = sum(r.origin_requests for r in rl)
            hits = "n/a" if run is None else ("all" if fetched == 0 else f"NO: origin saw {fetched}")
            mbps = fmt_num(run.wrk.mbps, 1) if run else "n/a"
            rows.append([name, LABELS[obj], mode, cells[0], mbps, *cells[1:], hits])
    print_table(["proxy", "object", "connection", RUN_HEADERS[0], "MB/s", *RUN_HEADERS[1:], "hits"], rows)
    print(RUN_NOTE.replace("nginx's for direct", "Squid's helpers included"))
    comparisons = []
    for obj, mode in PLAN:
        label = f"{LABELS[obj]} hits, {'new TLS connections' if mode == 'new' else 'kept-alive TLS'}"
        comparisons += [
            Comparison(f"{label} req/s", figure("webproxy", obj, mode, "rps"), figure("squid", obj, mode, "rps"), 1.0),
            Comparison("  CPU us/request", figure("webproxy", obj, mode, "cpu"), figure("squid", obj, mode, "cpu"),
                       lower_is_better=True),
            Comparison("  p99 latency", figure("webproxy", obj, mode, "lat_p99_us"),
                       figure("squid", obj, mode, "lat_p99_us"), lower_is_better=True),
        ]
    print()
    print_comparisons(comparisons, [r for per in runs.values() for key in PLAN if (r := best(per.get(key)))])
    print("(target column: issue 11 asks for at least Squid's rates)")
    for what, why in failures.items():
        print(f"\n{what} was not measured: {explain_failure(why)}")
    end_load = load_average()
    print(f"\n(total {time.monotonic() - started:.0f}s; load average {end_load} at the end)")
    write_json(args.json, {"benchmark": "tls_bench", "args": {k: v for k, v in vars(args).items() if k != "load"},
                           "machine": note, "load_at_end": end_load,
                           "webproxy": describe_checkout(args.webproxy_root),
                           "rounds": {name: {f"{o} {m}": rl for (o, m), rl in per.items()}
                                      for name, per in runs.items()},
                           "comparisons": comparisons, "failures": failures})
    return 0


if __name__ == "__main__":
    run_main(main)
