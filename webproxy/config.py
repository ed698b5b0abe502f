"""Configuration: a TOML file checked against one schema of sections, keys, types and defaults.

The schema below is the single source of truth: `conf/webproxy.toml` documents the same keys and
a test keeps the two in step. Every error is one line naming the key and what is wrong, so the CLI
can print it and exit 2 instead of showing a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A problem with the configuration, worded for the person who wrote it."""


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "webproxy")


def default_ca_dir(cache_dir: str) -> str:
    """tls.ca_dir when unset: beside the cache directory (~/.cache/webproxy -> ~/.cache/webproxy-ca),
    not inside it, so clearing the cache never throws the CA away."""
    cache_dir = os.path.abspath(cache_dir.rstrip("/") or "/")
    return os.path.join(os.path.dirname(cache_dir), os.path.basename(cache_dir) + "-ca")


def ipv6_loopback() -> bool:
    """Whether this machine can bind ::1 (IPv6 may be compiled out or disabled by sysctl)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# Loopback only, on both address families where the machine has IPv6: clients that resolve
# `localhost` to ::1 first would otherwise be refused.
DEFAULT_LISTEN = ["127.0.0.1:3128", "[::1]:3128"] if ipv6_loopback() else ["127.0.0.1:3128"]

# Types understood by the checker. "size" takes an integer number of bytes or a string such as
# "512 MiB"; "addr" is "host:port" ("[::1]:3128" for IPv6); "nets" is a list of CIDR networks
# ("nets|local" also takes the word "local": every address of this machine); "choices:a,b" is a
# list of some of a, b.
SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "server": {
        "listen": ("addrs", DEFAULT_LISTEN),
        "name": ("str", "webproxy"),
        "workers": ("int", 1),
        "idle_timeout": ("float", 60.0),
        "max_requests_per_connection": ("int", 10000),
        "grace_period": ("float", 10.0),
        "max_header_size": ("size", 65536),
        "max_uri_length": ("int", 16384),
        "max_body_size": ("size", 0),
        "x_forwarded_for": ("bool", False),
        "user": ("str", ""),
        "group": ("str", ""),
        "pid_file": ("str", ""),
    },
    "access": {
        "allow_clients": ("nets", ["127.0.0.0/8", "::1/128"]),
        "admin_clients": ("nets", ["127.0.0.0/8", "::1/128"]),
        "deny_destinations": ("nets", ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "::ffff:127.0.0.0/104"]),
        "allow_domains": ("strs", []),
        "deny_domains": ("strs", []),
        "max_connections": ("int", 4096),
        "max_connections_per_client": ("int", 1024),
        "connect_ports": ("ints", [443]),
    },
    "upstream": {
        "connect_timeout": ("float", 10.0),
        "read_timeout": ("float", 60.0),
        "pool_size": ("int", 256),
        "pool_size_per_host": ("int", 0),
        "keepalive_timeout": ("float", 30.0),
        "dns_ttl": ("float", 60.0),
        "parent": ("tables:parent", []),
        "never_direct": ("bool", False),
        "always_direct": ("strs", []),
        "parent_selection": ("choice:first-up,weighted", "first-up"),
        "parent_down_time": ("float", 30.0),
    },
    "log": {
        "access_log": ("str", "-"),
        "error_log": ("str", "-"),
        "level": ("choice:debug,info,warning,error", "info"),
    },
    "cache": {
        "enabled": ("bool", True),
        "directory": ("str", _default_cache_dir()),
        "capacity": ("size", 1 << 30),
        "max_object_size": ("size", 256 << 20),
        "memory_object_size": ("size", 64 << 10),
        "memory_capacity": ("size", 64 << 20),
        "heuristic_fraction": ("float", 0.1),
        "heuristic_max": ("float", 86400.0),
        "serve_stale_on_error": ("bool", False),
        "collapse_wait": ("float", 30.0),
    },
    "refresh": {
        "enabled": ("bool", True),
        "window": ("float", 0.1),
        "min_window": ("float", 5.0),
        "popularity_window": ("float", 600.0),
        "min_hits": ("int", 2),
        "max_per_second": ("float", 5.0),
        "max_concurrent": ("int", 2),
        "max_client_rate": ("float", 200.0),
        "max_upstream_fetches": ("int", 32),
        "interval": ("float", 1.0),
    },
    "ftp": {
        "anonymous_user": ("str", "anonymous"),
        "anonymous_password": ("str", "webproxy@"),
        "default_ttl": ("float", 3600.0),
        "heuristic_fraction": ("float", 0.1),
        "idle_timeout": ("float", 30.0),
        "max_sessions_per_server": ("int", 4),
        "timeout": ("float", 30.0),
    },
    "transparent": {
        "listen": ("addrs", []),
        "mode": ("choice:redirect,tproxy", "redirect"),
        "spoof_client_address": ("bool", False),
        "sniff_bytes": ("int", 4096),
        "sniff_timeout": ("float", 2.0),
        "half_close_timeout": ("float", 60.0),
    },
    "pac": {
        "proxy": ("str", ""),
        "direct_domains": ("strs", []),
        "direct_networks": ("nets", []),
    },
    "socks": {
        "listen": ("addrs", []),
        "commands": ("choices:connect,udp,bind", ["connect", "udp", "bind"]),
        "allow_ports": ("ints", []),
        "deny_networks": ("nets|local", ["local", "127.0.0.0/8", "::1/128"]),
        "max_connections": ("int", 1024),
        "max_connections_per_client": ("int", 256),
        "handshake_timeout": ("float", 10.0),
        "idle_timeout": ("float", 600.0),
    },
    "gopher": {
        "default_ttl": ("float", 3600.0),
        "timeout": ("float", 30.0),
    },
    "tls": {
        "ca_dir": ("str", ""),
        "intercept": ("strs", []),
        "upstream_ca_file": ("str", ""),
    },
    "auth": {
        "backend": ("choice:none,htpasswd,ldap", "none"),
        "realm": ("str", "webproxy"),
        "htpasswd_file": ("str", ""),
        "groups_file": ("str", ""),
        "ldap_url": ("str", ""),
        "ldap_base": ("str", ""),
        "ldap_user_filter": ("str", "(uid={user})"),
        "ldap_group_base": ("str", ""),
        "ldap_group_filter": ("str", "(|(member={dn})(uniqueMember={dn})(memberUid={user}))"),
        "ldap_group_attribute": ("str", "cn"),
        "ldap_bind_dn": ("str", ""),
        "ldap_bind_password": ("str", ""),
        "ldap_starttls": ("bool", False),
        "ldap_ca_file": ("str", ""),
        "ldap_timeout": ("float", 5.0),
        "cache_ttl": ("float", 300.0),
        "exempt_clients": ("nets", []),
        "rule": ("tables:auth_rule", []),
    },
}

# Keys whose new value only takes effect after a restart (SIGHUP reports them).
RESTART_KEYS = {"server.listen", "server.workers", "server.user", "server.group", "server.pid_file",
                "cache.directory", "transparent.listen", "tls.ca_dir", "tls.upstream_ca_file", "transparent.mode",
                *(f"socks.{key}" for key in SCHEMA["socks"])}

# Tables that a section holds as a list (`[[upstream.parent]]`, `[[auth.rule]]`): a key of kind
# "tables:NAME" in SCHEMA; each entry is checked against TABLE_SCHEMA[NAME].
TABLE_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {}
TABLE_SCHEMA["parent"] = {  # webproxy.parents
    "address": ("addr", None),
    "username": ("str", ""),
    "password": ("str", ""),
    "domains": ("strs", []),
    "weight": ("int", 1),
}
TABLE_SCHEMA["auth_rule"] = {  # webproxy.authpolicy
    "name": ("str", ""),
    "groups": ("strs", []),
    "allow_domains": ("strs", []),
    "deny_domains": ("strs", []),
    "connect_ports": ("ints", []),
}

# Sections that are lists of tables; each entry is checked against its own schema.
LIST_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "tunnel": {
        "listen": ("addr", None),
        "upstreams": ("addrs", None),
        "balance": ("choice:round-robin,least-connections", "round-robin"),
        "max_connections": ("int", 1024),
        "max_connections_per_client": ("int", 0),
        "when_full": ("choice:wait,refuse", "refuse"),
        "allow_clients": ("nets", ["127.0.0.0/8", "::1/128"]),
        "connect_timeout": ("float", 10.0),
        "idle_timeout": ("float", 0.0),
        "half_close_timeout": ("float", 60.0),
    },
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Any) -> int:
    """Parse 1048576, "1 MiB", "1M", "512k" into bytes (binary units either way)."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as 1048576 or \"1 MiB\"")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a size such as 1048576 or \"1 MiB\"")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_addr(value: Any) -> tuple[str, int]:
    """Parse "host:port" or "[v6]:port" into (host, port)."""
    if not isinstance(value, str):
        raise ValueError("expected \"host:port\"")
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]]*):(\d+)$", value)
    if not m:
        raise ValueError(f"{value!r} is not \"host:port\" (write IPv6 as \"[::1]:3128\")")
    host, port = m.group(1), int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host or "0.0.0.0", port


