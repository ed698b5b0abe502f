"""CONNECT host:port: access checks, open the upstream, answer 200, then hand both raw sockets to
tunnel.relay. The access-log line is written when the tunnel ends (as Squid does), with the bytes
sent to the client and the tunnel's duration.

A CONNECT to a domain in tls.intercept is not tunneled: after the same checks and the 200, the
tunnel's inside is served by `webproxy.intercept` (TLS with a minted certificate, then the same
request path as http://), and the origin is reached per request by the upstream client."""

from __future__ import annotations

import socket
from collections.abc import Callable

from tunnel.connect import DialError, Resolver, open_upstream
from tunnel.relay import relay
from webproxy import logcodes
from webproxy.acl import domain_denied
from webproxy.context import Env
from webproxy.errors import UpstreamError
from webproxy.exchange import Answers, Exchange
from webproxy.frontend import ClientConnection, Inherited, Request, ResponseWriter
from webproxy.httpmsg import BadTarget, has_via_loop, parse_authority
from webproxy.intercept import Interceptor
from webproxy.metrics import TALLY
from webproxy.parentpath import ParentPath

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
DIAL_FAILURE = {"dns": "cannot resolve {host}: {e}", "timeout": "timed out connecting to {e}"}


class ConnectHandler:
    def __init__(self, env: Env, answers: Answers, resolve: Resolver,
                 release: Callable[[ClientConnection], None], parents: ParentPath,
                 intercept: Interceptor | None = None) -> None:
        self.env = env
        self.parents = parents
        self.answers = answers
        self.resolve = resolve
        self.release = release  # the tunnel holds the client's admission slot until it ends
        self.intercept = intercept

    async def handle(self, conn: ClientConnection, req: Request, rw: ResponseWriter, ex: Exchange) -> bool:
        answers, cfg = self.answers, self.env.cfg
        try:
            host, port = parse_authority(req.target, 0)
            if port == 0:
                raise BadTarget(f"CONNECT needs host:port, got {req.target[:200]!r}")
        except BadTarget as e:
            return answers.error(rw, ex, 400, str(e), close=True)
        if port not in cfg.access["connect_ports"]:
            allowed = ", ".join(str(p) for p in cfg.access["connect_ports"]) or "none"
            return answers.deny(rw, ex, 403, f"access denied: CONNECT to port {port} is not allowed "
                                f"(allowed ports: {allowed}; see access.connect_ports)", close=True)
        why = domain_denied(host, cfg.access)
        if why:
            return answers.deny(rw, ex, 403, f"access denied: {why}", close=True)
        if has_via_loop(req.headers, cfg.server["name"]) or self.env.is_self(host, port):
            return answers.deny(rw, ex, 508, f"forwarding loop detected: CONNECT to {host}:{port} is this proxy",
                                close=True)
        ex.code = logcodes.TUNNEL
        if self.intercept is not None and self.intercept.wants(host):
            return await self._intercepted(conn, rw, ex, host, port)
        try:  # through a parent proxy's CONNECT when the parent plan says so (webproxy.parents)
            through = await self.parents.tunnel(host, port, [self.answers.via(req.version)])
        except UpstreamError as e:
            self.env.upstream_failure(req.method, req.target, e.status, e.message)
            return answers.error(rw, ex, e.status, e.message, close=True)
        if through is not None:
            upstream, from_parent, ex.hierarchy = through
        else:
            from_parent = b""
            try:
                upstream = await open_upstream(host, port, timeout=cfg.upstream["connect_timeout"],
                                               resolve=self.resolve)
            except DialError as e:  # e.status: 504 for a timeout, else 502
                return answers.error(rw, ex, e.status, DIAL_FAILURE.get(e.kind, "cannot connect to {e}").format(
                    host=host, e=e), close=True)
            peer = upstream.getpeername()
            # Checked on the address actually reached, so no spelling of the proxy's own address
            # ([::ffff:127.0.0.1], 0.0.0.0, [::], a name) tunnels a client back into the proxy.
            if self.env.is_self(peer[0], peer[1]):
                upstream.close()
                return answers.deny(rw, ex, 508, f"forwarding loop detected: CONNECT to {host}:{port} is this proxy",
                                    close=True)
            if self.env.destination_refused(conn.client_ip, peer[0]):
                upstream.close()
                return answers.deny(rw, ex, 403, f"access denied: {host} is an address of the proxy host "
                                    "(see access.deny_destinations)", close=True)
            ex.hierarchy = logcodes.hier_direct(peer[0])
        try:
            # what the origin said first (a banner) comes on after the 200
            client = await self._established(conn, rw, ex, from_parent)
        except Exception:
            upstream.close()
            raise
        TALLY.tunnels += 1
        try:
            result = await relay(client, upstream, client_initial=conn.upgrade_rest or b"",
                                 idle_timeout=cfg.server["idle_timeout"] or None)
            rw.nbytes += result.upstream_to_client
        finally:
            TALLY.tunnels -= 1
            self.release(conn)
        return False

    @staticmethod
    async def _established(conn: ClientConnection, rw: ResponseWriter, ex: Exchange,
                           first: bytes = b"") -> socket.socket:
        """Answer 200 (then `first`) and take the client's socket over from the front end."""
        ex.status = 200
        conn.write(ESTABLISHED + first)
        client = await conn.detach()
        rw.nbytes = len(ESTABLISHED) + len(first)
        return client

    async def _intercepted(self, conn: ClientConnection, rw: ResponseWriter, ex: Exchange, host: str,
                           port: int) -> bool:
        assert self.intercept is not None
        client = await self._established(conn, rw, ex)
        TALLY.tunnels += 1
        try:
            await self.intercept.serve(client, conn.upgrade_rest or b"",
                                       Inherited(conn.client_ip, conn.client_port, host, port, conn.user))
        finally:
            TALLY.tunnels -= 1
            self.release(conn)
        return False
