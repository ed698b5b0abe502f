"""The status page at / and /status: HTML as a pure function of a `Snapshot` of plain numbers
(gathered by webproxy.selfpages), plus the hit-ratio window it shows. No I/O here."""

from __future__ import annotations

import bisect
import html
from dataclasses import dataclass, field


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def human_count(n: float) -> str:
    return f"{int(n):,}".replace(",", "\u2009")  # thin space: 1 234 567 reads in every locale


def counted(n: float, one: str, many: str) -> str:
    return f"{human_count(n)} {one if int(n) == 1 else many}"


def percent(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{100 * ratio:.1f} %"


class RatioWindow:
    """Cumulative (hits, lookups) samples over the last hour, to tell the hit ratio over the last
    minute or hour from two samples (a lookup is a hit, memory hit, miss or refresh)."""

    def __init__(self, keep: float = 3700.0) -> None:
        self.keep = keep
        self.times: list[float] = []
        self.values: list[tuple[float, float]] = []

    def add(self, now: float, hits: float, lookups: float) -> None:
        self.times.append(now)
        self.values.append((hits, lookups))
        cut = bisect.bisect_left(self.times, now - self.keep)
        if cut:
            del self.times[:cut], self.values[:cut]

    def ratio(self, now: float, seconds: float, hits: float, lookups: float) -> float | None:
        """Hit ratio between the newest sample at least `seconds` old and the current (hits,
        lookups); since start (zero) when no sample is that old yet; None without lookups."""
        i = bisect.bisect_right(self.times, now - seconds) - 1
        base_hits, base_lookups = self.values[i] if i >= 0 else (0.0, 0.0)
        d = lookups - base_lookups
        return (hits - base_hits) / d if d > 0 else None


@dataclass
class Worker:
    pid: int
    started: float
    requests: float
    connections: float


@dataclass
class Snapshot:
    """Everything the page shows, as numbers; `now` is the time it was taken."""

    name: str
    version: str
    now: float
    started: float
    proxy_address: str
    requests: float = 0
    results: dict[str, float] = field(default_factory=dict)
    hit_ratio_minute: float | None = None
    hit_ratio_hour: float | None = None
    hit_ratio_all: float | None = None
    client_bytes: float = 0
    origin_bytes: float = 0
    connections: float = 0
    tunnels: float = 0
    refreshes_active: float = 0
    fetches: float = 0
    fetch_seconds: float = 0
    cache: dict[str, float] | None = None  # entries, bytes, capacity, evictions; None when off
    workers: list[Worker] = field(default_factory=list)
    top_by_requests: list[tuple[str, int, int]] = field(default_factory=list)  # host, requests, bytes
    top_by_bytes: list[tuple[str, int, int]] = field(default_factory=list)


_STYLE = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #5b6475; --bg: #f6f7f9; --card: #fff;
  --line: #dde1e8; --accent: #2563eb; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e8ee; --muted: #9aa3b5; --bg: #14171d;
  --card: #1c2029; --line: #2c3240; --accent: #6ea0ff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
  background: var(--bg); }
main { max-width: 68rem; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
h2 { font-size: 1.05rem; margin: 1.75rem 0 .6rem; }
p.lead { color: var(--muted); margin: 0 0 1.25rem; }
code { font: .9em ui-monospace, "SFMono-Regular", Menlo, monospace; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(12.5rem, 1fr)); gap: .75rem; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: .6rem; padding: .75rem .9rem; }
.card .label { color: var(--muted); font-size: .8rem; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 1.45rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: .85rem; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(24rem, 1fr)); column-gap: 1.25rem; }
table { width: 100%; border-collapse: collapse; background: var(--card); border: 1px solid var(--line);
  border-radius: .6rem; overflow: hidden; }
