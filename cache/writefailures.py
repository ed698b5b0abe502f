"""Failures to store (a full disk, a cache directory turned read-only) and what the operator is told.

A failed write never reaches a client: the fill is abandoned (cache.fill), its file removed, and the
client's response goes on from the origin. Storing is simply tried again by the next fill, so it
resumes by itself when space returns. This module only counts the failures and words them: at most
one line per `every` seconds, with the latest reason and how many responses were not stored, and one
line when storing works again. Pure: the caller gives the time and writes the line.
"""

from __future__ import annotations

REPORT_EVERY = 60.0


def describe(error: BaseException) -> str:
    """The reason in the operator's words: the OS's or SQLite's message, never a traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f" ({error.filename})" if error.filename else "")
    return str(error) or type(error).__name__


class WriteFailures:
    def __init__(self, every: float = REPORT_EVERY) -> None:
        self.every = every
        self.unreported = 0  # failed writes since the last line
        self.reason = ""
        self.failing = False  # the latest write failed
        self._reported_at: float | None = None  # when the last "cannot store" line was given
        self._said_failing = False  # the last line said "cannot store": say "storing again" once

    def failed(self, what: str, error: BaseException) -> None:
        """A write failed while `what` (e.g. "writing a body")."""
        self.unreported += 1
        self.reason = f"{what}: {describe(error)}"
        self.failing = True

    def stored(self) -> None:
        """A response was stored."""
        self.failing = False

    def report(self, now: float) -> str | None:
        """The line to log now, if any (`now`: a monotonic clock in seconds). Flapping between
        failing and storing gives at most one line of each kind per `every` seconds."""
        if self.unreported and (self._reported_at is None or now - self._reported_at >= self.every):
            n, self.unreported = self.unreported, 0
            self._reported_at = now
            self._said_failing = True
            return (f"cache: cannot store ({self.reason}); {n} failed write(s) since the last message; "
                    f"clients get their responses from the origin in full, and storing is tried again "
                    f"with every response (this message: at most once per {self.every:g}s)")
        if not self.failing and self._said_failing:
            self._said_failing = False
            n, self.unreported = self.unreported, 0
            more = f" ({n} more failed write(s) since the last message)" if n else ""
            return "cache: storing again" + more
        return None
