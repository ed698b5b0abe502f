"""Shared benchmark plumbing: peers on free loopback ports, wrk runs, check requests.

Every peer (nginx origin, Squid, tinyproxy, webproxy) gets its own generated config inside one
temporary directory owned by a `Bench`; leaving the `with Bench()` block (normally, on an
exception, on Ctrl-C or SIGTERM) stops every process it started and removes the directory.
Benchmarks are not tests: they print figures for a person to compare side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import dataclasses
import hashlib
import http.client
import json
import os
import pwd
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bcrypt

BENCH_DIR = Path(__file__).resolve().parent
# The checkout this script lives in; webproxy is imported from here, whatever the cwd, unless
# --webproxy-root names another checkout.
REPO_ROOT = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "proxy.lua"

# Issue 9's targets for webproxy/squid, one worker each, in the same run.
GOALS = {"hit-1k": 2.0, "pass-1k": 1.2, "hit-64k": 4.0, "new-conns": 1.0}

# Objects the origin serves, under each of /nocache/ (no-store), /private/ (private) and
# /cache/ (max-age=3600).
OBJECTS = {"1k": 1024, "64k": 64 << 10, "10m": 10 << 20}
OBJECT_PATHS = {name: f"{name}.bin" for name in OBJECTS}

SQUID_USER = "proxy"  # Debian's squid user; Squid started as root drops to it


class PeerFailed(Exception):
    """A peer did not start or did not answer as expected; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def object_body(name: str) -> bytes:
    """The exact bytes the origin serves for OBJECTS[name]: pseudo-random, so nothing compresses."""
    return random.Random(f"webproxy-bench-{name}").randbytes(OBJECTS[name])


def die_with_parent() -> None:
    # Best effort against leaks if the harness itself is SIGKILLed: the kernel then sends
    # SIGKILL to the child.  (Cleared when a peer changes uid, e.g. Squid; the normal path
    # is Bench.close().)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class Peer:
    """One started server process: its name, port, process and log file."""

    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    dir: Path
    stop_timeout: float = 5.0
    proxy_auth: str | None = None  # the Proxy-Authorization value every request sends (auth on)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the peer's process group, then SIGKILL it if it lingers."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # Children that outlived their leader (nginx workers, Squid helpers) share its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@dataclasses.dataclass
class Origin:
    """The nginx origin: base URL parts and where its access log is."""

    peer: Peer
    access_log: Path

    @property
    def port(self) -> int:
        return self.peer.port

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.authority}{path}"

    def request_count(self) -> int:
        """Requests nginx has logged so far (it logs unbuffered, one line per request)."""
        try:
            with self.access_log.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0


