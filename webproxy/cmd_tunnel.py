"""`webproxy tunnel LISTEN UPSTREAM...`: the standalone TCP port forwarder (owned by issue 4)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("listen")
    p.add_argument("upstreams", nargs="+")


def main(args: argparse.Namespace) -> int:
    print("webproxy tunnel: not built yet (issue 4)", file=sys.stderr)
    return 2
