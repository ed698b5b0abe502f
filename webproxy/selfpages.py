"""Requests addressed to the proxy itself (origin-form, or an absolute URL naming the proxy):
one routing table, the glue that gathers the numbers the pages are made of (metrics files, the
cache store) for the pure renderers in webproxy.statuspage, webproxy.pac and prometheus_client's
text format, and a clear 400 for anything else."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from webproxy import __version__, logcodes, metrics, pac, statuspage
from webproxy.config import Config
from webproxy.exchange import Answers, Exchange
from webproxy.frontend import Request, ResponseWriter
from webproxy.httpmsg import get_header

# path -> (page, admin_clients only). The status page names the busiest hosts: admin-only too.
# /health is for a load balancer's checks (conf/haproxy-fleet.cfg): it reveals nothing, so any
# allowed client may ask, and it costs no cache query (the status page counts the cache's entries,
# an SQLite scan that grows with the cache, too much for a check every few seconds).
ROUTES: dict[str, tuple[str, bool]] = {
    "/": ("status", True),
    "/status": ("status", True),
    "/metrics": ("metrics", True),
    "/proxy.pac": ("pac", False),
    "/wpad.dat": ("pac", False),
    "/health": ("health", False),
}
SAMPLE_EVERY = 10.0  # seconds between hit-ratio samples
TOP_HOSTS = 10


@dataclass
class Page:
    status: int
    content_type: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


class PagesHost(Protocol):
    """What the pages read from the running proxy."""

    @property
    def cfg(self) -> Config: ...

    @property
    def listen_addrs(self) -> list[tuple[str, int]]: ...

    def is_admin(self, client_ip: str) -> bool: ...

    def cache_stats(self) -> dict[str, Any] | None: ...

    def refreshes_active(self) -> int: ...


class SelfPages:
    def __init__(self, host: PagesHost, answers: Answers) -> None:
        self.host = host
        self.answers = answers
        self.publisher: metrics.Publisher | None = None
        self.window = statuspage.RatioWindow()
        self._sampled = 0.0

    def start(self, metrics_dir: str | None) -> None:
        """Once privileges are dropped: the metrics files then belong to the user the proxy runs as."""
        self.publisher = metrics.Publisher(metrics.TALLY, metrics_dir)

    # ---- timer --------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Once a second: publish this process's tallies; every SAMPLE_EVERY s, sample the hit ratio."""
        if self.publisher is None:
            return
        self.publisher.publish(self.host.refreshes_active(), now)
        if now - self._sampled >= SAMPLE_EVERY:
            self._sampled = now
            hits, lookups = _hits_lookups(metrics.totals(self.publisher.collect(lambda: None)))
            self.window.add(now, hits, lookups)

    # ---- routing ------------------------------------------------------------------------------
    def handle(self, req: Request, rw: ResponseWriter, ex: Exchange, path: str, client_ip: str) -> bool:
        page = self.answer(client_ip, req, path)
        if page is not None:
            return self.send(rw, ex, page)
        host = get_header(req.headers, "host")
        return self.answers.error(rw, ex, 400, f"this is a proxy server, not a web server: {path[:200]!r} "
                                  f"(Host: {host or 'none'}) is not an absolute URL. Configure your client to use "
                                  "this address as its HTTP proxy, e.g. curl -x http://HOST:PORT http://example.com/")

    def send(self, rw: ResponseWriter, ex: Exchange, page: Page) -> bool:
        """A page about the proxy itself, never stored by anyone. Logged as Squid 5 logs what
        involved no cache lookup (NONE_NONE), so scrapes do not count as misses."""
        ex.code = logcodes.DENIED if page.status == 403 else logcodes.NONE_NONE
        ex.status = page.status
        ex.ctype = page.content_type
        rw.start(page.status, "", [("Content-Type", page.content_type), ("Cache-Control", "no-store"),
                                   *page.headers], len(page.body))
        rw.write(page.body)
        return rw.end()

    def answer(self, client_ip: str, req: Request, path: str) -> Page | None:
        """The page for a GET/HEAD of one of ROUTES, or None (not ours: the caller says so)."""
        if req.method not in ("GET", "HEAD"):
            return None
        path = path.split("?", 1)[0]
        route = ROUTES.get(path)
        if route is None:
            return None
        kind, admin_only = route
        if admin_only and not self.host.is_admin(client_ip):
            return Page(403, "text/plain; charset=utf-8",
                        f"access denied: {path} is only for access.admin_clients (your address: "
                        f"{client_ip})\n".encode())
        if self.publisher is None:
            return Page(503, "text/plain; charset=utf-8", b"the proxy is still starting\n")
        if kind == "metrics":
            self.publisher.publish(self.host.refreshes_active())
            return Page(200, metrics.CONTENT_TYPE, self.publisher.exposition(self.host.cache_stats))
        if kind == "pac":
            return Page(200, pac.CONTENT_TYPE, self.pac_text(req).encode())
        if kind == "health":  # 503 above while starting; a stopping proxy no longer accepts
            return Page(200, "text/plain; charset=utf-8", b"ok\n")
        return Page(200, "text/html; charset=utf-8", statuspage.render(self.snapshot(req)).encode())

    def pac_text(self, req: Request) -> str:
        cfg = self.host.cfg
        return pac.render(cfg.pac, pac.proxy_address(cfg.pac, get_header(req.headers, "host"),
                                                     self.host.listen_addrs))

    # ---- the status page's numbers ------------------------------------------------------------
    def snapshot(self, req: Request) -> statuspage.Snapshot:
        now = time.time()
        assert self.publisher is not None
        self.publisher.publish(self.host.refreshes_active(), now)
        cache = self.host.cache_stats()
        t = metrics.totals(self.publisher.collect(lambda: None))
        hits, lookups = _hits_lookups(t)
        workers = [statuspage.Worker(int(pid), w.get("start_time_seconds", now), w.get("requests", 0),
                                     w.get("connections", 0)) for pid, w in t["workers"].items()]
        hosts = self.publisher.all_hosts()
        by_req = sorted(hosts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP_HOSTS]
        by_bytes = sorted(hosts.items(), key=lambda kv: (-kv[1][1], kv[0]))[:TOP_HOSTS]
        return statuspage.Snapshot(
            name=self.host.cfg.server["name"], version=__version__, now=now,
            started=min([w.started for w in workers], default=self.publisher.started),
            proxy_address=pac.proxy_address(self.host.cfg.pac, get_header(req.headers, "host"),
                                            self.host.listen_addrs),
            requests=t["requests"], results=t["results"],
            hit_ratio_minute=self.window.ratio(now, 60, hits, lookups),
            hit_ratio_hour=self.window.ratio(now, 3600, hits, lookups),
            hit_ratio_all=hits / lookups if lookups else None,
            client_bytes=t.get("client_sent_bytes", 0), origin_bytes=t.get("origin_received_bytes", 0),
            connections=t.get("client_connections", 0), tunnels=t.get("tunnels", 0),
            refreshes_active=t.get("refreshes_active", 0), fetches=t.get("seconds_count", 0),
            fetch_seconds=t.get("seconds_sum", 0),
            cache=None if cache is None else {k: cache.get(k, 0) for k in ("entries", "bytes", "capacity", "evictions")},
            workers=workers,
            top_by_requests=[(h, n, b) for h, (n, b) in by_req],
            top_by_bytes=[(h, n, b) for h, (n, b) in by_bytes],
        )

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.publish(self.host.refreshes_active())
            self.publisher.close()


def _hits_lookups(t: dict[str, Any]) -> tuple[float, float]:
    r = t["results"]
    hits = r.get("hit", 0) + r.get("memory_hit", 0)
    return hits, hits + r.get("miss", 0) + r.get("refresh", 0)