def wait_port(peer: Peer, timeout: float = 15.0) -> None:
    """Return once the peer accepts TCP connections; raise PeerFailed if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if not peer.alive():
            raise PeerFailed(f"{peer.name} exited with status {peer.proc.returncode}:\n{peer.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", peer.port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PeerFailed(f"{peer.name} did not accept on port {peer.port} within {timeout:.0f}s:\n"
                             f"{peer.log_tail()}")
        time.sleep(0.05)


class _Terminated(BaseException):
    pass


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise _Terminated(signum)


class Bench:
    """Owns a temp directory and every peer started in it; use as a context manager."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="webproxy-bench-"))
        # Squid drops to an unprivileged user that must reach its own subdirectory.
        self.dir.chmod(0o755)
        self.peers: list[Peer] = []
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> Bench:
        # SIGTERM/SIGHUP unwind like Ctrl-C so the cleanup below runs.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise_terminated)
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if exc[0] is _Terminated:
            print("\nterminated; peers stopped", file=sys.stderr)
            sys.exit(143)
        return False

    def close(self) -> None:
        # Ctrl-C during cleanup must not leave processes behind.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for peer in reversed(self.peers):
                with contextlib.suppress(Exception):
                    peer.stop()
            self.peers.clear()
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)

    def stop(self, peer: Peer) -> None:
        """Stop one peer early (so an idle proxy does not compete for CPU with the next one)."""
        peer.stop()
        if peer in self.peers:
            self.peers.remove(peer)

    def _spawn(self, name: str, argv: list[str], port: int, env: dict | None = None,
               stop_timeout: float = 5.0, cwd: Path | None = None) -> Peer:
        pdir = self.dir / name
        pdir.mkdir(exist_ok=True)
        log = pdir / "output.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_parent, env=env,
                                    cwd=cwd or pdir)
        peer = Peer(name, port, proc, log, pdir, stop_timeout)
        self.peers.append(peer)
        return peer

    def _start(self, peer: Peer, timeout: float = 15.0) -> Peer:
        try:
            wait_port(peer, timeout)
        except PeerFailed:
            self.stop(peer)
            raise
        return peer

    # --- origin -------------------------------------------------------------------------

    def start_origin(self, workers: int = 1, locations: str | None = None,
                     files: dict[str, bytes] | None = None) -> Origin:
        """nginx serving OBJECTS under /nocache/, /private/ and /cache/ (see module docstring); or,
        given `locations` (nginx location blocks), those over `files` (name: bytes) in its root."""
        d = self.dir / "nginx"
        www = d / "www"
        for loc in ("nocache", "private", "cache"):
            (www / loc).mkdir(parents=True, exist_ok=True)
        for name, fname in OBJECT_PATHS.items() if files is None else ():
            body = object_body(name)
            for loc in ("nocache", "private", "cache"):
                (www / loc / fname).write_bytes(body)
        for fname, body in (files or {}).items():
            (www / fname).write_bytes(body)
        if locations is None:
            locations = """
        location /nocache/ { add_header Cache-Control "no-store" always; }
        location /private/ { add_header Cache-Control "private" always; }
        location /cache/   { add_header Cache-Control "max-age=3600" always; }"""
        (d / "tmp").mkdir(exist_ok=True)
        port = free_port()
        conf = d / "nginx.conf"
        conf.write_text(f"""
user root root;
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};{locations}
    }}
}}
""")
        peer = self._spawn("nginx", ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)], port)
        return Origin(self._start(peer), d / "access.log")

    # --- proxies ------------------------------------------------------------------------

    def start_squid(self, origin: Origin, cache: bool, extra_conf: str = "", name: str | None = None) -> Peer:
        """Squid with `cache deny all` (cache=False) or a memory + ufs disk cache (cache=True).

        `extra_conf` is appended to squid.conf (later directives override earlier ones). `name`:
        the peer's name when more than one Squid of a kind runs at once (a parent chain).
        """
        default = "squid-cache" if cache else "squid"
        name = name or default
        d = self.dir / name
        d.mkdir(exist_ok=True)
        port = free_port()
        if cache:
            caching = f"""
cache_mem 512 MB
maximum_object_size 64 MB
maximum_object_size_in_memory 16 MB
cache_dir ufs {d}/cache 1024 16 256
"""
        else:
            caching = "cache deny all\ncache_mem 0 MB\n"
        conf = d / "squid.conf"
        conf.write_text(f"""
http_port 127.0.0.1:{port}
visible_hostname squid-bench
cache_effective_user {SQUID_USER}
pid_filename {d}/squid.pid
cache_log {d}/cache.log
cache_store_log none
coredump_dir {d}
icp_port 0
htcp_port 0
pinger_enable off
shutdown_lifetime 1 second
# Only loopback origins are used: never ask an outside resolver.
dns_nameservers 127.0.0.1
acl bench_clients src 127.0.0.1/32
acl Safe_ports port 80 {origin.port}
http_access deny !Safe_ports
http_access allow bench_clients
http_access deny all
{caching}
{extra_conf}
# Last on purpose: `access_log none` stops Squid from evaluating any access_log line after it,
# so an access_log in extra_conf still takes effect.
access_log none
""")
        uid = pwd.getpwnam(SQUID_USER)
        for p in [d, *d.rglob("*")]:
            os.chown(p, uid.pw_uid, uid.pw_gid)
        # A per-run service name keeps our shared-memory segments and sockets apart from any
        # other Squid on the machine.
        service = f"bench{os.getpid()}{'c' if cache else 'p'}" + ("" if name == default else name.replace("-", ""))
        argv = ["squid", "-N", "-n", service, "-f", str(conf)]
        if cache:
            z = subprocess.run([*argv, "-z"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            if z.returncode != 0:
                raise PeerFailed(f"squid -z failed ({z.returncode}):\n{z.stdout.decode(errors='replace')[-2000:]}")
        peer = self._spawn(name, argv, port, stop_timeout=5.0)
        peer.log = d / "cache.log"  # Squid writes its diagnostics there, not to stdout
        return self._start(peer, timeout=30.0)

    def start_tinyproxy(self) -> Peer:
        d = self.dir / "tinyproxy"
        d.mkdir(exist_ok=True)
        port = free_port()
        conf = d / "tinyproxy.conf"
        conf.write_text(f"""
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 512
Allow 127.0.0.1
LogLevel Error
LogFile "{d}/tinyproxy.log"
PidFile "{d}/tinyproxy.pid"
DisableViaHeader Yes
XTinyproxy No
""")
        peer = self._spawn("tinyproxy", ["tinyproxy", "-d", "-c", str(conf)], port)
        return self._start(peer)

    def start_webproxy(self, cache: bool, workers: int = 1, extra_toml: str = "",
                       root: Path = REPO_ROOT, auth: bool = False) -> Peer:
        """`python3 -m webproxy run -c FILE` from the checkout `root` (PYTHONPATH=root; default: this one).
        auth: [auth] on (htpasswd, one bcrypt user); the peer's proxy_auth is its credentials."""
        name = ("webproxy-cache" if cache else "webproxy") + ("-auth" if auth else "")
        d = self.dir / name
        d.mkdir(exist_ok=True)
        port = free_port()
        conf = d / "webproxy.toml"
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = {workers}

[log]
access_log = ""
level = "warning"

[cache]
enabled = {"true" if cache else "false"}
directory = "{d}/cache"
{AUTH_TOML.format(users=d / "users") if auth else ""}
{extra_toml}
""")
        if auth:
            (d / "users").write_text(f"{BENCH_USER}:{bcrypt.hashpw(BENCH_PASSWORD.encode(), bcrypt.gensalt(10)).decode()}\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        peer = self._spawn(name, [sys.executable, "-m", "webproxy", "run", "-c", str(conf)], port, env=env)
        if auth:
            peer.proxy_auth = "Basic " + base64.b64encode(f"{BENCH_USER}:{BENCH_PASSWORD}".encode()).decode()
        return self._start(peer, timeout=20.0)


BENCH_USER, BENCH_PASSWORD = "bench", "bench-password"
AUTH_TOML = """
[auth]
backend = "htpasswd"
htpasswd_file = "{users}"
"""


# --- requests -------------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def fetch(port: int, target: str, host: str, timeout: float = 30.0, proxy_auth: str | None = None) -> Reply:
    """One GET of `target` (absolute URL through a proxy, or a path direct) sent to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        if proxy_auth:
            conn.putheader("Proxy-Authorization", proxy_auth)
        conn.endheaders()
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def check_object(port: int, target: str, host: str, name: str, proxy_auth: str | None = None) -> Reply:
    """Fetch and insist on 200 with exactly the origin's bytes for object `name`."""
    try:
        reply = fetch(port, target, host, proxy_auth=proxy_auth)
    except OSError as e:
        raise PeerFailed(f"check request {target} via port {port} failed: {e}") from None
    want = object_body(name)
    if reply.status != 200:
        raise PeerFailed(f"check request {target} via port {port}: status {reply.status}, want 200; "
                         f"body starts {reply.body[:200]!r}")
    if reply.body != want:
        raise PeerFailed(f"check request {target} via port {port}: body of {len(reply.body)} bytes "
                         f"(sha256 {hashlib.sha256(reply.body).hexdigest()[:12]}) is not the origin's "
                         f"{len(want)} bytes")
    return reply


# --- wrk ------------------------------------------------------------------------------------


@dataclasses.dataclass
class WrkResult:
    requests: int
    bytes: int
    duration_us: int
    err_connect: int
    err_read: int
    err_write: int
    err_status: int
    err_timeout: int
    lat_p50_us: int
    lat_p99_us: int
    lat_mean_us: float
    lat_max_us: int

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def mbps(self) -> float:
        """Received bytes (heads included) per second, in MB/s (10^6 bytes)."""
        return self.bytes / self.duration_us if self.duration_us else 0.0

    @property
    def socket_errors(self) -> int:
        return self.err_connect + self.err_read + self.err_write + self.err_timeout

    @property
    def closes_every_connection(self) -> bool:
        """True when (nearly) every response was followed by the peer closing the connection.

        A peer that closes after each response without `Connection: close` (tinyproxy 1.11) makes
        wrk's next write/read on that connection fail; wrk counts a read error and reconnects.
        The responses themselves were complete.
        """
        return self.requests > 0 and self.err_read >= 0.9 * self.requests and not self.err_status

    def errors_text(self) -> str:
        """'0' or e.g. 'status>=400:12 read:3'; '*' marks read errors that are only closes."""
        parts = [f"{k}:{v}" for k, v in (("status>=400", self.err_status), ("connect", self.err_connect),
                                          ("read", self.err_read), ("write", self.err_write),
                                          ("timeout", self.err_timeout)) if v]
        text = " ".join(parts) or "0"
        return text + "*" if self.closes_every_connection else text


def run_wrk(port: int, target: str, host: str, duration: float, connections: int = 50, threads: int = 2,
            timeout: float = 10.0, close: bool = False, proxy_auth: str | None = None) -> WrkResult:
    """Run wrk against 127.0.0.1:port sending `target` with Host `host`; parse proxy.lua's summary.

    close=True sends `Connection: close` on every request, so each request is a new connection."""
    threads = max(1, min(threads, connections))
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", f"{timeout:g}s", *(["-H", "Connection: close"] if close else []),
            "-s", str(LUA_SCRIPT), f"http://127.0.0.1:{port}/", "--", target, host, *([proxy_auth] if proxy_auth else [])]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + timeout + 30)
    text = out.stdout.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            return WrkResult(**json.loads(line[8:]))
    raise PeerFailed(f"wrk produced no summary (exit {out.returncode}):\n{text[-1500:]}")