th, td { padding: .4rem .7rem; border-bottom: 1px solid var(--line); text-align: left; }
th { color: var(--muted); font-weight: 500; font-size: .85rem; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td { overflow-wrap: anywhere; }
tr:last-child td { border-bottom: 0; }
.bar { height: .5rem; background: var(--line); border-radius: .25rem; overflow: hidden; margin-top: .4rem; }
.bar span { display: block; height: 100%; background: var(--accent); }
a { color: var(--accent); }
footer { margin-top: 2rem; color: var(--muted); font-size: .85rem; }
"""


def _card(label: str, value: str, sub: str = "", bar: float | None = None) -> str:
    meter = f'<div class="bar"><span style="width:{min(max(bar, 0), 1) * 100:.1f}%"></span></div>' if bar is not None else ""
    sub_html = f'<div class="sub">{html.escape(sub)}</div>' if sub else ""
    return (f'<div class="card"><div class="label">{html.escape(label)}</div>'
            f'<div class="value">{html.escape(value)}</div>{sub_html}{meter}</div>')


def _table(headers: list[str], rows: list[list[str]], numeric: set[int], empty: str) -> str:
    head = "".join(f'<th class="n">{html.escape(h)}</th>' if i in numeric else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(headers))
    if not rows:
        return f'<table><tr>{head}</tr><tr><td colspan="{len(headers)}">{html.escape(empty)}</td></tr></table>'
    body = "".join("<tr>" + "".join(f'<td class="n">{html.escape(c)}</td>' if i in numeric
                                    else f"<td>{html.escape(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


RESULT_NAMES = [("hit", "disk hits"), ("memory_hit", "memory hits"), ("miss", "misses"),
                ("refresh", "revalidated"), ("tunnel", "tunnels"), ("denied", "denied"),
                ("none", "other (errors, these pages)")]


def render(s: Snapshot) -> str:
    """The whole page, from numbers only."""
    uptime = human_duration(s.now - s.started)
    cards = [
        _card("requests served", human_count(s.requests), f"up {uptime}"),
        _card("hit ratio, last minute", percent(s.hit_ratio_minute), f"last hour {percent(s.hit_ratio_hour)}",
              s.hit_ratio_minute),
        _card("hit ratio since start", percent(s.hit_ratio_all), bar=s.hit_ratio_all),
        _card("sent to clients", human_bytes(s.client_bytes), f"from origins {human_bytes(s.origin_bytes)}"),
        _card("client connections", human_count(s.connections), f"{counted(s.tunnels, 'open tunnel', 'open tunnels')}"),
        _card("origin response time", f"{1000 * s.fetch_seconds / s.fetches:.0f} ms" if s.fetches else "n/a",
              f"mean of {counted(s.fetches, 'fetch', 'fetches')}"),
    ]
    if s.cache is not None:
        c = s.cache
        used = c["bytes"] / c["capacity"] if c["capacity"] else 0.0
        cards.append(_card("cache", f"{human_bytes(c['bytes'])}", f"of {human_bytes(c['capacity'])}, "
                           f"{counted(c['entries'], 'entry', 'entries')}, {human_count(c['evictions'])} evicted", used))
        cards.append(_card("refreshes in flight", human_count(s.refreshes_active)))
    else:
        cards.append(_card("cache", "off", "cache.enabled = false"))
    results = [[label, human_count(s.results.get(key, 0)),
                percent(s.results.get(key, 0) / s.requests if s.requests else None)] for key, label in RESULT_NAMES]
    workers = [[str(w.pid), human_duration(s.now - w.started), human_count(w.requests), human_count(w.connections)]
               for w in sorted(s.workers, key=lambda w: w.pid)]
    by_req = [[h, human_count(n), human_bytes(b)] for h, n, b in s.top_by_requests]
    by_bytes = [[h, human_bytes(b), human_count(n)] for h, n, b in s.top_by_bytes]
    name = html.escape(s.name)
    addr = html.escape(s.proxy_address)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{name}: webproxy status</title><style>{_STYLE}</style></head>
<body><main>
<h1>{name} <small style="font-weight:400;color:var(--muted)">webproxy {html.escape(s.version)}</small></h1>
<p class="lead">An HTTP proxy: point your client at it, e.g. <code>curl -x http://{addr} http://example.com/</code>
or let browsers configure themselves from <a href="/proxy.pac">/proxy.pac</a>.
Metrics for Prometheus: <a href="/metrics">/metrics</a>.</p>
<div class="cards">{"".join(cards)}</div>
<div class="grid2">
<section><h2>Requests by result</h2>{_table(["result", "requests", "share"], results, {1, 2}, "none yet")}</section>
<section><h2>Workers</h2>{_table(["pid", "up", "requests", "connections"], workers, {1, 2, 3}, "none")}</section>
<section><h2>Top hosts by requests</h2>{_table(["host", "requests", "bytes"], by_req, {1, 2}, "no requests yet")}</section>
<section><h2>Top hosts by bytes</h2>{_table(["host", "bytes", "requests"], by_bytes, {1, 2}, "no requests yet")}</section>
</div>
<footer>Figures of other workers are at most a second old. Refresh the page to update.</footer>
</main></body></html>
"""
