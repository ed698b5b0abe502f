"""Server lifecycle: listeners, admission (client networks, connection caps), logs, SIGHUP reload,
graceful shutdown on SIGTERM/SIGINT (a second one hurries it), privilege drop and pid file.
Composes the front end, the upstream client, the cache and the tunnel.
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

from tunnel.netaddr import is_local_address
from webproxy import authbackends, certs, logcodes, logfiles, metrics, parents, service
from webproxy import config as config_mod
from webproxy.accesslog import AccessLog
from webproxy.acl import ConnectionCounter, client_allowed, destination_denied, ip_of, names_listener
from webproxy.auth import AuthGate
from webproxy.caching import CacheLayer
from webproxy.certs import Authority, CAError, ca_exists, origin_context
from webproxy.composition import attach_layers
from webproxy.connect import ConnectHandler
from webproxy.dns import Resolver
from webproxy.errorlog import ErrorLog, FailureSummary
from webproxy.exchange import Answers, Exchange
from webproxy.forward import HttpForwarder
from webproxy.frontend import ClientConnection, ParseFailure, Request
from webproxy.ftpgate import FtpGate
from webproxy.gophergate import GopherGate
from webproxy.httpmsg import Target, parse_absolute
from webproxy.intercept import Interceptor
from webproxy.origin import Opener
from webproxy.refresher import Refresher
from webproxy.routing import Router
from webproxy.selfpages import SelfPages
from webproxy.startup import StartupError, bind_listeners, check_cache_dir
from webproxy.statuspage import human_bytes
from webproxy.transparent import TransparentHttp
from webproxy.upstream import Upstream


class ProxyServer:
    """One proxy process: builds the request path once (routing, handlers, the cache), admits
    client connections, owns the logs and the config (SIGHUP), and shuts down gracefully.
    It is the `ConnectionHost` of every client connection and the `Env` of every handler."""

    def __init__(self, cfg: config_mod.Config) -> None:
        """Raises StartupError when a log file cannot be opened."""
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.counter = ConnectionCounter()
        self.connections: set[ClientConnection] = set()
        try:
            self.errorlog = ErrorLog(cfg.log["error_log"], cfg.log["level"])
            self.accesslog = AccessLog(cfg.log["access_log"])
        except config_mod.ConfigError as e:
            raise StartupError(str(e)) from None
        self.failures = FailureSummary()
        # One resolver (and one DNS cache) for HTTP, FTP, tunnels and transparent mode:
        # resolve(host, port) -> [{"host": ip, ...}, ...]
        self.resolver = Resolver(cfg.upstream["dns_ttl"])
        self.resolve = self.resolver.resolve
        try:
            self.authority = Authority(cfg.tls["ca_dir"]) if ca_exists(cfg.tls["ca_dir"]) else None
            origin_tls = origin_context(cfg.tls["upstream_ca_file"])
        except CAError as e:
            raise StartupError(str(e)) from None
        self.upstream = Upstream(cfg.upstream, self.resolver, head_limit=cfg.server["max_header_size"],
                                 tls=origin_tls)
        self.answers = Answers(self)
        self.forwarder = HttpForwarder(self, self.answers, self.upstream, self.resolve)
        self.ftp = FtpGate(self, self.answers, self.resolver, self.forwarder.parents)
        self.gopher = GopherGate(self, self.answers, self.resolve, self.forwarder.parents)
        self.cache_layer: CacheLayer | None = None
        self.refresher: Refresher | None = None
        self.pages = SelfPages(self, self.answers)
        self.interceptor = Interceptor(self, self, self.authority)
        try:
            self.auth = AuthGate(cfg.auth, self.log_error)
        except config_mod.ConfigError as e:
            raise StartupError(str(e)) from None
        self.router = Router(self, self.answers, self.forwarder,
                             ConnectHandler(self, self.answers, self.resolve, self.release, self.forwarder.parents,
                                            self.interceptor),
                             self.ftp, self.gopher,
                             TransparentHttp(self.answers, self.forwarder, self.resolve), self.pages, self.access,
                             self.auth)
        self.servers: list[asyncio.AbstractServer] = []
        self.listen_addrs: list[tuple[str, int]] = []
        self.started = time.time()
        self.requests = 0
        self._self: dict[tuple[str, int], bool] = {}
        self._stopping: asyncio.Future[None] = self.loop.create_future()
        self._hurry = False  # a second SIGTERM/SIGINT: end the grace period now
        self._flush_timer: asyncio.TimerHandle | None = None
        self.closers: list[Callable[[], Awaitable[None]]] = []  # at shutdown (transparent, forwarders, refresher)

    # ---- the cache, when on ---------------------------------------------------------------------
    def attach_cache(self, layer: CacheLayer, refresher: Refresher | None) -> None:
        self.cache_layer = layer
        self.refresher = refresher
        self.forwarder.cache = layer
        self.ftp.cache = layer
        self.gopher.cache = layer

    # ---- PagesHost: what the status page and /metrics read ----------------------------------------
    def cache_stats(self) -> dict[str, Any] | None:
        return self.cache_layer.store.stats() if self.cache_layer is not None else None

    def refreshes_active(self) -> int:
        return len(self.refresher.running) if self.refresher is not None else 0

    def opener_for(self, url: str) -> tuple[Target, Opener]:
        """(target, opener) to fetch `url` with no client request behind it (background refresh)."""
        target = parse_absolute(url)
        if target.scheme == "ftp":
            return target, self.ftp.opener_for(url, target)
        if target.scheme == "gopher":
            return target, self.gopher.opener_for(target)
        return target, self.forwarder.opener_for(target)

    # ---- RefreshHost: what the active refresher asks ----------------------------------------------
    def upstream_active(self) -> int:
        return self.upstream.active

    def log_access(self, start: float, client: str, code: str, status: int, nbytes: int, method: str,
                   url: str, hierarchy: str, ctype: str | None, user: str = "-") -> None:
        self.accesslog.log(start, client, code, status, nbytes, method, url, hierarchy, ctype, user)

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
        metrics.TALLY.connections += 1
        return None

    def release(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.counter.release(conn.client_ip)
        metrics.TALLY.connections -= 1

    def denied(self, conn: ClientConnection) -> bool:
        return not client_allowed(conn.client_ip, self.cfg.access["allow_clients"])

    def on_parse_failure(self, conn: ClientConnection, item: ParseFailure) -> None:
        self.accesslog.log(item.start, conn.client_ip, logcodes.NONE, item.status, 0, "NONE",
                           "error:invalid-request", ctype="text/plain")
        metrics.TALLY.request("NONE", item.status, logcodes.NONE, 0, "-")

    # ---- Env: what handlers ask ---------------------------------------------------------------------
    def is_admin(self, client_ip: str) -> bool:
        return client_allowed(client_ip, self.cfg.access["admin_clients"])

    def is_self(self, host: str, port: int) -> bool:
        """Whether host:port names one of our listeners; remembered per (host, port): every
        request asks, and the answer changes only with the listeners."""
        key = (host, port)
        known = self._self.get(key)
        if known is None:
            ip = "127.0.0.1" if host == "localhost" else host
            known = names_listener(ip, port, self.listen_addrs, self.is_local_address(ip))
            if len(self._self) >= 4096:
                self._self.clear()
            self._self[key] = known
        return known

    def is_local_address(self, ip: str) -> bool:
        """Whether `ip` is an address of this host (loopback, or one it can bind to)."""
        addr = ip_of(ip)
        return addr is not None and (addr.is_loopback or addr.is_unspecified or is_local_address(str(addr)))

    def destination_refused(self, client_ip: str, ip: str) -> bool:
        """access.deny_destinations, for clients that are not on this host."""
        return destination_denied(ip, self.cfg.access["deny_destinations"]) and not self.is_local_address(client_ip)

    def log_error(self, message: str, level: str = "error") -> None:
        self.errorlog.write(message, level)

    def upstream_failure(self, method: str, url: str, status: int, message: str) -> None:
        """An origin could not be reached or answered badly: the first failure per host and minute
        is logged whole, the rest as one summary line when the minute is over."""
        line = f"{status} for {method} {url[:200]}: {message}"
        for out in self.failures.record(metrics.host_of(url), time.time(), line):
            self.log_error(out, "info")

    def access(self, conn: ClientConnection, req: Request, ex: Exchange, nbytes: int) -> None:
        self.requests += 1
        self.accesslog.log(req.start, conn.client_ip, ex.code, ex.status, nbytes, req.method, ex.url,
                           ex.hierarchy, ex.ctype, ex.user)
        metrics.TALLY.request(req.method, ex.status, ex.code, nbytes, ex.url)

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            srv = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=1024)
            self.servers.append(srv)
            addr = sock.getsockname()
            self.listen_addrs.append((addr[0], addr[1]))
            self._self.clear()
        self._schedule_flush()

    def reload_access(self) -> None:
        for conn in self.connections:
            conn.denied = self.denied(conn)

    def _schedule_flush(self) -> None:
        self.accesslog.flush()
        self.auth.tick()
        now = time.time()
        for line in self.failures.due(now):
            self.log_error(line, "info")
        try:
            self.pages.tick(now)
        except Exception as e:  # metrics must never stop the timer that flushes the logs
            self.log_error(f"metrics: {e!r}")
        self._flush_timer = self.loop.call_later(1.0, self._schedule_flush)

    def in_flight(self) -> int:
        return sum(1 for c in self.connections if c.busy or c.pending)

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: the first starts a graceful stop, a second ends the grace period at once."""
        if self._stopping.done():
            if not self._hurry:
                self._hurry = True
                self.log_error("second stop signal: closing all connections now")
            return
        grace = self.cfg.server["grace_period"]
        self.log_error(f"stopping: {self.in_flight()} request(s) in flight, waiting up to {grace:g} s for them "
                       "(send SIGTERM or press Ctrl-C again to stop at once)")
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
        while any(not c.closed for c in self.connections) and time.monotonic() < deadline and not self._hurry:
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
        self.pages.close()
        self.auth.close()
        self.accesslog.close()

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply what can change live, name what needs a restart."""
        if self.cfg.path is None:
            self.log_error("reload: running on embedded defaults (no -c FILE), nothing to reload")
            return
        try:
            new = config_mod.load(self.cfg.path)
            parents.check(new.upstream, self.listen_addrs, self.is_local_address)
            self.auth.configure(new.auth)  # users re-read (a revoked one is refused at once)
            # Both logs are opened before anything changes: a path that cannot be opened keeps the
            # running config whole, old log files included.
            access_file = logfiles.open_log("access_log", new.log["access_log"])
            try:
                error_file = logfiles.open_log("error_log", new.log["error_log"])
            except config_mod.ConfigError:
                if access_file is not None and access_file is not sys.stderr:
                    access_file.close()
                raise
        except config_mod.ConfigError as e:
            self.log_error(f"reload failed, keeping the running config: {e}")
            return
        old_flat, new_flat = self.cfg.flat(), new.flat()
        changed = [k for k in new_flat if new_flat[k] != old_flat.get(k)]
        needs_restart = [k for k in changed if k in config_mod.RESTART_KEYS]
        for section in ("server", "access", "log", "upstream", "refresh", "ftp", "tls"):
            keep = {k: getattr(self.cfg, section)[k] for k in getattr(self.cfg, section) if f"{section}.{k}" in needs_restart}
            getattr(new, section).update(keep)
        new.cache = {**self.cfg.cache, **{k: v for k, v in new.cache.items() if f"cache.{k}" not in config_mod.RESTART_KEYS}}
        new.transparent = self.cfg.transparent
        new.socks = self.cfg.socks  # the running SOCKS listener keeps its settings until a restart
        new.tunnel = self.cfg.tunnel
        # Always switch files, even to the same paths: after logrotate renamed them too.
        self.accesslog.use(new.log["access_log"], access_file)
        self.errorlog.use(new.log["error_log"], new.log["level"], error_file)
        self.cfg = new
        self.upstream.cfg = new.upstream
        self.upstream.head_limit = new.server["max_header_size"]
        self.resolver.ttl = new.upstream["dns_ttl"]
        self.reload_access()
        if new.tls["intercept"] and self.authority is None:
            self.log_error(f"reload: tls.intercept is set but no CA was loaded at start; run: webproxy ca init "
                           f"--dir {new.tls['ca_dir']}, then restart webproxy (until then nothing is intercepted)")
        applied = [k for k in changed if k not in needs_restart]
        self.log_error(f"reloaded {new.path}: {len(applied)} change(s) applied"
                       + (f" ({', '.join(applied)})" if applied else ""))
        if needs_restart:
            self.log_error(f"reload: {', '.join(needs_restart)} changed; restart webproxy to apply")


def start_line(cfg: config_mod.Config, listen: list[tuple[str, int]]) -> str:
    """What an admin wants to see once: where it listens, which config, which cache, the status page."""
    addrs = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in listen)
    source = f"config {os.path.abspath(cfg.path)}" if cfg.path else "embedded defaults (no -c FILE)"
    if cfg.cache["enabled"]:
        cache = f"cache {cfg.cache['directory']} ({human_bytes(cfg.cache['capacity'])})"
    else:
        cache = "cache off"
    host, port = listen[0] if listen else ("127.0.0.1", 3128)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    page = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    return f"listening on {addrs} (pid {os.getpid()}); {source}; {cache}; status page {page}"


async def run_server(cfg: config_mod.Config, sockets: list[socket.socket], metrics_dir: str | None = None,
                     ident: service.Identity | None = None, worker: bool = False) -> None:
    """One serving process. `worker`: forked by run() (the main process turns SIGINT into SIGTERM)."""
    server = ProxyServer(cfg)
    try:
        await server.start(sockets)
        # The cache's files are created as the user the process drops to; privileged listeners
        # (transparent, forwarders) are still opened as root.
        await attach_layers(server, ident)
        if ident is not None and os.geteuid() == 0:
            service.preload_modules()
        service.drop_privileges(ident)
        server.pages.start(metrics_dir)
    except BaseException:
        for closer in server.closers:
            with contextlib.suppress(Exception):
                await closer()
        if server.cache_layer is not None:
            await server.cache_layer.close()
        await server.upstream.close()
        raise
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.request_stop)
    if not worker:  # workers ignore SIGINT: the main process forwards it as SIGTERM
        loop.add_signal_handler(signal.SIGINT, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    server.log_error(start_line(cfg, server.listen_addrs))
    if _early_stop:  # SIGTERM/SIGINT arrived after the ports opened but before these handlers
        server.request_stop()
    await server.serve_until_stopped()
    server.log_error("stopped")


def _serve_process(cfg: config_mod.Config, sockets: list[socket.socket], metrics_dir: str | None,
                   ident: service.Identity | None, worker: bool) -> int:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(run_server(cfg, sockets, metrics_dir, ident, worker))
    except StartupError as e:
        print(f"webproxy: {e}", file=sys.stderr)
        return 2
    return 0


def prepare(cfg: config_mod.Config) -> service.Identity | None:
    """Everything that can be wrong before binding, each as one line (StartupError)."""
    try:
        logfiles.check(cfg)
        parents.check(cfg.upstream, cfg.server["listen"], is_local_address)
        authbackends.build(cfg.auth)  # a bad htpasswd file: one line naming the file and line
        ident = service.identity(cfg)
    except config_mod.ConfigError as e:
        raise StartupError(str(e)) from None
    why = service.check_start(ident, os.geteuid())
    if why:
        raise StartupError(why)
    if ident is not None and cfg.cache["enabled"] and os.geteuid() == 0:
        why = service.prepare_cache_dir(ident, cfg.cache["directory"])
        if why:
            raise StartupError(why)
    check_cache_dir(cfg)
    why = certs.startup_problem(cfg.tls["ca_dir"], cfg.tls["intercept"])
    if why:
        raise StartupError(why)
    return ident


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
    pid_file = cfg.server["pid_file"]
    try:
        ident = prepare(cfg)
        # One socket per worker and address, all bound with SO_REUSEPORT: the kernel spreads
        # new connections across the workers instead of waking all of them.
        per_worker = [bind_listeners(cfg.server["listen"], workers > 1) for _ in range(workers)]
        if pid_file:
            try:
                service.write_pid_file(pid_file, os.getpid())
            except config_mod.ConfigError as e:
                for socks in per_worker:
                    for sock in socks:
                        sock.close()
                raise StartupError(str(e)) from None
    except StartupError as e:
        print(f"webproxy: {e}", file=sys.stderr)
        return 2
    if ident is None and os.geteuid() == 0:
        warn = ErrorLog(cfg.log["error_log"], cfg.log["level"])
        warn.write(service.ROOT_WARNING, "warning")
        warn.close()
    metrics_dir = metrics.prepare_directory((ident.uid, ident.gid) if ident and os.geteuid() == 0 else None)
    try:
        if workers == 1:
            return _serve_process(cfg, per_worker[0], metrics_dir, ident, worker=False)
        return _run_workers(cfg, per_worker, metrics_dir, ident)
    finally:
        metrics.remove_directory(metrics_dir)
        if pid_file:
            service.remove_pid_file(pid_file, os.getpid())


def _run_workers(cfg: config_mod.Config, per_worker: list[list[socket.socket]], metrics_dir: str,
                 ident: service.Identity | None) -> int:
    children = []
    for i in range(len(per_worker)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for j, socks in enumerate(per_worker):
                if j != i:
                    for sock in socks:
                        sock.close()
            code = 1
            try:
                code = _serve_process(cfg, per_worker[i], metrics_dir, ident, worker=True)
            finally:
                os._exit(code)
        children.append(pid)
    for socks in per_worker:
        for sock in socks:
            sock.close()

    def forward(sig: int, _frame: Any) -> None:
        # Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group): it is
        # forwarded as SIGTERM, so one Ctrl-C is one stop and a second one hurries it.
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM if sig == signal.SIGINT else sig)

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
