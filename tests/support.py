"""Test support: a real origin server (aiohttp, in its own thread) that counts requests and TCP
connections, a real webproxy process, and raw-socket helpers that read the proxy's bytes with
h11 (an independent, strict HTTP parser)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import h11
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listener has a full accept queue: it drops new SYNs, so a connect
    gets no answer at all (neither accepted nor refused) until it times out."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(2):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(full.getsockname())
            fillers.append(f)
        time.sleep(0.05)
        yield full.getsockname()[1]
    finally:
        for f in fillers:
            f.close()
        full.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """A server on an event loop in its own daemon thread: `start()` runs `_setup()` there and
    returns once it is done; `stop()` ends the loop after `_cleanup()`."""

    loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    async def _setup(self) -> None:
        raise NotImplementedError

    async def _cleanup(self) -> None:
        pass

    def start(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._setup())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._cleanup())
            self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)


class Origin(LoopThread):
    """An aiohttp origin in a background thread. Tests add routes before `start()` or use the
    built-in ones; `hits[path]` counts requests, `connections` counts distinct TCP connections."""

    def __init__(self) -> None:
        self.app = web.Application(client_max_size=0)
        self.hits: Counter[str] = Counter()
        self.peers: set[tuple[str, int]] = set()
        self.requests: list[dict[str, Any]] = []
        # /obj/{name}: responses scripted by the test (status, headers, body, delay); validators
        # are honoured with 304, and conditional vs full answers are counted per name.
        self.objects: dict[str, dict[str, Any]] = {}
        self.conditional: Counter[str] = Counter()
        self.full: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._builtin_routes()

    @property
    def connections(self) -> int:
        return len(self.peers)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def put(self, name: str, body: bytes = b"", status: int = 200, delay: float = 0, **headers: str) -> str:
        """Script /obj/NAME; header names use _ for - (Cache_Control=...). Returns its URL."""
        self.objects[name] = {"status": status, "body": body, "delay": delay,
                              "headers": {k.replace("_", "-"): v for k, v in headers.items()}}
        return self.url(f"/obj/{name}")

    def reset(self) -> None:
        self.hits.clear()
        self.peers.clear()
        self.requests.clear()

    def _record(self, request: web.Request) -> None:
        self.hits[request.path] += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.peers.add(peer[:2])
        self.requests.append({"method": request.method, "path_qs": request.raw_path,
                              "headers": list(request.raw_headers)})

    def route(self, method: str, path: str, handler: Callable[..., Any]) -> None:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            self._record(request)
            return await handler(request)

        if method == "GET":
            self.app.router.add_get(path, wrapped)  # GET routes answer HEAD too, as real servers do
        else:
            self.app.router.add_route(method, path, wrapped)

    def _builtin_routes(self) -> None:
        async def echo(request: web.Request) -> web.Response:
            body = await request.read()
            lines = [f"{request.method} {request.raw_path} HTTP/{request.version.major}.{request.version.minor}"]
            lines += [f"{k.decode()}: {v.decode()}" for k, v in request.raw_headers]
            return web.Response(text="\n".join(lines) + "\n\n" + body.decode("latin-1"),
                                headers={"Cache-Control": "no-store"})

        async def upload(request: web.Request) -> web.Response:
            h = hashlib.sha256()
            n = 0
            async for chunk in request.content.iter_any():
                h.update(chunk)
                n += len(chunk)
            return web.json_response({"length": n, "sha256": h.hexdigest(),
                                      "te": request.headers.get("Transfer-Encoding"),
                                      "cl": request.headers.get("Content-Length")})

        async def stream(request: web.Request) -> web.StreamResponse:
            n = int(request.match_info["n"])
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"})
            if request.query.get("length") == "1":
                resp.content_length = n
            await resp.prepare(request)
            block = b"x" * 65536
            sent = 0
            while sent < n and request.method != "HEAD":  # aiohttp would send the bytes after a HEAD
                part = block[: min(65536, n - sent)]
                await resp.write(part)
                sent += len(part)
            await resp.write_eof()
            return resp

        async def status(request: web.Request) -> web.Response:
            code = int(request.match_info["code"])
            return web.Response(status=code, body=b"" if code in (204, 304) else f"status {code}\n".encode())

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(float(request.query.get("s", "5")))
            return web.Response(text="late\n")

        async def text(request: web.Request) -> web.Response:
            return web.Response(text=f"hello {request.match_info['name']}\n", headers={"Cache-Control": "no-store"})

        async def obj(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            spec = self.objects[name]
            if spec["delay"]:
                await asyncio.sleep(spec["delay"])
            headers = dict(spec["headers"])
            inm = request.headers.get("If-None-Match")
            ims = request.headers.get("If-Modified-Since")
            if inm or ims:
                self.conditional[name] += 1
                etag, lm = headers.get("ETag"), headers.get("Last-Modified")
                if (inm and etag and inm.strip() == etag) or (not inm and ims and lm and ims == lm):
                    keep = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
                    return web.Response(status=304, headers=keep)
            if request.method in ("GET", "HEAD"):
                self.full[name] += 1
            return web.Response(status=spec["status"], body=spec["body"], headers=headers)

        self.route("*", "/obj/{name}", obj)
        self.route("*", "/echo{tail:.*}", echo)
        self.route("*", "/upload", upload)
        self.route("GET", "/stream/{n}", stream)
        self.route("*", "/status/{code}", status)
        self.route("GET", "/slow", slow)
        self.route("GET", "/text/{name}", text)

    async def _setup(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _cleanup(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table: [[upstream.parent]] entries as parent = [{...}]
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class ProxyProcess:
    """A real `python -m webproxy run -c FILE` process on a free loopback port."""

    def __init__(self, tmp: Path, sections: dict[str, dict[str, Any]] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.log_path = tmp / "access.log"
        self.err_path = tmp / "stderr.log"
        base: dict[str, dict[str, Any]] = {
            "server": {"listen": [f"127.0.0.1:{self.port}"], "grace_period": 5.0},
            "log": {"access_log": str(self.log_path)},
            "cache": {"directory": str(tmp / "cache")},
        }
        for section, keys in (sections or {}).items():
            base.setdefault(section, {}).update(keys)
        self.config_path = write_config(tmp / "webproxy.toml", base)
        error_log = base.get("log", {}).get("error_log", "-")
        self.error_log_path = Path(error_log) if error_log not in ("-", "") else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ProxyProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "webproxy", "run", "-c", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=self._err, env=env, cwd=str(self.tmp))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"webproxy exited {self.proc.returncode}: {self.stderr()}")
            if "listening on" in self.stderr() + self.error_log():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"webproxy did not start: {self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def error_log(self) -> str:
        """The error log file's text when log.error_log names one (else errors go to stderr())."""
        p = self.error_log_path
        return p.read_text(errors="replace") if p is not None and p.exists() else ""

    def access_lines(self, wait_for: int = 0) -> list[str]:
        """Access log lines; waits (bounded) for at least `wait_for` lines, since the log is buffered."""
        deadline = time.monotonic() + 5
        while True:
            lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
            if len(lines) >= wait_for or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        terminate(self.proc, 15)
        self._err.close()
        return self.proc.returncode


