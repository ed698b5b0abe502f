"""Security by default: allowed client networks, domain filter, loop detection, connection caps."""

from __future__ import annotations

import socket
import time

from tests.support import RawClient, curl, read_all


def test_client_outside_allowed_networks_gets_403_and_a_log_line(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "access": {"allow_clients": ["10.0.0.0/8"]}})
    before = origin.hits["/text/denied"]
    r = curl("-x", p.url, "-i", origin.url("/text/denied"))
    assert b"403 Forbidden" in r.stdout and b"127.0.0.1 may not use this proxy" in r.stdout
    assert origin.hits["/text/denied"] == before
    line = p.access_lines(wait_for=1)[-1]
    assert "TCP_DENIED/403" in line and origin.url("/text/denied") in line


def test_deny_domains_blocks_domain_and_subdomains(make_proxy):
    p = make_proxy({"cache": {"enabled": False}, "access": {"deny_domains": ["blocked.test"]}})
    for url in ("http://blocked.test/", "http://www.blocked.test/x", "http://BLOCKED.test./"):
        r = curl("-x", p.url, "-i", url)
        assert b"403 Forbidden" in r.stdout, url
        assert b"deny list" in r.stdout
    r = curl("-x", p.url, "-i", "http://notblocked.test.invalid/")
    assert b"403" not in r.stdout.split(b"\r\n")[0]


def test_allow_domains_limits_fetches_to_the_list(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "access": {"allow_domains": ["127.0.0.1"]}})
    assert curl("-x", p.url, origin.url("/text/ok")).stdout == b"hello ok\n"
    r = curl("-x", p.url, "-i", "http://elsewhere.invalid/")
    assert b"403 Forbidden" in r.stdout and b"allow list" in r.stdout


def test_forwarding_loop_via_our_own_name_gets_508(proxy, origin):
    before = origin.hits["/text/loop"]
    r = curl("-x", proxy.url, "-i", "-H", "Via: 1.1 other, 1.1 webproxy (webproxy/0.1.0)", origin.url("/text/loop"))
    assert b"508 Loop Detected" in r.stdout and b"forwarding loop" in r.stdout
    assert origin.hits["/text/loop"] == before


def test_a_url_naming_the_proxy_by_another_local_address_is_answered_by_the_proxy(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}})
    p.stop()
    # Listening on every address, http://127.0.0.3:PORT/ is this proxy: it is recognised as such
    # (not fetched from itself) and answered with the proxy's own page.
    p.config_path.write_text(p.config_path.read_text().replace('"127.0.0.1:', '"0.0.0.0:'))
    p.start()
    r = curl("-x", p.url, "-i", f"http://127.0.0.3:{p.port}/x")
    assert r.stdout.startswith(b"HTTP/1.1 400") and b"this is a proxy server" in r.stdout
    r = curl("-x", p.url, "-i", f"http://127.0.0.3:{p.port}/status")
    assert r.stdout.startswith(b"HTTP/1.1 200") and b"requests served" in r.stdout
    assert sum(1 for line in p.access_lines() if "HIER_DIRECT" in line) == 0


def test_connections_over_the_per_client_cap_get_503(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "access": {"max_connections_per_client": 2}})
    keep = [served_client(p.port, origin), served_client(p.port, origin)]
    s = socket.create_connection(("127.0.0.1", p.port), 5)
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
    for c in keep:
        c.close()
    # once they are gone, a new connection is served again
    for _ in range(50):
        r = curl("-x", p.url, origin.url("/text/cap"))
        if r.stdout == b"hello cap\n":
            break
    assert r.stdout == b"hello cap\n"


def served_client(port: int, origin) -> RawClient:
    """A connection that got a 200 (retrying while the startup probe's slot is released)."""
    for _ in range(50):
        c = RawClient(port)
        c.send(f"GET {origin.url('/text/one')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        if c.response()[0].status_code == 200:
            return c
        c.close()
        time.sleep(0.05)
    raise AssertionError("never served")


def test_total_connection_cap(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "access": {"max_connections": 1}})
    held = served_client(p.port, origin)  # noqa: F841 (keep the connection open)
    s = socket.create_connection(("127.0.0.1", p.port), 5)
    assert read_all(s).startswith(b"HTTP/1.1 503")
