"""Where a request goes (webproxy.routing.route), decided with no socket."""

from __future__ import annotations

import pytest

from webproxy.routing import Route, route


def own(host: str, port: int) -> bool:
    return (host, port) in {("127.0.0.1", 3128), ("localhost", 3128)}


@pytest.mark.parametrize("method, target, denied, transparent, looped, expected", [
    ("GET", "http://example.com/", True, False, False, Route.DENIED),
    ("CONNECT", "example.com:443", False, False, False, Route.CONNECT),
    ("GET", "/", False, False, False, Route.SELF),
    ("GET", "/status", False, False, True, Route.LOOP),
    ("GET", "/index.html", False, True, False, Route.TRANSPARENT),
    ("GET", "http://example.com/a?b", False, False, False, Route.HTTP),
    ("GET", "ftp://example.com/pub/", False, False, False, Route.FTP),
    ("GET", "http://127.0.0.1:3128/", False, False, False, Route.SELF),
    ("GET", "http://localhost:3128/x", False, False, True, Route.LOOP),
    ("GET", "https://example.com/", False, False, False, Route.UNSUPPORTED),
    ("GET", "foo://example.com/", False, False, False, Route.BAD),
    ("GET", "http://bad host/", False, False, False, Route.BAD),
    # An intercepted connection: the original destination is the authority, whatever is named.
    ("GET", "http://127.0.0.1:3128/", False, True, False, Route.TRANSPARENT),
    ("GET", "http://other.test/x", False, True, False, Route.TRANSPARENT),
    ("GET", "ftp://other.test/x", False, True, False, Route.TRANSPARENT),
    ("GET", "/x", False, True, True, Route.LOOP),
    ("CONNECT", "127.0.0.1:22", False, True, False, Route.BAD),
    ("GET", "/x", True, True, False, Route.DENIED),
])
def test_route(method, target, denied, transparent, looped, expected):
    assert route(method, target, denied, transparent, looped, own).route is expected


def test_a_url_naming_the_proxy_is_answered_with_its_path():
    r = route("GET", "http://127.0.0.1:3128/status", False, False, False, own)
    assert r.route is Route.SELF and r.target is not None and r.target.path == "/status"


def test_refusals_say_why():
    assert "CONNECT" in route("GET", "https://x.org/", False, False, False, own).message
    assert "'foo'" in route("GET", "foo://x.org/", False, False, False, own).message
