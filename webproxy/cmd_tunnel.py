"""`webproxy tunnel LISTEN UPSTREAM...`: the standalone TCP port forwarder (tunnel.forwarder).

Either forward one port given on the command line, or (`-c CONFIG`) run every `[[tunnel]]` entry
of a config file. Problems a person can fix (port in use, bad address) are one line and exit 2;
SIGTERM/SIGINT stop the forwarder and exit 0; SIGHUP re-reads the config file (access, limits,
timeouts take effect for new connections; listen and upstream changes are named as needing a
restart), or is ignored when the forwarder runs from the command line. It never kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import signal
import socket
import sys
from typing import Any

from tunnel.forwarder import Forwarder, ForwarderSettings, serve_forwarders
from tunnel.relay import ENGINES
from webproxy import config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("listen", nargs="?", help="address to listen on, host:port ([::]:port for IPv6)")
    p.add_argument("upstreams", nargs="*", help="one or more host:port to forward to")
    p.add_argument("-c", "--config", help="run the [[tunnel]] entries of this config file")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="concurrent connections (0 = unlimited; default 1024)")
    p.add_argument("--max-per-client", type=int, default=0, metavar="N",
                   help="concurrent connections per client address (0 = unlimited, the default)")
    p.add_argument("--when-full", choices=["wait", "refuse"], default="refuse",
                   help="over the limit: leave new clients waiting in the backlog, or close them")
    p.add_argument("--allow", action="append", metavar="CIDR",
                   help="client network allowed to connect (repeatable; default loopback only)")
    p.add_argument("--balance", choices=["round-robin", "least-connections"], default="round-robin")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--idle-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="close a bridge after this long without traffic (0 = never)")
    p.add_argument("--half-close-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="close a bridge one side of which has finished after this long without traffic "
                        "(0 = never; default 60)")
    p.add_argument("--relay-engine", choices=ENGINES, default=None,
                   help="byte-moving engine: copy (default) or splice (Linux zero-copy)")
    p.add_argument("--buffer-size", type=int, default=None, metavar="BYTES",
                   help="relay buffer per direction (default 262144)")


class UsageError(Exception):
    pass


def _entries_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.config:
        if args.listen or args.upstreams:
            raise UsageError("give either LISTEN UPSTREAM... or -c CONFIG, not both")
        cfg = config.load(args.config)
        if not cfg.tunnel:
            raise UsageError(f"{args.config} has no [[tunnel]] entries (add one, see conf/webproxy.toml)")
        return cfg.tunnel
    if not args.listen or not args.upstreams:
        raise UsageError("usage: webproxy tunnel LISTEN UPSTREAM [UPSTREAM...] (e.g. 127.0.0.1:8080 "
                         "10.0.0.5:80), or webproxy tunnel -c CONFIG")
    for name, value in (("--max-connections", args.max_connections), ("--max-per-client", args.max_per_client),
                        ("--connect-timeout", args.connect_timeout), ("--idle-timeout", args.idle_timeout),
                        ("--half-close-timeout", args.half_close_timeout)):
        if value < 0:
            raise UsageError(f"{name} cannot be negative")
    entry: dict[str, Any] = {}
    try:
        entry["listen"] = config.parse_addr(args.listen)
    except ValueError as e:
        raise UsageError(f"listen address: {e}") from None
    entry["upstreams"] = []
    for u in args.upstreams:
        try:
            host, port = config.parse_addr(u)
        except ValueError as e:
            raise UsageError(f"upstream: {e}") from None
        if port == 0:
            raise UsageError(f"upstream {u!r}: port 0 is not a port you can connect to")
        entry["upstreams"].append((host, port))
    nets = []
    for cidr in args.allow or ["127.0.0.0/8", "::1/128"]:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise UsageError(f"--allow {cidr!r} is not a network such as 192.168.0.0/16") from None
    entry.update(allow_clients=nets, balance=args.balance, max_connections=args.max_connections,
                 max_connections_per_client=args.max_per_client, when_full=args.when_full,
                 connect_timeout=args.connect_timeout, idle_timeout=args.idle_timeout,
                 half_close_timeout=args.half_close_timeout)
    return [entry]


def _bind_problem(e: OSError, listen: tuple[str, int]) -> str:
    where = f"{listen[0]}:{listen[1]}"
    if isinstance(e, socket.gaierror):
        return f"cannot listen on {where}: unknown host name {listen[0]!r} (use an IP address such as 0.0.0.0)"
    if e.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: address already in use "
                "(another process has that port; stop it or choose another port)")
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {where}: {listen[0]} is not an address of this machine "
                "(use one of its addresses, or 0.0.0.0)")
    if e.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need root; use a higher port)"
    return f"cannot listen on {where}: {e.strerror or e}"


def _say(line: str) -> None:
    print(f"webproxy tunnel: {line}", file=sys.stderr, flush=True)


def _reload(config_path: str | None, running: list[Forwarder]) -> None:
    """SIGHUP: apply the config file's live settings to the running forwarders, one line each."""
    if config_path is None:
        _say("SIGHUP ignored: forwarding from the command line, there is no config file to re-read")
        return
    try:
        entries = config.load(config_path).tunnel
    except config.ConfigError as e:
        _say(f"reload failed, keeping the running config: {e}")
        return
    by_listen = {e["listen"]: e for e in entries}
    for f in running:
        entry = by_listen.pop(f.s.listen, None)
        if entry is None:
            _say(f"reload: {f.s.listen[0]}:{f.s.listen[1]} is no longer in {config_path}; restart to remove it")
            continue
        applied, restart = f.reconfigure(ForwarderSettings.from_entry(entry))
        _say(f"reloaded {config_path} for {f.s.listen[0]}:{f.s.listen[1]}: {len(applied)} change(s) applied"
             + (f" ({', '.join(applied)})" if applied else "")
             + (f"; {', '.join(restart)} changed, restart to apply" if restart else ""))
    for listen in by_listen:
        _say(f"reload: new entry {listen[0]}:{listen[1]} needs a restart")


