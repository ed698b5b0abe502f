"""Filling an entry while its body streams to the client (see cache.store for publishing)."""

from __future__ import annotations

import os
from typing import Protocol

from cache.collapse import Flights
from cache.model import StoredResponse
from cache.storable import expected_length
from cache.writefailures import WriteFailures

INLINE_MAX = 32 * 1024  # diskcache's own threshold for keeping values in SQLite


def process_tag(pid: int) -> str | None:
    """pid-starttime of a running process (so a reused pid is not mistaken for the old one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f"{pid}-{int(f.read().rsplit(b')', 1)[1].split()[19])}"
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return f"{pid}-0"


class FillTarget(Protocol):
    """Where a fill publishes (cache.store.Store): its size limit, temp files, the atomic publish
    step, the collapsed-forwarding flights a commit or abort ends, and where write failures are
    counted."""

    max_object_size: int
    flights: Flights
    write_failures: WriteFailures

    def tmp_path(self) -> str: ...

    def discard(self, path: str) -> None: ...

    def publish(self, url_key: str, stored: StoredResponse, body: bytes | None, tmp: str | None) -> bool: ...


class Fill:
    """A response body being stored while it is served. write() many times, then commit() when
    the upstream body ended normally, or abort(). Nothing is visible before commit; commit
    publishes only a body whose length matches Content-Length (when given). Usable as a context
    manager: leaving the block without commit aborts.

    A write error (a full disk, a read-only directory) never leaves this class: the fill is
    abandoned on the spot (its file removed, waiters released) and the failure counted in the
    store's `write_failures`; the caller goes on relaying to its client as if nothing happened."""

    def __init__(self, store: FillTarget, url_key: str, stored: StoredResponse) -> None:
        self.store = store
        self.url_key = url_key
        self.stored = stored
        self.flight = store.flights.get(url_key)  # the leader's flight, ended by commit or abort
        self.expected = expected_length(stored.headers)
        self.received = 0
        self.state = "open"
        self._buf = bytearray()
        self._file = None
        self._tmp: str | None = None
        if self.expected is not None and self.expected > store.max_object_size:
            self.abort()

    @property
    def active(self) -> bool:
        return self.state == "open"

    def write(self, chunk: bytes) -> None:
        if self.state != "open":
            return
        self.received += len(chunk)
        if self.received > self.store.max_object_size or (self.expected is not None and self.received > self.expected):
            self.abort()
            return
        try:
            if self._file is not None:
                self._file.write(chunk)
                return
            self._buf += chunk
            if len(self._buf) >= INLINE_MAX:
                self._tmp = self.store.tmp_path()
                self._file = open(self._tmp, "wb")
                self._file.write(self._buf)
                self._buf = bytearray()
        except OSError as e:
            self.store.write_failures.failed("writing a body", e)
            self.abort()

    def commit(self) -> bool:
        """Publish the entry; False (and nothing stored) when the body is incomplete or the store
        refused it."""
        if self.state != "open":
            return False
        ok = False
        try:
            if self.expected is None or self.received == self.expected:
                if self._file is not None:
                    self._file.close()
                    self._file = None
                stored = self.stored.with_(body_size=self.received)
                body = bytes(self._buf) if self._tmp is None else None
                ok = self.store.publish(self.url_key, stored, body, self._tmp)
        except OSError as e:  # the buffered end of the body could not be written
            self.store.write_failures.failed("writing a body", e)
        finally:
            self.state = "committed" if ok else "aborted"
            if not ok:
                self._discard()
            self.store.flights.finish(self.url_key, ok, self.flight)
        return ok

    def abort(self) -> None:
        if self.state != "open":
            return
        self.state = "aborted"
        self._discard()
        self.store.flights.finish(self.url_key, False, self.flight)

    def release_waiters(self) -> None:
        """Let the requests waiting for this fill go to the origin themselves (the client it
        streams to stopped reading); the fill itself goes on, at that client's pace."""
        self.store.flights.finish(self.url_key, False, self.flight)

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # its buffered bytes could not be written: the file goes anyway
            self._file = None
        if self._tmp is not None:
            self.store.discard(self._tmp)
            self._tmp = None
        self._buf = bytearray()

    def __enter__(self) -> Fill:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
