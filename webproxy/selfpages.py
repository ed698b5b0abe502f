"""Requests addressed to the proxy itself (origin-form, or an absolute URL naming the proxy):
one routing table, and the glue that gathers the numbers the pages are made of (metrics files,
the cache store) for the pure renderers in webproxy.statuspage, webproxy.pac and
prometheus_client's text format."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from webproxy import __version__, metrics, pac, statuspage
from webproxy.httpmsg import get_header

if TYPE_CHECKING:
    from webproxy.frontend import ClientConnection, Request
    from webproxy.server import ProxyServer

# path -> (page, admin_clients only). The status page names the busiest hosts: admin-only too.
ROUTES: dict[str, tuple[str, bool]] = {
    "/": ("status", True),
    "/status": ("status", True),
    "/metrics": ("metrics", True),
    "/proxy.pac": ("pac", False),
    "/wpad.dat": ("pac", False),
}
SAMPLE_EVERY = 10.0  # seconds between hit-ratio samples
TOP_HOSTS = 10


@dataclass
class Page:
    status: int
    content_type: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


class SelfPages:
    def __init__(self, server: ProxyServer, metrics_dir: str | None) -> None:
        self.server = server
        self.publisher = metrics.Publisher(metrics.TALLY, metrics_dir)
        self.window = statuspage.RatioWindow()
        self._sampled = 0.0

    # ---- timer --------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Once a second: publish this process's tallies; every SAMPLE_EVERY s, sample the hit ratio."""
        self.publisher.publish(self._refreshes_active(), now)
        if now - self._sampled >= SAMPLE_EVERY:
            self._sampled = now
            hits, lookups = _hits_lookups(metrics.totals(self.publisher.collect(lambda: None)))
            self.window.add(now, hits, lookups)

    def _refreshes_active(self) -> int:
        refresher = getattr(self.server, "refresher", None)
        return len(refresher.running) if refresher is not None else 0

    def _cache_stats(self) -> dict[str, Any] | None:
        layer = self.server.cache_layer
        return layer.store.stats() if layer is not None else None

    # ---- routing ------------------------------------------------------------------------------
    def answer(self, conn: ClientConnection, req: Request) -> Page | None:
        """The page for a GET/HEAD of one of ROUTES, or None (not ours: the caller says so)."""
        if req.method not in ("GET", "HEAD"):
            return None
        path = req.target.split("?", 1)[0]
        route = ROUTES.get(path)
        if route is None:
            return None
        kind, admin_only = route
        if admin_only and not self.server.is_admin(conn):
            return Page(403, "text/plain; charset=utf-8",
                        f"access denied: {path} is only for access.admin_clients (your address: "
                        f"{conn.client_ip})\n".encode())
        if kind == "metrics":
            self.publisher.publish(self._refreshes_active())
            return Page(200, metrics.CONTENT_TYPE, self.publisher.exposition(self._cache_stats))
        if kind == "pac":
            return Page(200, pac.CONTENT_TYPE, self.pac_text(req).encode())
        return Page(200, "text/html; charset=utf-8", statuspage.render(self.snapshot(req)).encode())

    def pac_text(self, req: Request) -> str:
        cfg = self.server.cfg
        return pac.render(cfg.pac, pac.proxy_address(cfg.pac, get_header(req.headers, "host"),
                                                     self.server.listen_addrs))

    # ---- the status page's numbers ------------------------------------------------------------
    def snapshot(self, req: Request) -> statuspage.Snapshot:
        now = time.time()
        self.publisher.publish(self._refreshes_active(), now)
        cache = self._cache_stats()
        t = metrics.totals(self.publisher.collect(lambda: None))
        hits, lookups = _hits_lookups(t)
        workers = [statuspage.Worker(int(pid), w.get("start_time_seconds", now), w.get("requests", 0),
                                     w.get("connections", 0)) for pid, w in t["workers"].items()]
        hosts = self.publisher.all_hosts()
        by_req = sorted(hosts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP_HOSTS]
        by_bytes = sorted(hosts.items(), key=lambda kv: (-kv[1][1], kv[0]))[:TOP_HOSTS]
        return statuspage.Snapshot(
            name=self.server.cfg.server["name"], version=__version__, now=now,
            started=min([w.started for w in workers], default=self.publisher.started),
            proxy_address=pac.proxy_address(self.server.cfg.pac, get_header(req.headers, "host"),
                                            self.server.listen_addrs),
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
        self.publisher.publish(self._refreshes_active())
        self.publisher.close()


def _hits_lookups(t: dict[str, Any]) -> tuple[float, float]:
    r = t["results"]
    hits = r.get("hit", 0) + r.get("memory_hit", 0)
    return hits, hits + r.get("miss", 0) + r.get("refresh", 0)