async def _run(entries: list[dict[str, Any]], engine: str | None, buffer_size: int | None,
               config_path: str | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running: list[Forwarder] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(config_path, running))
    listening: list[str] = []

    def started(forwarders: list) -> None:
        running.extend(forwarders)
        for f in forwarders:
            ups = " ".join(f"{h}:{p}" for h, p in f.s.upstreams)
            listening.append(f"{f.address[0]}:{f.address[1]}")
            print(f"webproxy tunnel: listening on {f.address[0]}:{f.address[1]} -> {ups}",
                  file=sys.stderr, flush=True)

    if buffer_size:
        entries = [{**e, "buffer_size": buffer_size} for e in entries]
    serve = asyncio.ensure_future(serve_forwarders(entries, engine=engine, started=started))
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([serve, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if serve.done():
        serve.result()  # a bind error: raise it for main()
    serve.cancel()
    try:
        await serve
    except asyncio.CancelledError:
        pass
    return 0


def _raise_fd_limit(entries: list[dict[str, Any]], engine: str | None) -> None:
    """Each bridge holds two sockets: lift the soft fd limit toward what the limits allow."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_bridge = 6 if engine == "splice" else 2  # splice adds two pipes
    want = sum((e.get("max_connections") or 65536) * per_bridge for e in entries) + 256
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def main(args: argparse.Namespace) -> int:
    try:
        entries = _entries_from_args(args)
    except (UsageError, config.ConfigError) as e:
        print(f"webproxy tunnel: {e}", file=sys.stderr)
        return 2
    _raise_fd_limit(entries, args.relay_engine)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop installs the reload handler
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            return runner.run(_run(entries, args.relay_engine, args.buffer_size, args.config))
    except OSError as e:
        listen = next((en["listen"] for en in entries if _matches(e, en)), entries[0]["listen"])
        print(f"webproxy tunnel: {_bind_problem(e, listen)}", file=sys.stderr)
        return 2


def _matches(e: OSError, entry: dict[str, Any]) -> bool:
    return getattr(e, "listen", None) == entry["listen"]


if __name__ == "__main__":  # `python3 -m webproxy.cmd_tunnel ...`, same as `webproxy tunnel ...`
    _parser = argparse.ArgumentParser(prog="webproxy tunnel")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
