"""The purge generation of a cache directory, shared by every process that uses it.

Every process keeps hot entries in its own memory tier (cache.memory), which another process's
purge cannot reach. A purge therefore bumps this counter after its rows are gone, and every
lookup compares it with the value the process saw last: a change empties the memory tier, so the
first request after a purge returns is a miss, in every process. The counter is eight bytes of a
small file mapped into every process (MAP_SHARED: one page of the page cache), so the check on
each lookup is a memory read, not a system call or a SQLite query.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

FILENAME = "generation"
_FORMAT = "<Q"
_SIZE = struct.calcsize(_FORMAT)


class Generation:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, FILENAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < _SIZE:
                fcntl.flock(fd, fcntl.LOCK_EX)  # two processes creating it at once: one extends it
                try:
                    if os.fstat(fd).st_size < _SIZE:
                        os.ftruncate(fd, _SIZE)
                finally:
                    # Explicitly: the mapping keeps a duplicate of this descriptor, so closing it
                    # would not release the lock.
                    fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)  # closing the descriptor leaves the mapping in place

    def value(self) -> bytes:
        """The current generation, as an opaque token to compare (a slice: the cheapest read)."""
        return self._map[:_SIZE]

    def bump(self) -> bytes:
        """Move to the next generation, under a lock so two purges at once do not share one;
        returns its token."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            struct.pack_into(_FORMAT, self._map, 0, struct.unpack_from(_FORMAT, self._map)[0] + 1)
            return self.value()
        finally:
            os.close(fd)  # releases the lock

    def close(self) -> None:
        self._map.close()
