"""Server lifecycle: listeners, admission (client networks, connection caps), logs, SIGHUP reload,
graceful shutdown on SIGTERM/SIGINT. Composes the front end, the upstream client, the cache and
the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from typing import Any

from webproxy import config as config_mod
from webproxy.accesslog import AccessLog
from webproxy.acl import ConnectionCounter, client_allowed
from webproxy.frontend import ClientConnection, ParseFailure, Request, ResponseWriter
from webproxy.httpmsg import Target
from webproxy.proxy import Exchange, Proxy
from webproxy.upstream import Upstream


class StartupError(Exception):
    """Raised before serving starts; the message is the one line the user sees (exit 2)."""


class ProxyServer:
    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.counter = ConnectionCounter()
        self.connections: set[ClientConnection] = set()
        self.accesslog = AccessLog(cfg.log["access_log"])
        self.upstream = Upstream(cfg.upstream)
        # One resolver for HTTP, FTP and tunnels: resolve(host, port) -> [{"host": ip, ...}, ...]
        self.resolve = self.upstream.resolver.resolve
        self.proxy = Proxy(self)
        self.handler = self.proxy.handle
        self.cache_layer: Any = None
        self.ftp_layer: Any = None
        self.gopher_layer: Any = None
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_addrs: list[tuple[str, int]] = []
        self.started = time.time()
        self.requests = 0
        self._stopping: asyncio.Future[None] = self.loop.create_future()
        self._flush_timer: asyncio.TimerHandle | None = None
        self.closers: list[Any] = []  # coroutines to await at shutdown (transparent, forwarders)

    # ---- helpers the front end and the handler call ----------------------------------------------
    now = staticmethod(time.time)

    def admit(self, conn: ClientConnection) -> tuple[int, str] | None:
        if self._stopping.done():
            return (503, "the proxy is shutting down")
        why = self.counter.admit(conn.client_ip, self.cfg.access)
        if why:
            self.accesslog.log(time.time(), conn.client_ip, "TCP_DENIED", 503, 0, "-", "-", ctype="text/plain")
            return (503, f"too many connections: {why}")
        self.connections.add(conn)
        return None

    def release(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.counter.release(conn.client_ip)

    def denied(self, conn: ClientConnection) -> bool:
        return not client_allowed(conn.client_ip, self.cfg.access["allow_clients"])

    def is_admin(self, conn: ClientConnection) -> bool:
        return client_allowed(conn.client_ip, self.cfg.access["admin_clients"])

    def is_self(self, host: str, port: int) -> bool:
        for lhost, lport in self.listen_addrs:
            if port == lport and (host == lhost or host in ("localhost", "127.0.0.1", "::1")
                                  and lhost in ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost")):
                return True
        return False

    def access(self, conn: ClientConnection, req: Request, ex: Exchange, nbytes: int) -> None:
        self.requests += 1
        self.accesslog.log(req.start, conn.client_ip, ex.code, ex.status, nbytes, req.method, ex.url,
                           ex.hierarchy, ex.ctype)

    def on_parse_failure(self, conn: ClientConnection, item: ParseFailure) -> None:
        self.accesslog.log(item.start, conn.client_ip, "TAG_NONE", item.status, 0, "NONE",
                           "error:invalid-request", ctype="text/plain")

    _LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

    def log_error(self, message: str, level: str = "error") -> None:
        if self._LEVELS[level] < self._LEVELS[self.cfg.log["level"]]:
            return
        print(f"{time.strftime('%Y/%m/%d %H:%M:%S')} webproxy: {message}", file=sys.stderr, flush=True)

    def status_rows(self) -> list[tuple[str, str]]:
        rows = []
        if self.cache_layer is not None:
            rows += self.cache_layer.status_rows()
        return rows

    # ---- scheme handlers that other parts of the proxy provide -------------------------------------
    async def connect(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        from webproxy.connect import handle_connect

        return await handle_connect(self, conn, req, rw, ex)

    async def ftp(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange, target: Target) -> bool:
        if self.ftp_layer is None:
            return self.proxy._error(rw, ex, 501, "ftp:// URLs are not supported by this proxy build")
        return await self.ftp_layer.handle(conn, req, rw, ex, target)

    async def transparent_http(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange,
                               host: str | None) -> bool:
        from webproxy.transparent import handle_transparent_http

        return await handle_transparent_http(self, conn, req, rw, ex, host)

    def opener_for(self, url: str) -> tuple[Target, Any]:
        """(target, opener) to fetch `url` with no client request behind it (background refresh).
        `opener(method, headers)` sends exactly the headers given (stored Vary fields, validators)
        plus Host and Via for http."""
        from webproxy.httpmsg import parse_absolute

        target = parse_absolute(url)
        if target.scheme == "ftp":
            gate = self.ftp_layer

            async def ftp_opener(method: str, headers: Any) -> Any:
                return await gate.open(url, None, target, method, headers)

            return target, ftp_opener
        if target.scheme == "gopher":
            gopher = self.gopher_layer

            async def gopher_opener(method: str, headers: Any) -> Any:
                return await gopher.open(None, target, method)

            return target, gopher_opener

        async def http_opener(method: str, headers: Any) -> Any:
            fields = [(k, v) for k, v in headers if k.lower() not in ("host", "via")]
            fields.insert(0, ("Host", target.authority))
            fields.append(self.proxy.via("1.1"))
            return await self.proxy.open(method, target, fields)

        return target, http_opener

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            srv = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=1024)
            self.servers.append(srv)
            addr = sock.getsockname()
            self.listen_addrs.append((addr[0], addr[1]))
        self._schedule_flush()

    def reload_access(self) -> None:
        for conn in self.connections:
            conn.denied = self.denied(conn)

    def _schedule_flush(self) -> None:
        self.accesslog.flush()
        self._flush_timer = self.loop.call_later(1.0, self._schedule_flush)

    def request_stop(self) -> None:
        if not self._stopping.done():
            self._stopping.set_result(None)

    async def serve_until_stopped(self) -> None:
        await self._stopping
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close."""
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            conn.closing = True
            if not conn.busy and not conn.pending:
                conn.close()
                conn._wake()
        deadline = time.monotonic() + self.cfg.server["grace_period"]
        while any(not c.closed for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        for closer in self.closers:
            with contextlib.suppress(Exception):
                await closer()
        if self.cache_layer is not None:
            await self.cache_layer.close()
        if self.ftp_layer is not None:
            await self.ftp_layer.close()
        await self.upstream.close()
        self.accesslog.close()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply what can change live, name what needs a restart."""
        if self.cfg.path is None:
            self.log_error("reload: running on embedded defaults (no -c FILE), nothing to reload")
            return
        try:
            new = config_mod.load(self.cfg.path)
        except config_mod.ConfigError as e:
            self.log_error(f"reload failed, keeping the running config: {e}")
            return
        old_flat, new_flat = self.cfg.flat(), new.flat()
        changed = [k for k in new_flat if new_flat[k] != old_flat.get(k)]
        needs_restart = [k for k in changed if k in config_mod.RESTART_KEYS]
        for section in ("server", "access", "log", "upstream", "refresh", "ftp"):
            keep = {k: getattr(self.cfg, section)[k] for k in getattr(self.cfg, section) if f"{section}.{k}" in needs_restart}
            getattr(new, section).update(keep)
        new.cache = {**self.cfg.cache, **{k: v for k, v in new.cache.items() if f"cache.{k}" not in config_mod.RESTART_KEYS}}
        new.transparent = self.cfg.transparent
        new.socks = self.cfg.socks  # the running SOCKS listener keeps its settings until a restart
        new.tunnel = self.cfg.tunnel
        self.accesslog.reopen(new.log["access_log"])  # always: after logrotate renamed the file too
        self.cfg = new
        self.upstream.cfg = new.upstream
        self.reload_access()
        applied = [k for k in changed if k not in needs_restart]
        self.log_error(f"reloaded {new.path}: {len(applied)} change(s) applied"
                       + (f" ({', '.join(applied)})" if applied else ""))
        if needs_restart:
            self.log_error(f"reload: {', '.join(needs_restart)} changed; restart webproxy to apply")


def _listen_error(host: str, port: int, e: OSError) -> str:
    where = f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is already in use (is another proxy running?); change server.listen or stop the other process"
    if e.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need root); choose a port above 1024 in server.listen"
    if e.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME if hasattr(socket, "EAI_NONAME") else -2):
        return f"cannot listen on {where}: no such local address; use an address of this machine in server.listen"
    return f"cannot listen on {where}: {e.strerror or e}; check server.listen"


def check_cache_dir(cfg: config_mod.Config) -> None:
    if not cfg.cache["enabled"]:
        return
    path = cfg.cache["directory"]
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.unlink(probe)
    except OSError as e:
        raise StartupError(f"cache directory {path} is not writable ({e.strerror}); fix its permissions or set "
                           "cache.directory to a writable path") from None


def bind_listeners(addrs: list[tuple[str, int]], reuse_port: bool) -> list[socket.socket]:
    """Bind every listen address up front, so a port in use is one clear error before anything starts."""
    socks = []
    try:
        for host, port in addrs:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                family, _, _, _, sockaddr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind(sockaddr)
                sock.listen(1024)
                sock.setblocking(False)
            except OSError as e:
                raise StartupError(_listen_error(host, port, e)) from None
    except StartupError:
        for sock in socks:
            sock.close()
        raise
    return socks


async def run_server(cfg: config_mod.Config, sockets: list[socket.socket]) -> None:
    server = ProxyServer(cfg)
    try:
        await server.start(sockets)
        from webproxy.composition import attach_layers

        await attach_layers(server)
    except BaseException:
        for closer in server.closers:
            with contextlib.suppress(Exception):
                await closer()
        await server.upstream.close()
        raise
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.request_stop)
    loop.add_signal_handler(signal.SIGINT, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    addrs = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in server.listen_addrs)
    server.log_error(f"listening on {addrs} (pid {os.getpid()})")
    await server.serve_until_stopped()
    server.log_error("stopped")


def _serve_process(cfg: config_mod.Config, sockets: list[socket.socket]) -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(run_server(cfg, sockets))
    except StartupError as e:
        print(f"webproxy: {e}", file=sys.stderr)
        return 2
    return 0


def run(cfg: config_mod.Config) -> int:
    workers = max(1, cfg.server["workers"])
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop installs the reload handler
    try:
        check_cache_dir(cfg)
        # One socket per worker and address, all bound with SO_REUSEPORT: the kernel spreads
        # new connections across the workers instead of waking all of them.
        per_worker = [bind_listeners(cfg.server["listen"], workers > 1) for _ in range(workers)]
    except StartupError as e:
        print(f"webproxy: {e}", file=sys.stderr)
        return 2
    if workers == 1:
        return _serve_process(cfg, per_worker[0])
    children = []
    for i in range(workers):
        pid = os.fork()
        if pid == 0:
            for j, socks in enumerate(per_worker):
                if j != i:
                    for sock in socks:
                        sock.close()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = _serve_process(cfg, per_worker[i])
            finally:
                os._exit(code)
        children.append(pid)
    for socks in per_worker:
        for sock in socks:
            sock.close()

    def forward(sig: int, _frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = 0
    for child in children:
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        code = max(code, os.waitstatus_to_exitcode(status))
    return code
