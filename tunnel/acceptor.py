"""Accept connections from a listening socket with a reader callback, pausable for backpressure.

One readable callback accepts a burst of connections, which costs far less per connection than an
awaited sock_accept() each time. Pausing simply stops accepting: new clients wait in the kernel's
listen backlog until `resume()`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

_BURST = 64
log = logging.getLogger("tunnel")


class Acceptor:
    def __init__(self, lsock: socket.socket,
                 on_accept: Callable[[socket.socket, tuple], None]) -> None:
        self.lsock = lsock
        self.on_accept = on_accept
        self.loop = asyncio.get_running_loop()
        self.fd = lsock.fileno()
        self.paused = True
        self.closed = False
        lsock.setblocking(False)

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.loop.add_reader(self.fd, self._on_readable)
            self.paused = False

    def pause(self) -> None:
        if not self.paused:
            self.loop.remove_reader(self.fd)
            self.paused = True

    def close(self) -> None:
        if not self.closed:
            self.pause()
            self.closed = True
            self.lsock.close()

    def _on_readable(self) -> None:
        for _ in range(_BURST):
            if self.paused:
                return
            try:
                sock, addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                # Out of file descriptors or similar: stop for a moment instead of spinning.
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept: %s; pausing accepts for 0.1s", e.strerror)
                    self.pause()
                    self.loop.call_later(0.1, self.resume)
                return
            sock.setblocking(False)
            self.on_accept(sock, addr)
