#!/usr/bin/env python3
"""One table from several `--json` files of passthrough.py and cache_hits.py: per figure, each run's
webproxy and Squid req/s, the ratio against issue 9's target, CPU us/request, p99 and the noise.

    python3 bench/summarize.py bench/out/before-*.json
    python3 bench/summarize.py /work/shared/bench-before/*.json bench/out/after-*.json

Each figure ends with the median over its runs.  Medians of ratios taken within single runs are
what to compare between "before" and "after"; absolute req/s move with the machine's load.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GOALS, fmt_num, fmt_pct, fmt_us, print_table  # noqa: E402

# (benchmark, label, goal key, where the webproxy and squid runs are in the JSON)
FIGURES = [
    ("passthrough", "1 KiB pass-through", "pass-1k", lambda d, p: d["results"].get(p)),
    ("passthrough", "new conns, pass-through", "new-conns", lambda d, p: d.get("new_connections", {}).get(p)),
    ("cache_hits", "1 KiB hits", "hit-1k", lambda d, p: d["results"].get(p, {}).get("1k")),
    ("cache_hits", "64 KiB hits", "hit-64k", lambda d, p: d["results"].get(p, {}).get("64k")),
    ("cache_hits", "10 MiB hits (req/s)", None, lambda d, p: d["results"].get(p, {}).get("10m")),
    ("cache_hits", "new conns, 1 KiB hits", "new-conns", lambda d, p: d.get("new_connections", {}).get(p)),
]


def load_text(machine: str) -> str:
    """'4.09' from '2 CPUs, load average 4.09 4.78 4.19 at start (...)'."""
    words = machine.split()
    return words[words.index("average") + 1] if "average" in words else "?"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    runs = [(Path(f).stem, json.loads(Path(f).read_text())) for f in argv]
    for bench, label, goal_key, pick in FIGURES:
        rows, ratios, cpu_ratios = [], [], []
        for name, d in runs:
            if d.get("benchmark") != bench:
                continue
            wp, sq = pick(d, "webproxy"), pick(d, "squid")
            if not wp and not sq:
                continue
            ratio = wp["rps"] / sq["rps"] if wp and sq and sq["rps"] else None
            cpu = (wp["cpu_us_per_request"] / sq["cpu_us_per_request"]
                   if wp and sq and wp.get("cpu_us_per_request") and sq.get("cpu_us_per_request") else None)
            if ratio is not None:
                ratios.append(ratio)
            if cpu is not None:
                cpu_ratios.append(cpu)
            others = [r.get("others_cpu_pct") for r in (wp, sq) if r and r.get("others_cpu_pct") is not None]
            rows.append([name, f"{load_text(d.get('machine', ''))}..{d.get('load_at_end', '?').split()[0]}",
                         *(fmt_num(r["rps"]) if r else "n/a" for r in (wp, sq)),
                         "n/a" if ratio is None else f"{ratio:.2f}x",
                         *(fmt_num(r.get("cpu_us_per_request"), 1) if r else "n/a" for r in (wp, sq)),
                         "n/a" if cpu is None else f"{cpu:.2f}x",
                         *(fmt_us(r["lat_p99_us"]) if r else "n/a" for r in (wp, sq)),
                         fmt_pct(max(others)) if others else "n/a"])
        if not rows:
            continue
        goal = GOALS.get(goal_key) if goal_key else None
        med = statistics.median(ratios) if ratios else None
        verdict = "" if goal is None or med is None else f", target >= {goal:.1f}x: {'met' if med >= goal else 'MISSED'}"
        print(f"\n{label}: median webproxy/squid {'n/a' if med is None else f'{med:.2f}x'}{verdict}; median CPU "
              f"us/request webproxy/squid "
              f"{f'{statistics.median(cpu_ratios):.2f}x' if cpu_ratios else 'n/a'} (lower is better)")
        print_table(["run", "load", "webproxy req/s", "squid req/s", "ratio", "webproxy CPU us/req",
                     "squid CPU us/req", "CPU ratio", "webproxy p99", "squid p99", "others"], rows)
    print("\nload: the load average at the start..end of the run; others: the most CPU (in % of one CPU) "
          "other work took\nduring either row's measured run; above ~25% the req/s ratio is unreliable.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
