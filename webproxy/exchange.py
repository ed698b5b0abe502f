"""One request's answer, whatever handled it: the access-log fields it fills in (`Exchange`), and the
ways every handler ends an answer (`Answers`): a short error, an upstream failure, or an origin
response relayed to the client (and, when given, into a cache fill).
"""

from __future__ import annotations

from typing import Protocol

from webproxy import __version__, logcodes
from webproxy.context import Env
from webproxy.errors import ClientGone, OriginError, Reject, UpstreamError
from webproxy.frontend import Request, ResponseWriter
from webproxy.httpmsg import Headers
from webproxy.origin import OriginResponse


class Exchange:
    """The access-log fields of one request, filled in as it is handled."""

    __slots__ = ("code", "status", "hierarchy", "ctype", "url", "user")

    def __init__(self, url: str) -> None:
        self.code = logcodes.NONE
        self.status = 0
        self.hierarchy = logcodes.HIER_NONE
        self.ctype: str | None = None
        self.url = url
        self.user = "-"  # the authenticated user, as the access log writes it


class Sink(Protocol):
    """Where a relayed body is copied as well (a cache fill). It may fail: the client's response
    never depends on it (see `Answers.relay`)."""

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> bool: ...

    def abort(self) -> None: ...


class Answers:
    def __init__(self, env: Env) -> None:
        self.env = env
        self._via: dict[tuple[str, str], tuple[str, str]] = {}

    def via(self, version: str) -> tuple[str, str]:
        """Our Via entry (RFC 9110 7.6.3), built once per protocol version and proxy name."""
        name = self.env.cfg.server["name"]
        cached = self._via.get((version, name))
        if cached is None:
            cached = self._via[(version, name)] = ("Via", f"{version} {name} (webproxy/{__version__})")
        return cached

    def error(self, rw: ResponseWriter, ex: Exchange, status: int, message: str, close: bool = False,
              extra: Headers | None = None) -> bool:
        """A short plain-text answer; returns whether the connection may serve another request.
        Once a head is out nothing can be answered: the connection is cut instead."""
        ex.status = status
        ex.ctype = "text/plain"
        if rw.conn.response_started or rw.conn.closed:
            rw.conn.abort()
            return False
        return rw.simple(status, message, extra=extra, close=close)

    def deny(self, rw: ResponseWriter, ex: Exchange, status: int, message: str, close: bool = False) -> bool:
        ex.code = logcodes.DENIED
        return self.error(rw, ex, status, message, close=close)

    def upstream_error(self, req: Request, rw: ResponseWriter, ex: Exchange, e: UpstreamError) -> bool:
        """The origin could not be asked. A request body that failed on the client's side is the
        real cause and is answered as such."""
        if req.body is not None and isinstance(req.body.error, Reject):
            r = req.body.error
            return self.error(rw, ex, r.status, r.message, close=True)
        if req.body is not None and isinstance(req.body.error, ClientGone):
            raise req.body.error
        self.env.upstream_failure(req.method, req.target, e.status, e.message)
        return self.error(rw, ex, e.status, e.message)

    async def relay(self, req: Request, rw: ResponseWriter, ex: Exchange, resp: OriginResponse,
                    sink: Sink | None = None, extra: Headers | None = None) -> bool:
        """Stream an origin response to the client (and to `sink` when given: write(chunk) for every
        chunk, then commit() after a complete body, or abort()). A sink that fails is dropped and
        the client's response goes on to its last byte: storing is never worth a cut download."""
        ex.status = resp.status
        ex.ctype = resp.header("content-type")
        headers = [*resp.headers, self.via(resp.version), *(extra or [])]
        clean = False
        try:
            rw.start(resp.status, resp.reason, headers, resp.length)
            if not rw.no_body:
                received = 0
                async for chunk in resp.chunks():
                    if sink is not None:
                        received += len(chunk)
                        # Publish before the client has the last byte: its next request (maybe to
                        # another worker process) must find the entry.
                        sink = self._feed(req, sink, chunk, commit=received == resp.length)
                    await rw.send(chunk)
            clean = True
            if sink is not None:
                sink = self._feed(req, sink, None, commit=True)
            return rw.end()
        except OriginError as e:
            # The head is out: the only honest signal left is to cut the connection, so the client
            # sees a truncated body instead of a complete-looking wrong one.
            self.env.log_error(f"origin failed mid-body for {req.target[:200]}: {e}")
            ex.code = logcodes.aborted(ex.code)
            rw.conn.abort()
            return False
        finally:
            if sink is not None:
                self._drop(req, sink, None)
            await resp.close(clean)

    def _feed(self, req: Request, sink: Sink, chunk: bytes | None, commit: bool) -> Sink | None:
        """Copy `chunk` into `sink` (and commit it when `commit`); the sink while it is still
        wanted, None once committed or failed. A cache fill handles its own write errors (a full
        disk); anything else it raises is logged once, in one line, and the fill abandoned."""
        try:
            if chunk is not None:
                sink.write(chunk)
            if commit:
                sink.commit()
                return None
            return sink
        except Exception as e:
            self._drop(req, sink, e)
            return None

    def _drop(self, req: Request, sink: Sink, error: Exception | None) -> None:
        if error is not None:
            self.env.log_error(f"cache: not storing {req.target[:200]}: {error!r}")
        try:
            sink.abort()
        except Exception as e:
            self.env.log_error(f"cache: abandoning the copy of {req.target[:200]} failed: {e!r}")
