"""`webproxy tunnel` as a user runs it: a subprocess, real upstream servers, real clients."""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0  # ceiling for things that must happen; never a speed check
# The full CLI needs the front end's `run` module; until it exists, run the subcommand module directly.
CLI = ([sys.executable, "-m", "webproxy", "tunnel"] if importlib.util.find_spec("webproxy.cmd_run")
       else [sys.executable, "-m", "webproxy.cmd_tunnel"])


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        s.sendall(self.server.name + b"\n")
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                return
            if not data:
                return
            s.sendall(data)


class Upstream(socketserver.ThreadingTCPServer):
    """Says its name on connect, then echoes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name.encode()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def upstreams():
    made = []

    def make(name):
        u = Upstream(name)
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


def dead_addr() -> str:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


class Forwarder:
    """A running `webproxy tunnel` subprocess; stderr lines are collected in a queue."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.ports = []

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, pattern: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no stderr line matching {pattern!r}; saw {self.seen}") from None
            if line is None:
                raise AssertionError(f"forwarder exited; saw {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def wait_listening(self, count: int = 1) -> list[int]:
        for _ in range(count):
            line = self.next_line(r"listening on")
            self.ports.append(int(re.search(r"listening on \S+:(\d+)", line).group(1)))
        return self.ports

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def forwarder():
    started = []

    def run(*args):
        f = Forwarder(*args)
        started.append(f)
        return f

    yield run
    for f in started:
        f.stop()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.settimeout(WAIT)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def banner(s: socket.socket) -> bytes:
    """The upstream's name line, or b"" when the forwarder closed the connection."""
    out = b""
    while not out.endswith(b"\n"):
        try:
            chunk = s.recv(1)
        except ConnectionResetError:
            return b""
        if not chunk:
            return out
        out += chunk
    return out.strip()


def test_round_robin_spreads_connections_and_logs_each_bridge(forwarder, upstreams):
    a, b = upstreams("A"), upstreams("B")
    fw = forwarder("127.0.0.1:0", a.addr, b.addr)
    port = fw.wait_listening()[0]
    names = []
    for _ in range(4):
        with connect(port) as s:
            names.append(banner(s))
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
        line = fw.next_line(r" tunnel client=")
        assert re.search(r"client=127\.0\.0\.1:\d+ upstream=127\.0\.0\.1:\d+ up=4 down=6 duration=\S+s end=closed",
                         line), line
    assert names == [b"A", b"B", b"A", b"B"]


def test_failover_skips_an_upstream_that_refuses(forwarder, upstreams):
    good = upstreams("GOOD")
    fw = forwarder("127.0.0.1:0", dead_addr(), good.addr, "--connect-timeout", "5")
    port = fw.wait_listening()[0]
    for _ in range(3):
        with connect(port) as s:
            assert banner(s) == b"GOOD"


def test_all_upstreams_down_closes_client_and_logs_why(forwarder):
    dead = dead_addr()
    fw = forwarder("127.0.0.1:0", dead)
    port = fw.wait_listening()[0]
    with connect(port) as s:
        assert banner(s) == b""
    line = fw.next_line(r"end=upstream-failed")
    assert "connection refused" in line and dead in line


def test_least_connections_sends_new_client_to_the_idle_upstream(forwarder, upstreams):
    a, b = upstreams("A"), upstreams("B")
    fw = forwarder("127.0.0.1:0", a.addr, b.addr, "--balance", "least-connections")
    port = fw.wait_listening()[0]
    held = connect(port)
    assert banner(held) == b"A"
    with connect(port) as s:
        assert banner(s) == b"B"
    fw.next_line(r"end=closed")
    # A still holds one connection, B none: B again (round-robin would have chosen A).
    with connect(port) as s:
        assert banner(s) == b"B"
    held.close()


def test_max_connections_refuses_extra_clients_then_recovers(forwarder, upstreams):
    a = upstreams("A")
    fw = forwarder("127.0.0.1:0", a.addr, "--max-connections", "2")
    port = fw.wait_listening()[0]
    first, second = connect(port), connect(port)
    assert banner(first) == b"A" and banner(second) == b"A"
    with connect(port) as third:
        assert banner(third) == b""
    fw.next_line(r"end=refused-full")
    first.close()
    fw.next_line(r"end=closed")
    with connect(port) as fourth:
        assert banner(fourth) == b"A"
    second.close()


def test_when_full_wait_keeps_extra_client_in_backlog_until_a_slot_frees(forwarder, upstreams):
    a = upstreams("A")
    fw = forwarder("127.0.0.1:0", a.addr, "--max-connections", "1", "--when-full", "wait")
    port = fw.wait_listening()[0]
    first = connect(port)
    assert banner(first) == b"A"
    waiting = connect(port)  # the kernel completes the handshake; the forwarder does not accept yet
    assert select.select([waiting], [], [], 0.3)[0] == []
    first.close()
    assert banner(waiting) == b"A"
    waiting.close()


def test_per_client_limit_applies_to_each_address_separately(forwarder, upstreams):
    a = upstreams("A")
    fw = forwarder("127.0.0.1:0", a.addr, "--max-per-client", "1")
    port = fw.wait_listening()[0]
    one = connect(port, "127.0.0.1")
    assert banner(one) == b"A"
    with connect(port, "127.0.0.1") as again:
        assert banner(again) == b""
    fw.next_line(r"client=127\.0\.0\.1:\d+ .*end=refused-per-client-limit")
    with connect(port, "127.0.0.2") as other:
        assert banner(other) == b"A"
    one.close()


def test_clients_outside_allowed_networks_are_denied(forwarder, upstreams):
    a = upstreams("A")
    fw = forwarder("127.0.0.1:0", a.addr, "--allow", "127.0.0.2/32")
    port = fw.wait_listening()[0]
    with connect(port, "127.0.0.1") as s:
        assert banner(s) == b""
    fw.next_line(r"client=127\.0\.0\.1:\d+ upstream=- .*end=denied")
    with connect(port, "127.0.0.2") as s:
        assert banner(s) == b"A"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_forwarder_with_exit_0(forwarder, upstreams, sig):
    a = upstreams("A")
    fw = forwarder("127.0.0.1:0", a.addr)
    port = fw.wait_listening()[0]
    held = connect(port)
    assert banner(held) == b"A"
    fw.proc.send_signal(sig)
    assert fw.proc.wait(WAIT) == 0
    assert held.recv(1) == b""  # the open bridge was closed too
    held.close()


def test_idle_bridge_is_closed_after_idle_timeout(forwarder, upstreams):
    a = upstreams("A")
    fw = forwarder("127.0.0.1:0", a.addr, "--idle-timeout", "0.3")
    port = fw.wait_listening()[0]
    with connect(port) as s:
        assert banner(s) == b"A"
        assert s.recv(1) == b""  # nobody talks: the forwarder closes the bridge
    fw.next_line(r"up=0 down=2 duration=\S+ end=idle-timeout")


def test_bad_config_file_is_one_line_and_exit_2(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('[[tunnel]]\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:9"]\nbalance = "random"\n')
    p = subprocess.run([*CLI, "-c", str(conf)], cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "tunnel[0].balance" in p.stderr, p.stderr


def test_port_in_use_is_one_line_and_exit_2():
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        p = subprocess.run([*CLI, f"127.0.0.1:{port}", "127.0.0.1:9"], cwd=ROOT, capture_output=True,
                           text=True, timeout=WAIT)
    finally:
        busy.close()
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0
    assert "address already in use" in p.stderr and f"127.0.0.1:{port}" in p.stderr


@pytest.mark.parametrize("args,words", [
    (["127.0.0.1:99999", "127.0.0.1:80"], "out of range"),
    (["127.0.0.1:8080", "no-port-here"], "is not \"host:port\""),
    (["127.0.0.1:8080", "127.0.0.1:80", "--allow", "banana"], "is not a network"),
])
def test_bad_addresses_are_one_line_and_exit_2(args, words):
    p = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and words in p.stderr, p.stderr


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_fd_leak_after_stress_with_resets_and_unreachable_upstreams(forwarder, upstreams, tmp_path):
    echo = upstreams("E")
    conf = tmp_path / "tunnels.toml"
    conf.write_text(
        "[[tunnel]]\n"
        f'listen = "127.0.0.1:0"\nupstreams = ["{dead_addr()}", "{echo.addr}"]\nmax_connections = 50\n'
        "[[tunnel]]\n"
        f'listen = "127.0.0.1:0"\nupstreams = ["{dead_addr()}"]\n'
    )
    fw = forwarder("-c", str(conf))
    good, bad = fw.wait_listening(2)
    # Warm up once so lazily opened fds (resolver, pipes of the first bridge) are in the baseline.
    with connect(good) as s:
        assert banner(s) == b"E"
    fw.next_line(r"end=closed")
    before = _fd_count(fw.proc.pid)

    payload = os.urandom(100_000)
    expected_lines = 0
    for i in range(300):
        kind = i % 3
        if kind == 0:  # normal echo with half-close
            with connect(good) as s:
                assert banner(s) == b"E"
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                assert got == payload
        elif kind == 1:  # client vanishes mid-stream with a reset
            s = connect(good)
            s.sendall(payload[:5000])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        else:  # nothing reachable upstream
            with connect(bad) as s:
                assert banner(s) == b""
        expected_lines += 1
    for _ in range(expected_lines):
        fw.next_line(r" tunnel client=")
    assert fw.proc.poll() is None
    after = _fd_count(fw.proc.pid)
    assert after == before, f"fds before {before}, after {after}"


@pytest.mark.parametrize("name", ["tunnel-forwarder.toml", "transparent-gateway.toml"])
def test_shipped_example_configs_are_valid(name):
    from webproxy import config

    cfg = config.load(str(ROOT / "conf" / name))
    if name.startswith("tunnel"):
        assert [t["listen"] for t in cfg.tunnel] == [("0.0.0.0", 8080), ("127.0.0.1", 2222)]
    else:
        assert cfg.transparent["listen"] == [("::", 3129)]


class RawUpstream:
    """One-shot upstreams scripted per connection: `script(sock)` runs in a thread."""

    def __init__(self, script):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.script = script
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.lsock.getsockname()[1]}"

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.held.append(c)
            threading.Thread(target=self.script, args=(c,), daemon=True).start()

    def close(self):
        self.lsock.close()
        for c in self.held:
            c.close()


def test_upstream_reset_reaches_the_client_as_a_reset(forwarder):
    def greet_then_reset(c: socket.socket) -> None:
        c.sendall(b"R\n")
        time.sleep(0.3)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()

    up = RawUpstream(greet_then_reset)
    try:
        fw = forwarder("127.0.0.1:0", up.addr)
        port = fw.wait_listening()[0]
        with connect(port) as s:
            assert banner(s) == b"R"
            with pytest.raises(ConnectionResetError):
                while s.recv(65536):
                    pass
        fw.next_line(r"up=0 down=2 duration=\S+ end=upstream-error: ECONNRESET")
    finally:
        up.close()


def test_half_closed_bridge_ends_after_half_close_timeout_without_idle_timeout(forwarder):
    def greet_and_hold(c: socket.socket) -> None:
        c.sendall(b"H\n")  # then never answers and never closes

    up = RawUpstream(greet_and_hold)
    try:
        fw = forwarder("127.0.0.1:0", up.addr, "--half-close-timeout", "0.5")
        port = fw.wait_listening()[0]
        with connect(port) as s:
            assert banner(s) == b"H"
            s.sendall(b"bye")
            s.shutdown(socket.SHUT_WR)
            t0 = time.monotonic()
            assert s.recv(1) == b""
            assert 0.3 < time.monotonic() - t0 < WAIT
        fw.next_line(r"up=3 down=2 duration=\S+ end=half-close-timeout")
    finally:
        up.close()


def test_sighup_without_config_file_is_ignored_and_bridges_go_on(forwarder, upstreams):
    a = upstreams("A")
    fw = forwarder("127.0.0.1:0", a.addr)
    port = fw.wait_listening()[0]
    with connect(port) as held:
        assert banner(held) == b"A"
        fw.proc.send_signal(signal.SIGHUP)
        fw.next_line(r"SIGHUP ignored")
        held.sendall(b"ping")
        assert held.recv(4) == b"ping"
    assert fw.proc.poll() is None
    with connect(port) as s:
        assert banner(s) == b"A"


def test_sighup_reloads_allowed_clients_from_the_config_file(forwarder, upstreams, tmp_path):
    a = upstreams("A")
    s0 = socket.create_server(("127.0.0.1", 0))
    listen = f"127.0.0.1:{s0.getsockname()[1]}"
    s0.close()
    conf = tmp_path / "fw.toml"

    def write(allow: str) -> None:
        conf.write_text(f'[[tunnel]]\nlisten = "{listen}"\nupstreams = ["{a.addr}"]\nallow_clients = ["{allow}"]\n')

    write("127.0.0.1/32")
    fw = forwarder("-c", str(conf))
    port = fw.wait_listening()[0]
    with connect(port, "127.0.0.2") as s:
        assert banner(s) == b""  # denied
    write("127.0.0.0/8")
    fw.proc.send_signal(signal.SIGHUP)
    fw.next_line(r"reloaded .* 1 change\(s\) applied \(allow_clients\)")
    with connect(port, "127.0.0.2") as s:
        assert banner(s) == b"A"
    assert fw.proc.poll() is None
