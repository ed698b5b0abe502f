"""Opening the log files named in [log]: one place that turns a path that cannot be written into
one line naming the key, the problem and the fix. Used at start, by `run --check` and on SIGHUP
(where a failure keeps the file already open)."""

from __future__ import annotations

import errno
import os
import sys
from typing import TextIO

from webproxy.config import Config, ConfigError

LOG_KEYS = ("access_log", "error_log")


def problem(key: str, path: str, e: OSError) -> str:
    """The one line for a log path that cannot be opened for appending."""
    where = f"log.{key}: cannot open {path}"
    parent = os.path.dirname(os.path.abspath(path))
    if e.errno == errno.ENOENT:
        return f"{where}: the directory {parent} does not exist; create it or change log.{key}"
    if e.errno == errno.EISDIR:
        return f"{where}: it is a directory; give a file path in log.{key}"
    if e.errno == errno.EROFS:
        return f"{where}: the file system is read-only; choose a writable path in log.{key}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; make it writable for webproxy's user or change log.{key}"
    return f"{where}: {e.strerror or e}; change log.{key}"


def open_log(key: str, target: str) -> TextIO | None:
    """"-" is stderr, "" is no log, anything else a file opened for appending.
    Raises ConfigError with the one line for the user."""
    if target == "-":
        return sys.stderr
    if not target:
        return None
    try:
        return open(target, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
    except OSError as e:
        raise ConfigError(problem(key, target, e)) from None


def check(cfg: Config) -> None:
    """Raise ConfigError for the first log path in `cfg` that cannot be opened (run --check);
    opening for appending creates a missing file, as starting would."""
    for key in LOG_KEYS:
        f = open_log(key, cfg.log[key])
        if f is not None and f is not sys.stderr:
            f.close()
