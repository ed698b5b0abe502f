"""How the store lays a stored response into diskcache rows (see cache.store).

A row's `mode` column says what it holds; its `value` is the pickled head (field tuple, not the
class, so the format does not depend on the dataclass), and for large bodies `filename` is the
body file, managed (and removed) by diskcache.
"""

from __future__ import annotations

import pickle
import sqlite3
from dataclasses import dataclass
from typing import Any

import diskcache
from diskcache.core import UNKNOWN

from cache.model import StoredResponse

MODE_INLINE = 11  # value = pickle((head, body))
MODE_FILE = 12  # value = pickle(head), filename = body
MODE_INDEX = 13  # value = pickle(vary field names)


def dump_head(s: StoredResponse) -> tuple:
    return (s.status, s.reason, s.headers, s.request_time, s.response_time, s.vary, s.body_size)


def load_head(t: tuple) -> StoredResponse:
    status, reason, headers, request_time, response_time, vary_pairs, body_size = t
    return StoredResponse(status, reason, headers, request_time, response_time, tuple(vary_pairs), body_size)


@dataclass
class Row:
    mode: int
    blob: bytes
    filename: str | None
    size: int


@dataclass(frozen=True)
class VaryIndex:
    names: tuple[str, ...]


class EntryDisk(diskcache.Disk):
    """diskcache's Disk taught our row kinds: a body already written to its file is adopted
    without a copy; fetch returns the head and the body (or the body's file name) unopened."""

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple:
        if isinstance(value, Row):
            return value.size, value.mode, value.filename, sqlite3.Binary(value.blob)
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == MODE_FILE:
            return (pickle.loads(value), None, filename)
        if mode == MODE_INLINE:
            head, body = pickle.loads(value)
            return (head, body, None)
        if mode == MODE_INDEX:
            return VaryIndex(tuple(pickle.loads(value)))
        return super().fetch(mode, filename, value, read)
