"""Running as a service: the user to drop to after binding ports (`server.user`/`server.group`) and
the pid file (`server.pid_file`). Every problem is one line for the admin (StartupError/ConfigError
text); the decisions (who to become, is the cache directory theirs) are separate from the calls
that change the process."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from collections.abc import Iterator
from dataclasses import dataclass

from webproxy.config import Config, ConfigError

ROOT_WARNING = ("running as root; set server.user (e.g. \"nobody\" or a dedicated \"webproxy\" user) "
                "to drop privileges once the ports are bound")


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def identity(cfg: Config) -> Identity | None:
    """Who `server.user`/`server.group` name, or None when no user is set. Raises ConfigError."""
    user, group = cfg.server["user"], cfg.server["group"]
    if not user:
        if group:
            raise ConfigError("server.group is set without server.user; set server.user too")
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"server.user: no such user {user!r}; create it (useradd --system {user}) "
                          "or change server.user") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"server.group: no such group {group!r}; create it or change server.group") from None
    return Identity(user, pw.pw_uid, gid)


def check_start(ident: Identity | None, euid: int) -> str | None:
    """None when the process may start as it is; else the one line saying why not."""
    if ident is not None and euid != 0 and euid != ident.uid:
        return (f"server.user is {ident.user!r} but webproxy was started as uid {euid}, which cannot "
                "switch users; start it as root or remove server.user")
    return None


def cache_dir_problem(ident: Identity, directory: str, owner_uid: int) -> str | None:
    """The one line when the cache directory does not belong to the user webproxy drops to."""
    if owner_uid == ident.uid:
        return None
    return (f"cache directory {directory} belongs to uid {owner_uid}, not to server.user {ident.user!r}; "
            f"run: chown -R {ident.user} {directory}")


def prepare_cache_dir(ident: Identity, directory: str) -> str | None:
    """Create the cache directory for `ident` if missing; the one-line problem if it is someone else's."""
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, exist_ok=True)
            os.chown(directory, ident.uid, ident.gid)
        except OSError as e:
            return (f"cache directory {directory} cannot be created ({e.strerror}); "
                    "fix its parent's permissions or set cache.directory")
    return cache_dir_problem(ident, directory, os.stat(directory).st_uid)


@contextlib.contextmanager
def acting_as(ident: Identity | None) -> Iterator[None]:
    """Create files as `ident` (the cache's SQLite and lock files) while still able to go back to
    root for what follows (privileged listeners)."""
    if ident is None or os.geteuid() != 0:
        yield
        return
    os.setegid(ident.gid)
    os.seteuid(ident.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def preload_modules() -> None:
    """Import every module the proxy may import lazily, while the files are still readable: after
    the drop the interpreter's own directory may not be (a Python under /root, say)."""
    import importlib
    import pkgutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("webproxy", "cache", "tunnel"):  # by name: walked on disk, not imported here
        for info in pkgutil.iter_modules([os.path.join(root, package)], package + "."):
            if info.name not in ("webproxy.__main__",):
                importlib.import_module(info.name)
    for name in ("prometheus_client", "prometheus_client.multiprocess", "prometheus_client.exposition",
                 "prometheus_client.core", "json", "traceback", "shutil"):
        importlib.import_module(name)


def drop_privileges(ident: Identity | None) -> None:
    """Become `ident` for good (real, effective and saved ids; supplementary groups reset)."""
    if ident is None or os.geteuid() != 0:
        return
    os.setgroups([])
    os.setgid(ident.gid)
    os.setuid(ident.uid)


# ---- pid file ---------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_pid_file(path: str, pid: int) -> None:
    """Write `pid` to `path`; ConfigError when another live process holds it or it cannot be written."""
    try:
        with open(path, encoding="ascii") as f:
            old = int(f.read().strip() or 0)
    except (OSError, ValueError):
        old = 0
    if old and old != pid and _alive(old):
        raise ConfigError(f"server.pid_file {path} names process {old}, which is running: is webproxy "
                          "already running? stop it or choose another server.pid_file")
    tmp = f"{path}.{pid}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"server.pid_file: cannot write {path}: {e.strerror}; create its directory, "
                          "make it writable or change server.pid_file") from None


def check_pid_file(path: str) -> None:
    """For `run --check`: the pid file's directory must exist and be writable."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"server.pid_file: cannot write {path}: the directory {parent} does not exist or "
                          "is not writable; create it or change server.pid_file")


def remove_pid_file(path: str, pid: int) -> None:
    """Remove the pid file if it is still ours (a dropped-privilege process may not be able to)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="ascii") as f:
            if int(f.read().strip()) != pid:
                return
        os.unlink(path)
