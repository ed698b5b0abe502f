"""The access log in Squid's native format, so existing Squid log tools read it:

    time.ms elapsed client code/status bytes method URL user hierarchy/peer type

Lines are buffered and flushed about once a second (and at shutdown): a write() per request to
a file would cost more than serving a cache hit.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from webproxy.logfiles import open_log


class AccessLog:
    def __init__(self, target: str) -> None:
        """`target`: a path, "-" for stderr, "" for none. Raises ConfigError (one line) when the
        path cannot be opened."""
        self.target = target
        self._buf: list[str] = []
        self._last_flush = time.monotonic()
        self._file: TextIO | None = open_log("access_log", target)

    def reopen(self, target: str) -> None:
        """Switch to `target` (SIGHUP, logrotate). The new file is opened first: when that fails
        (ConfigError), the old one stays open and in use."""
        self.use(target, open_log("access_log", target))

    def use(self, target: str, file: TextIO | None) -> None:
        """Write to `file` (already opened for `target`) from now on; the old file is closed."""
        self.close()
        self.target = target
        self._file = file

    def log(
        self,
        start: float,
        client: str,
        code: str,
        status: int,
        nbytes: int,
        method: str,
        url: str,
        hierarchy: str = "HIER_NONE/-",
        ctype: str | None = None,
        user: str = "-",
    ) -> None:
        if self._file is None:
            return
        # Squid logs the bare media type: parameters would add a space and break field splitting.
        ctype = ctype.split(";", 1)[0].strip() if ctype else ""
        now = time.time()
        elapsed = int((now - start) * 1000)
        self._buf.append(
            f"{start:.3f} {elapsed:6d} {client} {code}/{status:03d} {nbytes} {method} {url} "
            f"{user} {hierarchy} {ctype or '-'}\n"
        )
        if len(self._buf) >= 512 or time.monotonic() - self._last_flush > 1.0:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._file is None or not self._buf:
            self._buf.clear()
            return
        try:
            self._file.write("".join(self._buf))
            self._file.flush()
        except OSError as e:
            print(f"webproxy: cannot write access log {self.target}: {e.strerror}", file=sys.stderr)
        self._buf.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()
        self._file = None
