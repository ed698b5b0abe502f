"""The error log (`log.error_log`: a file or stderr) and the summarising of upstream failures, so a
browser's background traffic to a dead host writes one line a minute, not one per request."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from webproxy.logfiles import open_log

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class ErrorLog:
    def __init__(self, target: str, level: str = "info") -> None:
        """Raises ConfigError (one line) when `target` cannot be opened."""
        self.target = target
        self.level = level
        self._file: TextIO | None = open_log("error_log", target)

    def write(self, message: str, level: str = "error") -> None:
        if LEVELS[level] < LEVELS[self.level] or self._file is None:
            return
        try:
            self._file.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} webproxy: {message}\n")
            self._file.flush()
        except OSError as e:  # a full disk must not take the proxy down; say so where someone looks
            print(f"webproxy: cannot write error log {self.target}: {e.strerror}", file=sys.stderr)

    def reopen(self, target: str, level: str) -> None:
        """Switch to `target` (SIGHUP, logrotate); on failure (ConfigError) the old file stays."""
        self.use(target, level, open_log("error_log", target))

    def use(self, target: str, level: str, file: TextIO | None) -> None:
        """Write to `file` (already opened for `target`) from now on; the old file is closed."""
        self.close()
        self.target, self.level, self._file = target, level, file

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None


@dataclass
class _Minute:
    minute: int
    more: int = 0  # failures after the first one, not yet written
    last: str = ""


class FailureSummary:
    """Per host and clock minute: the first upstream failure is written whole, later ones are
    counted and written as one summary line once the minute is over. Pure: give it the time."""

    def __init__(self) -> None:
        self._hosts: dict[str, _Minute] = {}

    def record(self, host: str, now: float, line: str) -> list[str]:
        """Lines to write now for a failure described by `line`."""
        minute = int(now // 60)
        out = self.due(now)
        seen = self._hosts.get(host)
        if seen is None:
            self._hosts[host] = _Minute(minute)
            out.append(line)
        else:
            seen.more += 1
            seen.last = line
        return out

    def due(self, now: float) -> list[str]:
        """Summary lines for minutes that are over (call about once a second)."""
        minute = int(now // 60)
        out = []
        for host in [h for h, m in self._hosts.items() if m.minute < minute]:
            m = self._hosts.pop(host)
            if m.more:
                at = time.strftime("%H:%M", time.localtime(m.minute * 60))
                out.append(f"upstream: {m.more} more failure(s) for {host} in the minute from {at} "
                           f"(last: {m.last})")
        return out