def terminate(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM a server process we started, and SIGKILL it if it is still there after `timeout` s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """`python -m webproxy ARGS...` from this checkout; text output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "webproxy", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)


def proxy_get(proxy: ProxyProcess, url: str, *headers: str, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """GET `url` through `proxy` with curl: (status, fields with lower-case names, body)."""
    args = ["-x", proxy.url, "-s", "-D", "-", "-o", "-", url]
    for h in headers:
        args += ["-H", h]
    out = curl(*args, timeout=timeout).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), fields, body


def run_webproxy(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`webproxy ARGS...` from this checkout, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "webproxy", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


class RawClient:
    """A client socket that writes raw bytes and reads responses with h11."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.sock.settimeout(timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def expect(self, method: bytes = b"GET") -> None:
        """Tell h11 what request the next response answers (h11 needs it to frame bodies)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        self.conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        self.conn.send(h11.EndOfMessage())

    def response(self, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
        """Read one complete response (h11 rejects anything malformed)."""
        self.expect(method)
        resp = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                resp = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert resp is not None
                return resp, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before a complete response")

    def closed_by_peer(self, wait: float = 5) -> bool:
        """True when the proxy has closed the connection (EOF) within `wait` seconds."""
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def header(resp: h11.Response, name: str) -> str | None:
    for k, v in resp.headers:
        if k.decode().lower() == name.lower():
            return v.decode("latin-1")
    return None


def read_all(sock: socket.socket, timeout: float | None = 10) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        out += data
    return bytes(out)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PeakRss:
    """Samples a process's resident memory while the block runs; `growth_kb` is peak minus start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_kb(self) -> int:
        return self.peak - self.start


class MethodEchoOrigin:
    """A socket origin that accepts any method (aiohttp's own parser knows only a fixed list) and
    answers each request with its request line, or with the exact bytes `reply` (then closes the
    connection when `close`). `lines` records the request lines it received."""

    def __init__(self, reply: bytes | None = None, close: bool = False) -> None:
        self.reply = reply
        self.close_after_reply = close
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.lines: list[bytes] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            buf = b""
            with conn:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(4096)
                        if not data:
                            break
                        buf += data
                    if b"\r\n\r\n" not in buf:
                        break
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    line = head.split(b"\r\n")[0]
                    self.lines.append(line)
                    if self.reply is None:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(line), line))
                        continue
                    conn.sendall(self.reply)
                    if self.close_after_reply:
                        break

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.sock.close()


def tiny_wheel() -> tuple[str, bytes]:
    """A minimal valid wheel, built in memory (no build backend, no network)."""
    name = "webproxy_probe-1.0-py3-none-any.whl"
    files = {
        "webproxy_probe/__init__.py": b"VALUE = 42\n",
        "webproxy_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: webproxy-probe\nVersion: 1.0\n",
        "webproxy_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("webproxy_probe-1.0.dist-info/RECORD,,")
    files["webproxy_probe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return name, buf.getvalue()


def package_index(o: Origin) -> tuple[str, bytes]:
    """Routes on `o` (before start()) for a one-package simple index (PEP 503) at /simple/ serving
    tiny_wheel(); returns (file name, wheel bytes)."""
    name, wheel = tiny_wheel()
    sha = hashlib.sha256(wheel).hexdigest()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f'<a href="/files/{name}#sha256={sha}">{name}</a>', content_type="text/html",
                            headers={"Cache-Control": "max-age=600"})

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=wheel, content_type="application/octet-stream",
                            headers={"Cache-Control": "max-age=86400"})

    o.route("GET", "/simple/webproxy-probe/", index)
    o.route("GET", f"/files/{name}", file)
    return name, wheel


def pip_download(proxy_url: str, index_url: str, dest: Path) -> subprocess.CompletedProcess[str]:
    """The real pip fetching webproxy-probe from `index_url` through `proxy_url` (which may carry
    user:password@) into `dest`."""
    return subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--proxy", proxy_url,
                           "--index-url", index_url, "--trusted-host", "127.0.0.1", "-d", str(dest),
                           "webproxy-probe"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""})
