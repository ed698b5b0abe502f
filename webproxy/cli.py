"""The `webproxy` command: run, tunnel, purge, cache stats, user.

Each subcommand lives in its own module with `add_arguments(parser)` and `main(args) -> int`;
this file only dispatches and turns expected failures into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from webproxy import __version__
from webproxy.config import ConfigError

# subcommand -> (module, help)
COMMANDS = {
    "run": ("webproxy.cmd_run", "run the proxy (default config: 127.0.0.1:3128)"),
    "tunnel": ("webproxy.cmd_tunnel", "forward a TCP port to one or more upstreams"),
    "purge": ("webproxy.cmd_cache", "remove URLs from the cache"),
    "cache": ("webproxy.cmd_cache", "cache administration (stats)"),
    "ca": ("webproxy.cmd_ca", "the local CA for TLS interception (init, show)"),
    "user": ("webproxy.cmd_user", "proxy users of the htpasswd file (add, remove, list)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"webproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_text) in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=help_text, description=help_text)
        adder = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
        adder(p)
        p.set_defaults(_main=getattr(mod, f"{name}_main", None) or mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except ConfigError as e:
        print(f"webproxy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
