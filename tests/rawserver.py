"""A raw-socket origin for tests: an asyncio server in its own thread that writes exactly the
bytes a test scripts, so malformed and unusual responses (which no real server library would
produce) can be sent to the proxy or to the upstream client.

`respond(request, n)` gets each request (head and body bytes) and its index on the connection,
and returns what to do: bytes to write, a list of bytes and float pauses (seconds), or None to
close the connection without answering. The connection stays open for the next request unless
`close_after` says otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from tests.support import LoopThread

Script = bytes | list[bytes | float] | None


class RawOrigin(LoopThread):
    def __init__(self, respond: Callable[[bytes, int], Script], close_after: bool = False) -> None:
        self.respond = respond
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lower = head.lower()
        body = b""
        if b"\r\ncontent-length:" in lower:
            n = int(lower.split(b"\r\ncontent-length:", 1)[1].split(b"\r\n", 1)[0])
            body = await reader.readexactly(n)
        elif b"\r\ntransfer-encoding: chunked" in lower:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body += size_line + await reader.readexactly(size + 2)
                if size == 0:
                    break
        return head + body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                self.requests.append(request)
                script = self.respond(request, n)
                n += 1
                if script is None:
                    break
                for item in [script] if isinstance(script, bytes) else script:
                    if isinstance(item, float | int):
                        await writer.drain()
                        await asyncio.sleep(item)
                    else:
                        writer.write(item)
                await writer.drain()
                if self.close_after:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _setup(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cleanup(self) -> None:
        assert self._server is not None
        self._server.close()
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def __enter__(self) -> RawOrigin:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def response(status: int = 200, body: bytes = b"", *headers: str, reason: str = "OK") -> bytes:
    """A well-formed response with Content-Length, for scripts."""
    lines = [f"HTTP/1.1 {status} {reason}", *headers, f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
