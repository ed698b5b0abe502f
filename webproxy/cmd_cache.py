"""`webproxy purge URL...` and `webproxy cache stats` (owned by issue 3)."""

from __future__ import annotations

import argparse
import sys


def add_purge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config")
    p.add_argument("urls", nargs="*")


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config")
    p.add_argument("action", choices=["stats"])


def purge_main(args: argparse.Namespace) -> int:
    print("webproxy purge: not built yet (issue 3)", file=sys.stderr)
    return 2


def cache_main(args: argparse.Namespace) -> int:
    print("webproxy cache: not built yet (issue 3)", file=sys.stderr)
    return 2
