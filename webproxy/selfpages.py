"""Requests addressed to the proxy itself (origin-form, or an absolute URL naming one of our
listeners): the status page, and a clear 400 for anything else."""

from __future__ import annotations

import html
from collections.abc import Callable

from webproxy import __version__, logcodes
from webproxy.context import Env
from webproxy.exchange import Answers, Exchange
from webproxy.frontend import Request, ResponseWriter
from webproxy.httpmsg import get_header

Rows = Callable[[], list[tuple[str, str]]]


def status_html(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return (f"<!doctype html><html><head><title>webproxy</title></head><body><h1>webproxy</h1>"
            f"<p>This is an HTTP proxy. Point your client at it; it does not serve pages itself.</p>"
            f"<table>{cells}</table></body></html>\n")


class SelfPages:
    def __init__(self, env: Env, answers: Answers, rows: Rows) -> None:
        self.env = env
        self.answers = answers
        self.rows = rows

    def handle(self, req: Request, rw: ResponseWriter, ex: Exchange, path: str, client_ip: str) -> bool:
        if req.method in ("GET", "HEAD") and path in ("/", "/status"):
            if not self.env.is_admin(client_ip):
                return self.answers.deny(rw, ex, 403, f"access denied: the status page is for admin clients "
                                         f"(access.admin_clients); {client_ip} is not one")
            ex.code = logcodes.MISS
            ex.status = 200
            ex.ctype = "text/html"
            body = status_html([("version", __version__), *self.rows()]).encode()
            rw.start(200, "OK", [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")], len(body))
            rw.write(body)
            return rw.end()
        host = get_header(req.headers, "host")
        return self.answers.error(rw, ex, 400, f"this is a proxy server, not a web server: {path[:200]!r} "
                                  f"(Host: {host or 'none'}) is not an absolute URL. Configure your client to use "
                                  "this address as its HTTP proxy, e.g. curl -x http://HOST:PORT http://example.com/")
