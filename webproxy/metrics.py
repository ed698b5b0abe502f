"""Prometheus metrics, one consistent set for all worker processes.

Two halves, so a request costs a dictionary update and not a metric write:
- `TALLY` (a `Tally`): plain counts this process made since it last published, fed by one-line
  hooks where the facts already meet (the access-log call, admit/release, the origin fetch, the
  tunnel start and end);
- `Publisher`: once a second (and before every scrape) moves the tallies into prometheus_client
  metrics in multiprocess mode (one set of mmap files per process in a directory the main process
  creates before forking), and answers a scrape by merging every process's files. A scrape is
  exact for the worker answering it; other workers' counts are at most a second old.

prometheus_client picks its multiprocess mode when it is first imported, from
PROMETHEUS_MULTIPROC_DIR: `prepare_directory` sets it, so nothing may import prometheus_client
before that (this module imports it only inside Publisher).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Methods get their own label value; any other (extension) method is "other", so a client cannot
# grow the number of series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PURGE",
                     "NONE"})
# Squid result code -> cache_result label. Anything else (errors answered by the proxy, pages
# about itself) is "none".
RESULTS = {
    "TCP_HIT": "hit", "TCP_IMS_HIT": "hit", "TCP_MEM_HIT": "memory_hit",
    "TCP_MISS": "miss", "TCP_REFRESH_UNMODIFIED": "refresh", "TCP_REFRESH_MODIFIED": "refresh",
    "TCP_REFRESH_FAIL_OLD": "refresh", "TCP_REFRESH_FAIL_ERR": "refresh", "TCP_DENIED": "denied",
    "TCP_TUNNEL": "tunnel",
}
CACHE_RESULTS = ("hit", "memory_hit", "miss", "refresh", "denied", "tunnel", "none")
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HOSTS_KEPT = 2000  # per process: the busiest hosts by requests, for the status page
HOSTS_EVERY = 10.0  # seconds between writes of this process's host table


def cache_result(code: str) -> str:
    """The cache_result label of a Squid result code (TCP_MISS_ABORTED counts as a miss)."""
    return RESULTS.get(code.removesuffix("_ABORTED"), "none")


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


def host_of(url: str) -> str:
    """The host of an access-log URL: "http://user@host:80/x" or a CONNECT "host:443"."""
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if authority.startswith("["):
        return authority.split("]", 1)[0] + "]"
    return authority.split(":", 1)[0].lower() or "-"


class Tally:
    """This process's counts since the last publish (plain ints: the hot path's whole cost)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int, str], int] = {}  # (method, status, squid code) -> n
        self.urls: dict[str, list[int]] = {}  # url -> [requests, bytes to the client]
        self.client_bytes = 0
        self.origin_bytes = 0
        self.fetches: list[float] = []  # seconds from request sent upstream to response head
        self.connections = 0  # open now (not a delta)
        self.tunnels = 0  # open now (not a delta)

    def request(self, method: str, status: int, code: str, nbytes: int, url: str) -> None:
        key = (method, status, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.client_bytes += nbytes
        u = self.urls.get(url)
        if u is None:
            self.urls[url] = [1, nbytes]
        else:
            u[0] += 1
            u[1] += nbytes

    def fetched(self, seconds: float) -> None:
        self.fetches.append(seconds)

    def take(self) -> tuple[dict[tuple[str, int, str], int], dict[str, list[int]], int, int, list[float]]:
        """The deltas since the last take, resetting them."""
        out = (self.requests, self.urls, self.client_bytes, self.origin_bytes, self.fetches)
        self.requests, self.urls, self.client_bytes, self.origin_bytes, self.fetches = {}, {}, 0, 0, []
        return out


TALLY = Tally()


def prepare_directory(owner: tuple[int, int] | None = None) -> str:
    """Create the per-run directory the workers' metric files go to, and point prometheus_client
    at it (before it is imported). `owner` (uid, gid): the user workers drop to."""
    path = tempfile.mkdtemp(prefix="webproxy-metrics-")
    if owner is not None:
        os.chown(path, *owner)
    os.environ[ENV] = path
    return path


def remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Publisher:
    """This process's prometheus_client metrics, fed from TALLY; renders the merged scrape."""

    def __init__(self, tally: Tally, directory: str | None = None) -> None:
        if directory is None:  # a process started without run() (tests, tools): a private directory
            directory = os.environ.get(ENV) or prepare_directory()
        self.directory = directory
        os.environ[ENV] = directory
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.tally = tally
        self.pid = os.getpid()
        self.started = time.time()
        self.total_requests = 0
        self.hosts: dict[str, list[int]] = {}
        self._hosts_written = 0.0
        reg = CollectorRegistry()  # this process's metrics; a scrape reads the files instead
        self.requests = Counter("webproxy_requests", "Client requests by method, status class and cache result.",
                                ["method", "status_class", "cache_result"], registry=reg)
        self.client_bytes = Counter("webproxy_client_sent_bytes",
                                    "Bytes sent to clients (heads and bodies, tunnels included).", registry=reg)
        self.origin_bytes = Counter("webproxy_origin_received_bytes",
                                    "Response body bytes received from HTTP origins.", registry=reg)
        self.fetch_seconds = Histogram("webproxy_upstream_response_seconds",
                                       "Seconds from sending a request to an origin until its response head.",
                                       buckets=FETCH_BUCKETS, registry=reg)
        self.connections = Gauge("webproxy_client_connections", "Open client connections.",
                                 multiprocess_mode="livesum", registry=reg)
        self.tunnels = Gauge("webproxy_tunnels", "Open CONNECT tunnels.", multiprocess_mode="livesum", registry=reg)
        self.refreshes = Gauge("webproxy_refreshes_active", "Background cache refreshes in flight.",
                               multiprocess_mode="livesum", registry=reg)
        self.w_requests = Gauge("webproxy_worker_requests", "Requests served by each worker process.",
                                multiprocess_mode="liveall", registry=reg)
        self.w_connections = Gauge("webproxy_worker_connections", "Open client connections per worker process.",
                                   multiprocess_mode="liveall", registry=reg)
        self.w_started = Gauge("webproxy_worker_start_time_seconds", "Start time of each worker process.",
                               multiprocess_mode="liveall", registry=reg)
        self.w_started.set(self.started)
        self._children: dict[tuple[str, str, str], Any] = {}

    def publish(self, refreshes_active: int = 0, now: float | None = None) -> None:
        """Move the tallies into the metric files (call once a second and before a scrape)."""
        requests, urls, client_bytes, origin_bytes, fetches = self.tally.take()
        for (method, status, code), n in requests.items():
            labels = (method if method in METHODS else "other", status_class(status), cache_result(code))
            child = self._children.get(labels)
            if child is None:
                child = self._children[labels] = self.requests.labels(*labels)
            child.inc(n)
            self.total_requests += n
        if client_bytes:
            self.client_bytes.inc(client_bytes)
        if origin_bytes:
            self.origin_bytes.inc(origin_bytes)
        for seconds in fetches:
            self.fetch_seconds.observe(seconds)
        self.connections.set(self.tally.connections)
        self.tunnels.set(self.tally.tunnels)
        self.refreshes.set(refreshes_active)
        self.w_requests.set(self.total_requests)
        self.w_connections.set(self.tally.connections)
        self._fold_hosts(urls)
        now = time.time() if now is None else now
        if urls and now - self._hosts_written >= HOSTS_EVERY:
            self.write_hosts(now)

    def _fold_hosts(self, urls: dict[str, list[int]]) -> None:
        hosts = self.hosts
        for url, (n, nbytes) in urls.items():
            h = hosts.setdefault(host_of(url), [0, 0])
            h[0] += n
            h[1] += nbytes
        if len(hosts) > 2 * HOSTS_KEPT:  # keep memory bounded: forget the quietest hosts
            keep = sorted(hosts.items(), key=lambda kv: kv[1][0], reverse=True)[:HOSTS_KEPT]
            self.hosts = dict(keep)

    def write_hosts(self, now: float) -> None:
        """This process's host table as hosts-PID.json beside the metric files, for the status page."""
        self._hosts_written = now
        path = os.path.join(self.directory, f"hosts-{self.pid}.json")
        with contextlib.suppress(OSError):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(self.hosts, f)
            os.replace(path + ".tmp", path)

    def all_hosts(self) -> dict[str, list[int]]:
        """[requests, bytes] per host over every worker (this one exact, others as last written)."""
        self.write_hosts(time.time())
        merged: dict[str, list[int]] = {}
        for name in os.listdir(self.directory):
            if not (name.startswith("hosts-") and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as f:
                    table = json.load(f)
            except (OSError, ValueError):
                continue
            for host, (n, nbytes) in table.items():
                m = merged.setdefault(host, [0, 0])
                m[0] += n
                m[1] += nbytes
        return merged

    def collect(self, cache_stats: Callable[[], dict[str, Any] | None]) -> Any:
        """A registry merging every worker's metric files, plus the cache's figures read now."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=self.directory)
        reg.register(_CacheCollector(cache_stats))
        return reg

    def exposition(self, cache_stats: Callable[[], dict[str, Any] | None]) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.collect(cache_stats))

    def close(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.directory, f"hosts-{self.pid}.json"))
        mark_process_dead(self.pid, self.directory)


class _CacheCollector:
    """The shared cache's own figures, read from the store at scrape time (the store is one
    directory for all workers, so any worker reads the whole of it)."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.stats()
        if s is None:
            return
        yield GaugeMetricFamily("webproxy_cache_entries", "Responses stored in the disk cache.", value=s["entries"])
        yield GaugeMetricFamily("webproxy_cache_bytes", "Bytes used by the disk cache.", value=s["bytes"])
        yield GaugeMetricFamily("webproxy_cache_capacity_bytes", "cache.capacity.", value=s["capacity"])
        yield CounterMetricFamily("webproxy_cache_evictions", "Responses evicted to stay under cache.capacity.",
                                  value=s.get("evictions", 0))


def totals(registry: Any) -> dict[str, Any]:
    """Plain numbers from a collected registry, for the status page."""
    out: dict[str, Any] = {"results": dict.fromkeys(CACHE_RESULTS, 0), "workers": {}, "requests": 0}
    workers: dict[str, dict[str, float]] = out["workers"]
    for family in registry.collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "webproxy_requests_total":
                out["results"][labels["cache_result"]] = out["results"].get(labels["cache_result"], 0) + value
                out["requests"] += value
            elif name.startswith("webproxy_worker_"):
                workers.setdefault(labels["pid"], {})[name.removeprefix("webproxy_worker_")] = value
            elif name in ("webproxy_upstream_response_seconds_count", "webproxy_upstream_response_seconds_sum"):
                out[name.removeprefix("webproxy_upstream_response_")] = value
            elif not name.endswith("_created"):
                out[name.removeprefix("webproxy_").removesuffix("_total")] = value
    return out
