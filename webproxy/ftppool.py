"""FTP control sessions (aioftp) and the pool that reuses them.

A session is one logged-in control connection. The pool keeps idle sessions per
(host, port, user, password) for `idle_timeout` seconds and caps live sessions (busy + idle) per
server at `max_sessions_per_server`; extra requests queue. The password is part of the key so a
request with a wrong password never rides on a session someone else logged in with.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aioftp

from webproxy.ftpreply import BadReply, ReplyReader, epsv_port, pasv_port

# Commands and replies are UTF-8 (RFC 2640), but old servers speak Latin-1 or worse. aioftp
# encodes and decodes with `encoding` in strict mode; this codec is UTF-8 with surrogateescape, so
# any byte sequence survives name -> str -> command unchanged (URLs are decoded the same way).
CODEC = "webproxy_ftp_utf8"


def _codec_search(name: str) -> codecs.CodecInfo | None:
    if name != CODEC:
        return None
    return codecs.CodecInfo(
        name=CODEC,
        encode=lambda s, errors="strict": codecs.utf_8_encode(s, "surrogateescape"),
        decode=lambda b, errors="strict": codecs.utf_8_decode(b, "surrogateescape", True),
    )


codecs.register(_codec_search)

DATA_LIMIT = 256 * 1024  # stream buffer of a data connection: it pauses reading at twice this
Key = tuple[str, int, str, str]


class _BoundedClient(aioftp.Client):
    """aioftp's client with every reply judged by ftpreply.ReplyReader: bounded in size, and read
    whole within `reply_timeout` (aioftp bounds each line only, so a server sending one
    continuation line a second could hold a request for ever)."""

    reply_timeout: float | None = None

    async def parse_response(self) -> tuple[aioftp.Code, list[str]]:
        reader = ReplyReader()
        loop = asyncio.get_running_loop()
        deadline = None if self.reply_timeout is None else loop.time() + self.reply_timeout
        while True:
            # The deadline is checked here as well as enforced below: it must hold even if a
            # cancellation racing a line's arrival were absorbed on the way.
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError("the FTP server's reply did not end in time")
            try:
                async with asyncio.timeout(left):
                    raw = await self.stream.reader.readline()  # not aioftp's per-line wait_for
            except ValueError:  # asyncio's line limit (64 KiB) overrun
                raise BadReply("a reply line longer than 64 KiB") from None
            if not raw:
                self.stream.close()
                raise ConnectionResetError("the FTP server closed the control connection")
            done = reader.feed(raw.decode(self.encoding))
            if done is not None:
                return aioftp.Code(done[0]), done[1]


class PoolClosed(Exception):
    """The pool was closed (the proxy is shutting down)."""


class FtpSession:
    """One logged-in control connection, with what we learned about the server on it."""

    def __init__(self, client: aioftp.Client, key: Key, timeout: float | None) -> None:
        self.client = client
        self.key = key
        self.timeout = timeout
        self.home = "/"
        self.type: str | None = None  # the TYPE last set, to skip repeating it
        # aioftp tries EPSV then PASV on every transfer; once EPSV is refused we go straight to PASV.
        self.passive: tuple[str, ...] = ("epsv", "pasv")
        self.mlsd = True  # cleared when the server refuses MLSD, so later listings go straight to LIST
        self.reused = False
        self.idle_since = 0.0
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> str:
        return self.client.stream.writer.get_extra_info("peername")[0]

    @property
    def alive(self) -> bool:
        try:
            stream = self.client.stream
        except ConnectionError:
            return False
        return not stream.writer.is_closing() and not stream.reader.at_eof()

    async def command(
        self, line: str | None, expected: str = "xxx", wait: str | tuple[str, ...] = ()
    ) -> tuple[str, list[str]]:
        """Send `line` (or only read a reply when None); raises aioftp.StatusCodeError when the
        final reply does not match `expected`. Returns (code, lines). A 421 reply always means
        the server is closing the control connection (RFC 959), so it raises ConnectionResetError
        whatever was expected: callers treat it as a lost session, not as an answer."""
        try:
            code, lines = await self.client.command(line, expected, wait)
        except aioftp.StatusCodeError as e:
            if e.received_codes[-1] == "421":
                raise ConnectionResetError(f"421 {' '.join(map(str, e.info))}".strip()) from None
            raise
        if code == "421":
            raise ConnectionResetError(f"421 {' '.join(lines)}".strip())
        return code, lines

    async def set_type(self, conn_type: str) -> None:
        if self.type != conn_type:
            await self.command("TYPE " + conn_type, "200")
            self.type = conn_type

    async def open_data(self, conn_type: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A passive data connection. The port comes from EPSV, else PASV; the address is always
        the control connection's peer, never the one PASV names: that address is often wrong
        behind NAT, and trusting it would let a hostile server aim the proxy at other hosts."""
        await self.set_type(conn_type)
        for name in self.passive:
            try:
                if name == "epsv":
                    _, lines = await self.command("EPSV", "229")
                    port = epsv_port(lines[-1])
                else:
                    _, lines = await self.command("PASV", "227")
                    port = pasv_port(lines[-1])
                break
            except aioftp.StatusCodeError as e:
                if name == "epsv" and e.received_codes[-1].matches("50x") and "pasv" in self.passive:
                    self.passive = ("pasv",)
                    continue
                raise
        async with asyncio.timeout(self.timeout):
            return await asyncio.open_connection(self.peer, port, limit=DATA_LIMIT)

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.client.close()

    async def quit(self) -> None:
        """Say goodbye politely, but never wait long for a server that does not answer."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.command("QUIT", "2xx")
        self.close()


class _Server:
    """Sessions of one (host, port): the cap counts every live session, busy or idle."""

    def __init__(self) -> None:
        self.live = 0
        self.idle: dict[Key, list[FtpSession]] = {}
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def wake_one(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def oldest_idle(self) -> FtpSession | None:
        sessions = [s for lst in self.idle.values() for s in lst]
        return min(sessions, key=lambda s: s.idle_since) if sessions else None

    def remove_idle(self, session: FtpSession) -> bool:
        lst = self.idle.get(session.key, [])
        if session in lst:
            lst.remove(session)
            if not lst:
                del self.idle[session.key]
            return True
        return False


Resolver = Callable[[str, int], Awaitable[str]]


class FtpPool:
    """Construct from the `ftp` config section: `FtpPool(cfg.ftp)` (missing keys take defaults).

    `resolve(host, port) -> address`, when given, replaces the event loop's getaddrinfo for control
    connections (to share the proxy's DNS resolver and cache); it raises OSError when the name does
    not resolve. Data connections go to the control connection's peer address, so are not resolved.
    A request waiting for a session slot waits as long as it takes (downloads can be long);
    cancelling the request's task is what ends the wait.
    """

    def __init__(self, config: Mapping[str, Any] | None = None, *, resolve: Resolver | None = None) -> None:
        config = dict(config or {})
        self.anonymous_user: str = config.get("anonymous_user", "anonymous")
        self.anonymous_password: str = config.get("anonymous_password", "webproxy@")
        self.idle_timeout: float = float(config.get("idle_timeout", 30.0))
        self.max_sessions: int = max(1, int(config.get("max_sessions_per_server", 4)))
        timeout = float(config.get("timeout", 30.0))
        self.timeout: float | None = timeout or None  # 0 means "no timeout"
        self._resolve = resolve
        self._servers: dict[tuple[str, int], _Server] = {}
        self._closed = False
        self.logins = 0  # sessions opened, for stats and tests

    async def acquire(self, host: str, port: int, user: str, password: str) -> FtpSession:
        """A logged-in session, reused when one is idle. Raises what connecting or logging in
        raised: OSError, TimeoutError, aioftp.StatusCodeError (login refused), BadReply, PoolClosed."""
        key = (host, port, user, password)
        while True:
            if self._closed:
                raise PoolClosed("the FTP pool is closed")
            # Looked up afresh after every wait: an unused record may have been dropped meanwhile.
            server = self._servers.setdefault((host, port), _Server())
            idle = server.idle.get(key)
            while idle:
                session = idle.pop()  # the most recently used: least likely to have timed out
                if not idle:
                    del server.idle[key]
                if session._expiry is not None:
                    session._expiry.cancel()
                    session._expiry = None
                if session.alive:
                    session.reused = True
                    return session
                session.close()
                server.live -= 1
                idle = server.idle.get(key)
            if server.live < self.max_sessions:
                server.live += 1
                try:
                    return await self._login(key)
                except BaseException:
                    server.live -= 1
                    server.wake_one()
                    self._forget_if_unused(host, port)
                    raise
            victim = server.oldest_idle()
            if victim is not None:  # at the cap, but an idle session of another user can make room
                server.remove_idle(victim)
                server.live -= 1
                victim.close()
                continue
            fut = asyncio.get_running_loop().create_future()
            server.waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    server.wake_one()  # cancelled after being woken: pass the wake-up on
                else:
                    with contextlib.suppress(ValueError):
                        server.waiters.remove(fut)
                raise

    async def _login(self, key: Key) -> FtpSession:
        host, port, user, password = key
        client = _BoundedClient(
            socket_timeout=self.timeout, connection_timeout=self.timeout, encoding=CODEC
        )
        client.reply_timeout = self.timeout
        session = FtpSession(client, key, self.timeout)
        try:
            address = await self._resolve(host, port) if self._resolve else host
            await client.connect(address, port)
            await client.login(user, password)
            self.logins += 1
            with contextlib.suppress(aioftp.StatusCodeError):
                session.home = str(await client.get_current_directory()) or "/"
            if any(c in session.home for c in "\r\n\0"):  # it prefixes every path we send
                raise BadReply("a PWD reply naming a directory with control characters")
        except BaseException:
            client.close()
            raise
        return session

    def release(self, session: FtpSession, reusable: bool) -> None:
        """Give a session back: kept idle when `reusable` (the last exchange ended cleanly and
        the control connection is in a known state), closed otherwise."""
        server = self._servers[session.key[:2]]
        if reusable and not self._closed and self.idle_timeout > 0 and session.alive:
            loop = asyncio.get_running_loop()
            session.idle_since = loop.time()
            server.idle.setdefault(session.key, []).append(session)
            session._expiry = loop.call_later(self.idle_timeout, self._expire, session)
        else:
            session.close()
            server.live -= 1
        server.wake_one()
        self._forget_if_unused(*session.key[:2])

    def _expire(self, session: FtpSession) -> None:
        session._expiry = None
        server = self._servers.get(session.key[:2])
        if server is not None and server.remove_idle(session):
            server.live -= 1
            session.close()
            server.wake_one()
            self._forget_if_unused(*session.key[:2])

    def _forget_if_unused(self, host: str, port: int) -> None:
        """Drop a server's record once nothing refers to it, so many hosts do not pile up."""
        server = self._servers.get((host, port))
        if server is not None and server.live == 0 and not server.waiters:
            del self._servers[(host, port)]

    def stats(self) -> dict[str, dict[str, int]]:
        """Per "host:port": live sessions, idle ones, requests waiting for a slot."""
        return {
            f"{host}:{port}": {
                "live": s.live,
                "idle": sum(len(v) for v in s.idle.values()),
                "waiting": sum(1 for f in s.waiters if not f.done()),
            }
            for (host, port), s in self._servers.items()
        }

    async def close(self) -> None:
        """Shut down: QUIT idle sessions; busy ones are closed when their request releases them;
        queued requests fail with PoolClosed."""
        self._closed = True
        idle = []
        for server in self._servers.values():
            for lst in server.idle.values():
                idle.extend(lst)
            server.live -= sum(len(lst) for lst in server.idle.values())
            server.idle.clear()
            while server.waiters:
                fut = server.waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
        for s in idle:
            if s._expiry is not None:
                s._expiry.cancel()
        await asyncio.gather(*(s.quit() for s in idle))