def _check(kind: str, value: Any) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if value < 0:
            raise ValueError("expected a number >= 0")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        if value < 0:
            raise ValueError("expected a number >= 0")
        return float(value)
    if kind == "size":
        return parse_size(value)
    if kind == "addr":
        return parse_addr(value)
    if kind.startswith("choices:"):
        if not isinstance(value, list):
            raise ValueError(f"expected a list of some of {kind[8:].replace(',', ', ')}")
        return [_check("choice:" + kind[8:], v) for v in value]
    if kind == "nets|local":
        if not isinstance(value, list):
            raise ValueError("expected a list of networks such as \"10.0.0.0/8\" or the word \"local\"")
        nets: list[Any] = []
        for v in value:
            try:
                nets.append(v if v == "local" else ipaddress.ip_network(v, strict=False))
            except (ValueError, TypeError):
                raise ValueError(f"{v!r} is neither a network such as \"10.0.0.0/8\" nor the word \"local\"") from None
        return nets
    if kind in ("addrs", "strs", "ints", "nets"):
        if isinstance(value, str) and kind in ("addrs", "nets", "strs"):
            value = [value]
        if not isinstance(value, list):
            raise ValueError("expected a list")
        if kind == "addrs":
            return [parse_addr(v) for v in value]
        if kind == "strs":
            return [_check("str", v) for v in value]
        if kind == "ints":
            return [_check("int", v) for v in value]
        nets = []
        for v in value:
            try:
                nets.append(ipaddress.ip_network(v, strict=False))
            except (ValueError, TypeError):
                raise ValueError(f"{v!r} is not a network such as \"192.168.0.0/16\"") from None
        return nets
    if kind.startswith("choice:"):
        choices = kind[7:].split(",")
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    raise AssertionError(kind)


