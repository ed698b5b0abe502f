"""What every tunnel listener needs: accept on several addresses, keep the tasks it spawned (to
cancel them at close), and count open connections in total and per client against limits."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from tunnel.acceptor import Acceptor
from tunnel.origdst import transparent_listener


def limit_refusal(active: int, active_from_client: int, max_total: int, max_per_client: int) -> str | None:
    """None when one more connection fits the limits (0 = unlimited), else why not."""
    if max_total and active >= max_total:
        return "refused-full"
    if max_per_client and active_from_client >= max_per_client:
        return "refused-per-client-limit"
    return None


class ClientCounts:
    """Open connections, in total and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_client: dict[Any, int] = {}

    def of(self, ip: Any) -> int:
        return self.per_client.get(ip, 0)

    def take(self, ip: Any) -> None:
        self.total += 1
        self.per_client[ip] = self.per_client.get(ip, 0) + 1

    def release(self, ip: Any) -> None:
        self.total -= 1
        left = self.per_client[ip] - 1
        if left:
            self.per_client[ip] = left
        else:
            del self.per_client[ip]


class ListenerSet:
    """Acceptors on several addresses feeding one `on_accept(sock, addr)`, and the tasks spawned
    for the connections; `close()` stops accepting and cancels them all."""

    def __init__(self, on_accept: Callable[[socket.socket, Any], None]) -> None:
        self.on_accept = on_accept
        self.acceptors: list[Acceptor] = []
        self.tasks: set[asyncio.Task] = set()
        self.addresses: list[tuple[str, int]] = []

    def listen(self, addrs: Sequence[tuple[str, int]], *, tproxy: bool = False, reuse_port: bool = False) -> None:
        """Bind every address or none: raises OSError with a `listen` attribute naming the address."""
        try:
            for host, port in addrs:
                try:
                    lsock = transparent_listener(host, port, tproxy=tproxy, reuse_port=reuse_port)
                except OSError as e:
                    e.listen = (host, port)
                    raise
                self.addresses.append(lsock.getsockname()[:2])
                acc = Acceptor(lsock, self.on_accept)
                self.acceptors.append(acc)
                acc.resume()
        except BaseException:
            for acc in self.acceptors:
                acc.close()
            raise

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        for acc in self.acceptors:
            acc.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
