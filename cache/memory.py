"""The in-process memory tier of the store."""

from __future__ import annotations

from collections import OrderedDict

_MEM_OVERHEAD = 512  # rough per-entry cost of a memory-tier record beyond its body


class MemoryTier:
    """Small hot objects, the heads of large ones, and Vary index rows, in an LRU dict bounded
    in bytes."""

    def __init__(self, capacity: int, max_object: int) -> None:
        self.capacity = capacity
        self.max_object = max_object
        self.bytes = 0
        self._d: OrderedDict[str, tuple[tuple, int]] = OrderedDict()

    def get(self, key: str) -> tuple | None:
        v = self._d.get(key)
        if v is None:
            return None
        self._d.move_to_end(key)
        return v[0]

    def put(self, key: str, record: tuple, size: int) -> None:
        self.pop(key)
        if size > self.max_object or size + _MEM_OVERHEAD > self.capacity:
            return
        size += _MEM_OVERHEAD
        self._d[key] = (record, size)
        self.bytes += size
        while self.bytes > self.capacity:
            _, (_, s) = self._d.popitem(last=False)
            self.bytes -= s

    def pop(self, key: str) -> None:
        v = self._d.pop(key, None)
        if v is not None:
            self.bytes -= v[1]

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)