# --- CPU accounting -------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read_stat(path: str) -> tuple[str, list[bytes]] | None:
    """(comm, fields after "(comm)") of a /proc stat file: state ppid pgrp session ... utime(14) stime
    cutime cstime; None if the process or thread is gone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.index(b"(") + 1:data.rindex(b")")].decode(errors="replace")
    return comm, data[data.rindex(b")") + 2:].split()


def _session_stats(sid: int, threads: bool = False):
    """(tid, comm, stat fields) of every live process in session `sid` (threads=False: tid is the
    pid), or of every thread of those processes (threads=True)."""
    with os.scandir("/proc") as it:
        pids = [entry.name for entry in it if entry.name.isdigit()]
    for pid in pids:
        stat = _read_stat(f"/proc/{pid}/stat")
        if stat is None or int(stat[1][3]) != sid:
            continue
        if not threads:
            yield int(pid), *stat
            continue
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = _read_stat(f"/proc/{pid}/task/{tid}/stat")
                if stat is not None:
                    yield int(tid), *stat


def session_cpu_us(sid: int) -> float | None:
    """CPU time (utime+stime, plus cutime+cstime of reaped children) of every live process in
    session `sid`, in microseconds; None if no process is left.

    Every peer is started as a session leader, so this covers its workers and helpers (Squid's
    unlinkd, webproxy's forked workers) as well as threads."""
    ticks = [sum(int(x) for x in fields[11:15]) for _tid, _comm, fields in _session_stats(sid)]
    return sum(ticks) * 1e6 / CLK_TCK if ticks else None


def thread_cpu_us(sid: int) -> dict[int, tuple[str, float]]:
    """utime+stime of every thread in session `sid`, by thread id: (name, microseconds)."""
    return {tid: (comm, sum(int(x) for x in fields[11:13]) * 1e6 / CLK_TCK)
            for tid, comm, fields in _session_stats(sid, threads=True)}


def machine_busy_us() -> float:
    """CPU time all CPUs spent in user, nice, system or steal since boot, in microseconds.

    irq and softirq are left out: loopback traffic's softirq time is mostly our own peers' work,
    and processes' stime already holds part of it."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + steal) * 1e6 / CLK_TCK


def children_cpu_us() -> float:
    """CPU time of this process's reaped children (wrk), in microseconds."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * 1e6


@dataclasses.dataclass
class CpuSample:
    """What the CPU counters said at one moment (microseconds)."""

    at: float
    peer: float | None
    origin: float | None
    machine: float
    children: float

    @classmethod
    def take(cls, peer_pid: int | None, origin_pid: int | None) -> CpuSample:
        return cls(time.monotonic(), session_cpu_us(peer_pid) if peer_pid else None,
                   session_cpu_us(origin_pid) if origin_pid else None, machine_busy_us(), children_cpu_us())


@dataclasses.dataclass
class Run:
    """One measured wrk run, with the CPU the measured process used and what else the machine did."""

    wrk: WrkResult
    close: bool  # Connection: close on every request
    cpu_us: float | None  # the measured peer's process tree (proxy, or nginx for direct) during the run
    origin_requests: int  # requests the origin logged during the run
    others_cpu_pct: float | None  # machine busy time minus peer, origin and wrk, in % of one CPU

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_us is None or not self.wrk.requests:
            return None
        return self.cpu_us / self.wrk.requests

    def summary(self) -> dict:
        """The JSON form: wrk's fields, the derived figures and the CPU fields."""
        return {**dataclasses.asdict(self.wrk), "rps": self.wrk.rps, "mbps": self.wrk.mbps, "close": self.close,
                "cpu_us": self.cpu_us, "cpu_us_per_request": self.cpu_us_per_request,
                "origin_requests": self.origin_requests, "others_cpu_pct": self.others_cpu_pct}


def measured_run(port: int, target: str, origin: Origin, args: argparse.Namespace, peer: Peer | None,
                 close: bool = False) -> Run:
    """Warm up for args.warmup seconds, then one measured wrk run of args.duration seconds.

    The CPU of `peer`'s process tree (the proxy; None: the origin itself is measured) is sampled right
    before and after the measured run and divided by the requests wrk completed."""
    if args.warmup > 0:
        run_wrk(port, target, origin.authority, args.warmup, args.connections, args.threads, close=close,
                proxy_auth=peer and peer.proxy_auth)
    measured = peer or origin.peer
    before_requests = origin.request_count()
    before = CpuSample.take(measured.proc.pid, None if peer is None else origin.peer.proc.pid)
    result = run_wrk(port, target, origin.authority, args.duration, args.connections, args.threads, close=close,
                     proxy_auth=peer and peer.proxy_auth)
    after = CpuSample.take(measured.proc.pid, None if peer is None else origin.peer.proc.pid)
    cpu = None if before.peer is None or after.peer is None else after.peer - before.peer
    others = None
    if cpu is not None:
        ours = cpu + (after.children - before.children)
        if before.origin is not None and after.origin is not None:
            ours += after.origin - before.origin
        others = max(0.0, after.machine - before.machine - ours) / (after.at - before.at) / 1e4
    return Run(result, close, cpu, origin.request_count() - before_requests, others)


# --- profiling ------------------------------------------------------------------------------


def profile_run(peer: Peer, port: int, target: str, origin: Origin, args: argparse.Namespace, stem: str,
                close: bool = False) -> None:
    """py-spy record `peer` (and its forked workers) for args.profile_seconds under wrk load: keep-alive,
    or with close=True `Connection: close` on every request.

    Writes DIR/STEM.speedscope.json (open it in https://www.speedscope.app) and DIR/STEM-top.txt,
    the functions by own time; DIR is args.profile.  Runs after the measured figures, so sampling
    never slows a measured run; if py-spy fails, it says why on stderr and the run carries on."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    seconds = max(1, round(args.profile_seconds))
    speedscope = out / f"{stem}.speedscope.json"
    argv = ["py-spy", "record", "--pid", str(peer.proc.pid), "--subprocesses", "--duration", str(seconds),
            "--rate", str(args.profile_rate), "--format", "speedscope", "--output", str(speedscope)]
    progress(f"{peer.name}: py-spy record {seconds}s under load -> {speedscope}")
    spy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)  # attached before the load starts; the load outlasts the sampling
        before, started = thread_cpu_us(peer.proc.pid), time.monotonic()
        run_wrk(port, target, origin.authority, seconds + 1.5, args.connections, args.threads, close=close,
                proxy_auth=peer.proxy_auth)
        text = spy.communicate(timeout=30)[0].decode(errors="replace")
        after, wall = thread_cpu_us(peer.proc.pid), time.monotonic() - started
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not speedscope.exists():
        # A profile is extra evidence: say so and keep the measured figures.
        last = text.strip().splitlines()[-1] if text.strip() else "no output"
        print(f"profile {stem} failed: py-spy exited {spy.returncode}: {last}", file=sys.stderr)
        return
    # Each thread's real CPU share (% of one CPU) while py-spy sampled, from /proc.
    busy = {tid: (comm, 100 * (us - before.get(tid, (comm, 0.0))[1]) / 1e6 / wall)
            for tid, (comm, us) in after.items()}
    top = top_functions(speedscope, seconds * args.profile_rate, busy)
    (out / f"{stem}-top.txt").write_text(f"{stem}: {target} through {peer.name}, {args.connections} "
                                         f"{'Connection: close' if close else 'keep-alive'} connections, py-spy "
                                         f"{seconds}s at {args.profile_rate}/s\n{top}")
    print(f"profile {stem}: {speedscope} and {out / f'{stem}-top.txt'}", file=sys.stderr)


def short_file(path: str) -> str:
    """A frame's file the way py-spy prints it: from the package (or stdlib module) down."""
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3." and "/" in rest else rest
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part in ("webproxy", "cache", "tunnel") and i < len(parts) - 1:
            return "/".join(parts[i:])
    return path


def top_functions(speedscope: Path, expected: int, busy: dict[int, tuple[str, float]] | None = None,
                  most: int = 25) -> str:
    """A `py-spy top`-style table from a speedscope file: functions by own samples, with their totals.

    Lines of one function are merged.  `expected` (rate x seconds) gives each thread's share of
    samples that py-spy took as not idle.  py-spy can take a thread blocked in a lock wait (a
    thread pool's idle worker) for a running one, so when `busy` (each thread's real CPU share in %
    of one CPU, by thread id, from /proc) is given, threads under 5% are listed but left out of the
    table.  Own time of the outermost frame (Runner.run) is time in the event loop's C code with
    no Python frame above it."""
    data = json.loads(speedscope.read_text())
    names = [f"{f['name']} ({short_file(f.get('file', '?'))})" for f in data["shared"]["frames"]]
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    lines = []
    for prof in data["profiles"]:
        stacks = [stack for stack in prof["samples"] if stack]  # one sample each, whatever the weight unit
        m = re.search(r"Thread (\d+)", prof["name"])
        cpu = busy.get(int(m.group(1))) if busy is not None and m else None
        counted = cpu is None or cpu[1] >= 5
        lines.append(f"{prof['name']}: {len(stacks)} non-idle samples of about {expected} "
                     f"({100 * len(stacks) / expected if expected else 0:.0f}%)"
                     + ("" if cpu is None else f"; CPU {cpu[1]:.0f}% of one CPU")
                     + ("" if counted else "; left out of the table"))
        if not counted:
            continue
        for stack in stacks:
            own[names[stack[-1]]] += 1
            for name in {names[i] for i in stack}:
                total[name] += 1
    samples = sum(own.values())
    # Own time by package (the file's first path part: webproxy, cache, aiohttp, asyncio, ...).
    by_package: collections.Counter[str] = collections.Counter()
    for name, n in own.items():
        by_package[re.split(r"[/.]", name.rsplit(" (", 1)[1][:-1], maxsplit=1)[0]] += n
    lines.append("")
    lines.append("own time by package: " + ", ".join(f"{pkg} {100 * n / samples:.1f}%"
                                                     for pkg, n in by_package.most_common(8)) if samples else "")
    rows = [[f"{100 * n / samples:.1f}%", f"{100 * total[name] / samples:.1f}%", str(n), name]
            for name, n in own.most_common(most)] if samples else []
    head = ["own", "total", "samples", "function (file)"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines.append("")
    lines.append("  ".join(h.rjust(w) if i < 3 else h for i, (h, w) in enumerate(zip(head, widths, strict=True))))
    lines += ["  ".join(c.rjust(w) if i < 3 else c for i, (c, w) in enumerate(zip(r, widths, strict=True)))
              for r in rows]
    return "\n".join(lines) + "\n"


# --- arguments ------------------------------------------------------------------------------


def checkout_dir(value: str) -> Path:
    """argparse type for --webproxy-root: a directory with a webproxy package in it."""
    root = Path(value).resolve()
    if not (root / "webproxy" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{root} has no webproxy/__init__.py")
    return root


def describe_checkout(root: Path) -> str:
    """'ROOT (git 17ebdea)', with ', uncommitted changes' when the tree differs from its commit."""
    def git(*argv: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return str(root)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "webproxy", "cache", "tunnel")
    return f"{root} (git {commit}{', uncommitted changes' if dirty else ''})"


def add_common_args(p: argparse.ArgumentParser, per: str, only: list[str]) -> None:
    """The options passthrough.py and cache_hits.py share; `per` is what one figure is for."""
    p.add_argument("--duration", type=float, default=10.0, help=f"seconds measured per {per} (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these (repeat or comma-separate): {', '.join(only)}")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sequence N times, each peer restarted; rows show the best round "
                        "(default 1)")
    p.add_argument("--workers", type=int, default=1, help="webproxy [server] workers (default 1)")
    p.add_argument("--webproxy-root", type=checkout_dir, default=REPO_ROOT, metavar="DIR",
                   help="the checkout whose webproxy is measured (its PYTHONPATH; default: the one this "
                        "script lives in)")
    p.add_argument("--new-conns", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure new connections/s: Connection: close on every request (default on)")
    p.add_argument("--profile", metavar="DIR",
                   help="after the figures, py-spy record webproxy under the same load into DIR")
    p.add_argument("--profile-seconds", type=float, default=10.0, help="py-spy sampling time (default 10)")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (configs, logs)")


def parse_only(p: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> list[str]:
    """`names`, in order, narrowed to args.only (comma-separated or repeated); unknown names are errors."""
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in only if n not in names]
    if unknown:
        p.error(f"unknown name(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return [n for n in names if not only or n in only]


# --- printing -------------------------------------------------------------------------------


def fmt_us(us: float | None) -> str:
    if us is None:
        return "n/a"
    if us >= 1e6:
        return f"{us / 1e6:.2f}s"
    if us >= 1e3:
        return f"{us / 1e3:.2f}ms"
    return f"{us:.0f}us"


def fmt_num(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_note() -> str:
    return (f"{os.cpu_count()} CPUs, load average {load_average()} at start "
            f"(other work on the machine makes figures noisy: compare ratios within one run)")


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}%"


def best(runs: list[Run] | None) -> Run | None:
    """The round with the most req/s: other work on the machine only ever slows a run down."""
    return max(runs, key=lambda r: r.wrk.rps) if runs else None


def run_cells(runs: list[Run] | None) -> list[str]:
    """For one row, from its best round: req/s, p50, p99, CPU us/request, requests, errors, others;
    then every round's req/s as `min..max (N)` (n/a when not measured)."""
    run = best(runs)
    if run is None:
        return ["n/a"] * 8
    r = run.wrk
    rates = [x.wrk.rps for x in runs]
    spread = fmt_num(r.rps) if len(runs) == 1 else f"{min(rates):,.0f}..{max(rates):,.0f} ({len(runs)})"
    return [fmt_num(r.rps), fmt_us(r.lat_p50_us), fmt_us(r.lat_p99_us), fmt_num(run.cpu_us_per_request, 1),
            fmt_num(r.requests), r.errors_text(), fmt_pct(run.others_cpu_pct), spread]


RUN_HEADERS = ["req/s", "p50", "p99", "CPU us/req", "requests", "errors", "others", "rounds' req/s"]
RUN_NOTE = ("Each row is its best round (most req/s); rounds' req/s is the range over all rounds.\n"
            "CPU us/req: utime+stime of the proxy's processes (nginx's for direct) during the run / requests "
            "completed.\nothers: CPU the rest of the machine used meanwhile, in % of one CPU (noise).")


@dataclasses.dataclass
class Comparison:
    """webproxy's figure against Squid's in the same run, and the issue's target for the ratio."""

    what: str
    webproxy: float | None
    squid: float | None
    goal: float | None = None
    lower_is_better: bool = False  # CPU per request

    @property
    def ratio(self) -> float | None:
        return self.webproxy / self.squid if self.webproxy and self.squid else None

    @property
    def met(self) -> bool | None:
        return None if self.goal is None or self.ratio is None else self.ratio >= self.goal

    def cells(self) -> list[str]:
        if self.goal is not None:
            target = f">= {self.goal:.1f}x  " + {True: "met", False: "MISSED", None: "n/a"}[self.met]
        else:
            target = "lower is better" if self.lower_is_better else ""
        return [self.what, "n/a" if self.ratio is None else f"{self.ratio:.2f}x", target]

    def summary(self) -> dict:
        return {"what": self.what, "webproxy": self.webproxy, "squid": self.squid, "ratio": self.ratio,
                "goal": self.goal, "met": self.met}


AUTH_COST_GOAL = 10.0  # issue 10: auth on (cached credentials) may cost at most this % of req/s


def auth_cost(what: str, on_rps: float | None, off_rps: float | None, on_cpu: float | None,
              off_cpu: float | None) -> str:
    """One line: webproxy-auth against webproxy in the same run (req/s lost, CPU per request added)."""
    if not on_rps or not off_rps:
        return f"auth cost, {what}: n/a"
    lost = 100 * (1 - on_rps / off_rps)
    cpu = f", CPU us/request {100 * (on_cpu / off_cpu - 1):+.1f}%" if on_cpu and off_cpu else ""
    verdict = "met" if lost < AUTH_COST_GOAL else "MISSED"
    return (f"auth cost, {what}: req/s {on_rps:,.0f} with auth vs {off_rps:,.0f} without ({lost:+.1f}% lost){cpu}; "
            f"target < {AUTH_COST_GOAL:g}%: {verdict}")


NOISY_PCT = 25.0  # others above this in a row: its req/s says more about the machine than the proxy


def print_comparisons(comparisons: list[Comparison], shown: list[Run]) -> None:
    """The ratio table; `shown` are the runs the table's rows come from, checked for noise."""
    if all(c.ratio is None for c in comparisons):
        print("(no webproxy/squid ratios: they need both measured in the same run)")
        return
    print_table(["webproxy/squid, same run", "ratio", "target"], [c.cells() for c in comparisons])
    noisy = [r for r in shown if (r.others_cpu_pct or 0) > NOISY_PCT]
    if noisy:
        print(f"NOISY: in {len(noisy)} of {len(shown)} rows other work took over {NOISY_PCT:.0f}% of a CPU; "
              f"req/s ratios are unreliable (rerun, or raise --rounds); CPU us/request is steadier")


def progress(what: str) -> None:
    """Say what is happening on stderr, so stdout holds only the results."""
    sys.stdout.flush()
    print(f"... {what}", file=sys.stderr, flush=True)


def explain_failure(why: str) -> str:
    """First and last line of a PeerFailed message (for a traceback: the exception line)."""
    text = [line for line in why.strip().splitlines() if line.strip()]
    if len(text) <= 2:
        return " / ".join(t.strip() for t in text)
    return f"{text[0].rstrip(':')}: {text[-1].strip()} (--keep keeps the full log)"


CLOSE_NOTE = ("* read errors equal to the request count: the proxy closed the client connection after "
              "every response\n  (no keep-alive), so wrk reconnected; each counted response was complete.")


def write_json(path: str | None, data: object) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=_json_default))
    print(f"results written to {path}", file=sys.stderr)


def _json_default(o: object) -> object:
    if hasattr(o, "summary"):
        return o.summary()
    if isinstance(o, Path):
        return str(o)
    return dataclasses.asdict(o)


def run_main(main) -> None:
    """sys.exit(main()), with Ctrl-C reported as an interruption (Bench has stopped the peers by then)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; peers stopped", file=sys.stderr)
        sys.exit(130)


def exit_on_signals() -> None:
    """Make SIGTERM/SIGHUP raise SystemExit, so `finally` blocks and Bench still clean up. (Bench's
    own handlers raise an exception that an event loop swallows; see run_async for loops.)"""

    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def run_async(coro):
    """asyncio.run(coro), where SIGTERM, SIGHUP or SIGINT cancel the run and then raise SystemExit.

    An exception raised by a Python signal handler can land inside an event-loop callback, where
    the loop logs and drops it, and the run carries on against stopped peers; the loop's own
    signal handlers avoid that."""
    got: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: (got.append(s), task.cancel()))
        return await coro

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        if not got:
            raise
    finally:
        # Closing the loop reset these to the defaults.
        exit_on_signals()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if got:
        raise SystemExit(128 + got[0])
    return result