def _check_section(where: str, schema: dict[str, tuple[str, Any]], table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"config: [{where}] must be a table")
    out: dict[str, Any] = {}
    for key in table:
        if key not in schema:
            known = ", ".join(schema)
            raise ConfigError(f"config: unknown key '{where}.{key}' (known keys in [{where}]: {known})")
    for key, (kind, default) in schema.items():
        if kind.startswith("tables:"):
            out[key] = _check_tables(f"{where}.{key}", TABLE_SCHEMA[kind[7:]], table.get(key, default))
        elif key in table:
            try:
                out[key] = _check(kind, table[key])
            except ValueError as e:
                raise ConfigError(f"config: '{where}.{key}': {e}") from None
        elif default is None:
            raise ConfigError(f"config: '{where}.{key}' is required")
        else:
            out[key] = _check(kind, default)
    return out


def _check_tables(where: str, schema: dict[str, tuple[str, Any]], value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"config: '{where}' is a list of tables, written [[{where}]]")
    return [_check_section(f"{where}[{i}]", schema, t) for i, t in enumerate(value)]


@dataclass
class Config:
    """The checked configuration: `cfg.server["listen"]`, `cfg.cache["capacity"]`, ..."""

    server: dict[str, Any]
    access: dict[str, Any]
    upstream: dict[str, Any]
    log: dict[str, Any]
    cache: dict[str, Any]
    refresh: dict[str, Any]
    ftp: dict[str, Any]
    transparent: dict[str, Any]
    pac: dict[str, Any]
    socks: dict[str, Any]
    gopher: dict[str, Any]
    auth: dict[str, Any]
    tunnel: list[dict[str, Any]]
    path: str | None = None
    tls: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every key as "section.key" -> value, for diffing on reload."""
        out = {}
        for section in SCHEMA:
            for key, value in getattr(self, section).items():
                out[f"{section}.{key}"] = value
        return out


def from_dict(data: dict[str, Any], path: str | None = None) -> Config:
    for section in data:
        if section not in SCHEMA and section not in LIST_SCHEMA:
            known = ", ".join([*SCHEMA, *LIST_SCHEMA])
            raise ConfigError(f"config: unknown section [{section}] (known sections: {known})")
    sections = {name: _check_section(name, schema, data.get(name, {})) for name, schema in SCHEMA.items()}
    tunnels = data.get("tunnel", [])
    if not isinstance(tunnels, list):
        raise ConfigError("config: tunnels are written [[tunnel]] (a list of tables)")
    checked = [_check_section(f"tunnel[{i}]", LIST_SCHEMA["tunnel"], t) for i, t in enumerate(tunnels)]
    sections["cache"]["directory"] = os.path.expanduser(sections["cache"]["directory"])
    tls = sections["tls"]
    tls["ca_dir"] = os.path.expanduser(tls["ca_dir"]) or default_ca_dir(sections["cache"]["directory"])
    _check_auth(sections)
    return Config(**sections, tunnel=checked, path=path)


def _check_auth(sections: dict[str, dict[str, Any]]) -> None:
    """[auth] against the rest: what a backend needs, and no password prompt for clients that
    cannot answer one (a transparently redirected browser does not know there is a proxy)."""
    auth = sections["auth"]
    backend = auth["backend"]
    if backend == "none":
        return
    if backend == "htpasswd" and not auth["htpasswd_file"]:
        raise ConfigError("config: auth.backend = \"htpasswd\" needs auth.htpasswd_file "
                          "(create it with `webproxy user add NAME`)")
    if backend == "ldap" and not (auth["ldap_url"] and auth["ldap_base"]):
        raise ConfigError("config: auth.backend = \"ldap\" needs auth.ldap_url and auth.ldap_base")
    if sections["transparent"]["listen"] and not auth["exempt_clients"]:
        raise ConfigError("config: auth cannot challenge transparently redirected clients (they do not know "
                          "about the proxy); list their networks in auth.exempt_clients, or turn auth off")


def load(path: str | None) -> Config:
    """Load and check a config file; None gives the embedded defaults."""
    if path is None:
        return from_dict({})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    return from_dict(data, path)
