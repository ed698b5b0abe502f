"""`webproxy run [-c FILE]`: run the proxy (embedded defaults: 127.0.0.1:3128)."""

from __future__ import annotations

import argparse

from tunnel.netaddr import is_local_address
from webproxy import authbackends, config, logfiles, parents, server, service


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help="TOML config file (default: embedded defaults)")
    p.add_argument("--listen", metavar="HOST:PORT", action="append",
                   help="listen address, overrides server.listen (repeatable)")
    p.add_argument("--check", action="store_true", help="check the config file and exit")


def main(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    if args.listen:
        try:
            cfg.server["listen"] = [config.parse_addr(a) for a in args.listen]
        except ValueError as e:
            raise config.ConfigError(f"--listen: {e}") from None
    if args.check:
        # What starting would find wrong before binding: log paths, the htpasswd file, server.user, the
        # pid file's directory.
        logfiles.check(cfg)
        parents.check(cfg.upstream, cfg.server["listen"], is_local_address)
        authbackends.build(cfg.auth)  # the htpasswd (and groups) file read as the proxy will
        service.identity(cfg)
        if cfg.server["pid_file"]:
            service.check_pid_file(cfg.server["pid_file"])
        print(f"webproxy: config {args.config or '(embedded defaults)'} is valid")
        return 0
    return server.run(cfg)
