"""Server lifecycle: listeners, admission (client networks, connection caps), logs, SIGHUP reload,
graceful shutdown on SIGTERM/SIGINT. Composes the front end, the upstream client, the cache and
the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from webproxy import config as config_mod
from webproxy import logcodes
from webproxy.accesslog import AccessLog
from webproxy.acl import ConnectionCounter, client_allowed
from webproxy.caching import CacheLayer
from webproxy.composition import attach_layers
from webproxy.connect import ConnectHandler
from webproxy.exchange import Answers, Exchange
from webproxy.forward import HttpForwarder
from webproxy.frontend import ClientConnection, ParseFailure, Request
from webproxy.ftpgate import FtpGate
from webproxy.httpmsg import Target, parse_absolute
from webproxy.origin import Opener
from webproxy.routing import Router
from webproxy.selfpages import SelfPages
from webproxy.startup import StartupError, bind_listeners, check_cache_dir
from webproxy.transparent import TransparentHttp
from webproxy.upstream import Upstream


class ProxyServer:
    """One proxy process: builds the request path once (routing, handlers, the cache), admits
    client connections, owns the logs and the config (SIGHUP), and shuts down gracefully.
    It is the `ConnectionHost` of every client connection and the `Env` of every handler."""

    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.counter = ConnectionCounter()
        self.connections: set[ClientConnection] = set()
        self.accesslog = AccessLog(cfg.log["access_log"])
        self.upstream = Upstream(cfg.upstream)
        # One resolver for HTTP, FTP and tunnels: resolve(host, port) -> [{"host": ip, ...}, ...]
        self.resolve = self.upstream.resolver.resolve
        self.answers = Answers(self)
        self.forwarder = HttpForwarder(self, self.answers, self.upstream)
        self.ftp = FtpGate(self, self.answers)
        self.cache_layer: CacheLayer | None = None
        self.router = Router(self, self.answers, self.forwarder,
                             ConnectHandler(self, self.answers, self.resolve, self.release), self.ftp,
                             TransparentHttp(self.answers, self.forwarder, self.resolve),
                             SelfPages(self.answers, self.status_rows), self.access)
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_addrs: list[tuple[str, int]] = []
        self.started = time.time()
        self.requests = 0
        self._stopping: asyncio.Future[None] = self.loop.create_future()
        self._flush_timer: asyncio.TimerHandle | None = None
        self.closers: list[Callable[[], Awaitable[None]]] = []  # at shutdown (transparent, forwarders, refresher)

    # ---- the cache, when on ---------------------------------------------------------------------
    def attach_cache(self, layer: CacheLayer) -> None:
        self.cache_layer = layer
        self.forwarder.cache = layer
        self.ftp.cache = layer

    def opener_for(self, url: str) -> tuple[Target, Opener]:
        """(target, opener) to fetch `url` with no client request behind it (background refresh)."""
        target = parse_absolute(url)
        if target.scheme == "ftp":
            return target, self.ftp.opener_for(url, target)
        return target, self.forwarder.opener_for(target)

    # ---- RefreshHost: what the active refresher asks ----------------------------------------------
    def upstream_active(self) -> int:
        return self.upstream.active

    def log_access(self, start: float, client: str, code: str, status: int, nbytes: int, method: str,
                   url: str, hierarchy: str, ctype: str | None) -> None:
        self.accesslog.log(start, client, code, status, nbytes, method, url, hierarchy, ctype)

    # ---- ConnectionHost: what client connections ask ----------------------------------------------
    now = staticmethod(time.time)

    @property
    def limits(self) -> dict[str, Any]:
        return self.cfg.server

    def answer_now(self, conn: ClientConnection, req: Request) -> bool:
        return self.router.answer_now(conn, req)

    def handle(self, conn: ClientConnection, req: Request) -> Awaitable[bool]:
        return self.router.handle(conn, req)

    def admit(self, conn: ClientConnection) -> tuple[int, str] | None:
        if self._stopping.done():
            return (503, "the proxy is shutting down")
        why = self.counter.admit(conn.client_ip, self.cfg.access)
        if why:
            self.accesslog.log(time.time(), conn.client_ip, logcodes.DENIED, 503, 0, "-", "-", ctype="text/plain")
            return (503, f"too many connections: {why}")
        self.connections.add(conn)
        return None

    def release(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.counter.release(conn.client_ip)

    def denied(self, conn: ClientConnection) -> bool:
        return not client_allowed(conn.client_ip, self.cfg.access["allow_clients"])

    def on_parse_failure(self, conn: ClientConnection, item: ParseFailure) -> None:
        self.accesslog.log(item.start, conn.client_ip, logcodes.NONE, item.status, 0, "NONE",
                           "error:invalid-request", ctype="text/plain")

    # ---- Env: what handlers ask ---------------------------------------------------------------------
    def is_admin(self, client_ip: str) -> bool:
        return client_allowed(client_ip, self.cfg.access["admin_clients"])

    def is_self(self, host: str, port: int) -> bool:
        for lhost, lport in self.listen_addrs:
            if port == lport and (host == lhost or host in ("localhost", "127.0.0.1", "::1")
                                  and lhost in ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost")):
                return True
        return False

    _LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

    def log_error(self, message: str, level: str = "error") -> None:
        if self._LEVELS[level] < self._LEVELS[self.cfg.log["level"]]:
            return
        print(f"{time.strftime('%Y/%m/%d %H:%M:%S')} webproxy: {message}", file=sys.stderr, flush=True)

    def access(self, conn: ClientConnection, req: Request, ex: Exchange, nbytes: int) -> None:
        self.requests += 1
        self.accesslog.log(req.start, conn.client_ip, ex.code, ex.status, nbytes, req.method, ex.url,
                           ex.hierarchy, ex.ctype)

    def status_rows(self) -> list[tuple[str, str]]:
        rows = [("uptime", f"{int(time.time() - self.started)} s"),
                ("client connections open", str(self.counter.total)),
                ("requests served", str(self.requests))]
        if self.cache_layer is not None:
            rows += self.cache_layer.status_rows()
        return rows

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
            conn.drain_and_close()
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
        await self.ftp.close()
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


async def run_server(cfg: config_mod.Config, sockets: list[socket.socket]) -> None:
    server = ProxyServer(cfg)
    try:
        await server.start(sockets)
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
    if _early_stop:  # SIGTERM/SIGINT arrived after the ports opened but before these handlers
        server.request_stop()
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


_early_stop: list[int] = []  # stop signals received before the event loop's handlers exist


def _remember_stop(sig: int, _frame: Any) -> None:
    _early_stop.append(sig)


def run(cfg: config_mod.Config) -> int:
    workers = max(1, cfg.server["workers"])
    # Handlers before binding: a SIGTERM landing once the ports are open (a client may already be
    # connected) must stop the proxy gracefully, exit 0, not kill it with the default action.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop installs the reload handler
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _remember_stop)
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
    for sig in _early_stop:  # arrived while the workers were being started
        forward(sig, None)
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
