"""`webproxy purge URL...` and `webproxy cache stats`: cache administration, also while a proxy
runs on the same directory (the store is process-safe; a purge bumps the directory's generation
counter, which running proxies read on every lookup, so the next request after `purge` returns is a
miss: see cache.generation)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cache.key import BadURL, cache_key
from cache.store import Store, StoreWriteError
from webproxy.config import load


def add_purge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (default: built-in defaults)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prefix", action="store_true", help="remove every URL starting with each argument")
    mode.add_argument("--domain", action="store_true", help="remove every URL of each domain and its subdomains")
    mode.add_argument("--all", action="store_true", help="remove everything")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    p.add_argument("urls", nargs="*", metavar="URL")


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="config file (default: built-in defaults)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("action", choices=["stats"])


def _open(args: argparse.Namespace) -> Store | None:
    directory = load(args.config).cache["directory"]
    if not os.path.isdir(directory):
        print(f"webproxy: no cache at {directory}", file=sys.stderr)
        return None
    # No capacity: keep the one the running proxy set.
    return Store(directory)


def _normalise_prefix(prefix: str) -> str:
    scheme, sep, rest = prefix.partition("://")
    if not sep:
        return prefix
    if "/" in rest or "?" in rest:
        try:
            return cache_key(prefix)
        except BadURL:
            return prefix
    return f"{scheme.lower()}://{rest.lower()}"


def purge_main(args: argparse.Namespace) -> int:
    if not args.all and not args.urls:
        print("webproxy purge: give one or more URLs (or --all)", file=sys.stderr)
        return 2
    store = _open(args)
    if store is None:
        return 1
    status = 0
    try:
        removed: list[str] = []
        if args.all:
            removed = store.purge_all(args.dry_run)
        for arg in args.urls if not args.all else []:
            if args.domain:
                got = store.purge_domain(arg, args.dry_run)
            elif args.prefix:
                got = store.purge_prefix(_normalise_prefix(arg), args.dry_run)
            else:
                try:
                    key = cache_key(arg)
                except BadURL as e:
                    print(f"webproxy purge: {e}", file=sys.stderr)
                    status = 1
                    continue
                got = [key] if store.purge(key, args.dry_run) else []
            if not got:
                print(f"webproxy purge: not cached: {arg}", file=sys.stderr)
                status = 1
            removed.extend(got)
        for url in removed:
            print(url)
        if args.dry_run:
            print(f"(dry run: {len(removed)} URL(s) would be removed)", file=sys.stderr)
    except StoreWriteError as e:
        print(f"webproxy purge: {e}", file=sys.stderr)
        status = 1
    finally:
        store.close()
    return status


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cache_main(args: argparse.Namespace) -> int:
    store = _open(args)
    if store is None:
        return 1
    try:
        s = store.stats()
    finally:
        store.close()
    s["directory"] = store.directory
    if args.json:
        print(json.dumps(s, sort_keys=True))
        return 0
    print(f"directory    {s['directory']}")
    print(f"entries      {s['entries']}")
    print(f"bytes        {s['bytes']} ({_human(s['bytes'])})")
    print(f"capacity     {s['capacity']} ({_human(s['capacity'])})")
    print(f"hits         {s['hits']} ({s['mem_hits']} from memory)")
    print(f"misses       {s['misses']}")
    print(f"hit ratio    {100 * s['hit_ratio']:.1f}%")
    print(f"bytes saved  {s['bytes_saved']} ({_human(s['bytes_saved'])})")
    print(f"evictions    {s['evictions']}")
    print(f"refreshes    {s['refreshes']} ({s['refresh_304']} not modified, {s['refresh_replaced']} replaced, "
          f"{s['refresh_failed']} failed)")
    print(f"refresh hits {s['refresh_hits']}")
    return 0
