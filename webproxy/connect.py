"""CONNECT host:port: access checks, open the upstream, answer 200, then hand both raw sockets to
tunnel.relay. The access-log line is written when the tunnel ends (as Squid does), with the bytes
sent to the client and the tunnel's duration."""

from __future__ import annotations

from collections.abc import Callable

from tunnel.connect import DialError, Resolver, open_upstream
from tunnel.relay import relay
from webproxy import logcodes
from webproxy.acl import domain_denied
from webproxy.context import Env
from webproxy.errors import UpstreamError
from webproxy.exchange import Answers, Exchange
from webproxy.frontend import ClientConnection, Request, ResponseWriter
from webproxy.httpmsg import BadTarget, has_via_loop, parse_authority
from webproxy.metrics import TALLY
from webproxy.parentpath import ParentPath

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
DIAL_FAILURE = {"dns": "cannot resolve {host}: {e}", "timeout": "timed out connecting to {e}"}


class ConnectHandler:
    def __init__(self, env: Env, answers: Answers, resolve: Resolver,
                 release: Callable[[ClientConnection], None], parents: ParentPath) -> None:
        self.env = env
        self.parents = parents
        self.answers = answers
        self.resolve = resolve
        self.release = release  # the tunnel holds the client's admission slot until it ends

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
        ex.status = 200
        try:
            conn.write(ESTABLISHED + from_parent)  # what the origin said first (a banner) comes on
            client = await conn.detach()
        except Exception:
            upstream.close()
            raise
        rw.nbytes = len(ESTABLISHED) + len(from_parent)
        TALLY.tunnels += 1
        try:
            result = await relay(client, upstream, client_initial=conn.upgrade_rest or b"",
                                 idle_timeout=cfg.server["idle_timeout"] or None)
            rw.nbytes += result.upstream_to_client
        finally:
            TALLY.tunnels -= 1
            self.release(conn)
        return False
