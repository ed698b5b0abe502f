"""Parent proxies end to end, real processes on loopback: a child webproxy (A) sending its misses,
CONNECTs, ftp:// and gopher:// URLs through a parent (another webproxy, B, or a raw-socket parent
that records exactly what it receives), failing over when a parent dies, and refusing to go direct
under never_direct."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.parent_support import (
    AnonymousFtp,
    EchoServer,
    FakeParent,
    GopherServer,
    SquidParent,
    connect_through,
    squid_skip_reason,
)
from tests.support import (
    Origin,
    ProxyProcess,
    RawClient,
    free_port,
    proxy_get,
    run_cli,
    wait_until,
    write_config,
)


def parent_entry(port: int, **kw: object) -> dict[str, object]:
    return {"address": f"127.0.0.1:{port}", **kw}


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    e = EchoServer(banner=b"HELLO from the origin\r\n")
    yield e
    e.close()


@pytest.fixture(scope="module")
def parent_b(tmp_path_factory: pytest.TempPathFactory, echo: EchoServer) -> Iterator[ProxyProcess]:
    """B: a plain webproxy with no cache, so every request A sends it shows in B's access log."""
    p = ProxyProcess(tmp_path_factory.mktemp("parent-b"), {
        "server": {"name": "parent-b"}, "cache": {"enabled": False},
        "access": {"connect_ports": [echo.port]}}).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def child_a(tmp_path_factory: pytest.TempPathFactory, parent_b: ProxyProcess, echo: EchoServer) -> Iterator[ProxyProcess]:
    """A: caches, sends everything through B except `localhost`. Its own server.name: a parent
    that saw a Via with its own name would take the request for a loop (508)."""
    p = ProxyProcess(tmp_path_factory.mktemp("child-a"), {
        "server": {"name": "child-a"}, "refresh": {"enabled": False},
        "access": {"connect_ports": [echo.port]},
        "upstream": {"parent": [parent_entry(parent_b.port)], "always_direct": ["localhost"]}}).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeParent]:
    f = FakeParent()
    yield f
    f.close()


@pytest.fixture(scope="module")
def refusing() -> Iterator[FakeParent]:
    f = FakeParent(connect_answer=b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    yield f
    f.close()


@pytest.fixture(scope="module")
def child_f(tmp_path_factory: pytest.TempPathFactory, fake: FakeParent, refusing: FakeParent) -> Iterator[ProxyProcess]:
    """A child whose parents are raw-socket stand-ins: `refusing` first for *.refuse.test, `fake`
    (with credentials) for everything."""
    p = ProxyProcess(tmp_path_factory.mktemp("child-f"), {
        "server": {"name": "child-f"}, "refresh": {"enabled": False},
        "log": {"error_log": str(tmp_path_factory.getbasetemp() / "child-f-error.log")},
        "upstream": {"parent": [parent_entry(refusing.port, domains=["refuse.test"]),
                                parent_entry(fake.port, username="alice", password="s3cret pw")]}}).start()
    yield p
    p.stop()


def raw_get(proxy: ProxyProcess, url: str, host: str) -> tuple[int, bytes]:
    c = RawClient(proxy.port)
    try:
        c.send(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        resp, body = c.response()
        return resp.status_code, body
    finally:
        c.close()


def lines_for(proxy: ProxyProcess, url: str, count: int) -> list[str]:
    """The access-log lines of `url` once there are `count` of them."""
    found: list[str] = []

    def enough() -> bool:
        found[:] = [line for line in proxy.access_lines() if f" {url} " in line]
        return len(found) >= count

    wait_until(enough, 5)
    return found


# ---- a webproxy parent ----------------------------------------------------------------------------

def test_misses_go_through_the_parent_and_hits_are_served_by_the_child(origin: Origin, child_a, parent_b):
    url = origin.put("chain-1", b"via the parent", Cache_Control="max-age=300")
    c = RawClient(child_a.port)
    try:
        c.send(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        resp, body = c.response()
    finally:
        c.close()
    assert body == b"via the parent"
    vias = [v.decode() for k, v in resp.headers if k == b"via"]
    assert "parent-b" in vias[0] and "child-a" in vias[-1]  # both hops, in order (RFC 9110 7.6.3)
    status, _, body = proxy_get(child_a, url)
    assert (status, body) == (200, b"via the parent")
    assert origin.hits["/obj/chain-1"] == 1
    # B logged exactly one request (the miss), fetched direct.
    at_b = lines_for(parent_b, url, 1)
    assert len(at_b) == 1 and " TCP_MISS/200 " in at_b[0] and " HIER_DIRECT/127.0.0.1 " in at_b[0]
    at_a = lines_for(child_a, url, 2)
    assert " TCP_MISS/200 " in at_a[0] and " DEFAULT_PARENT/127.0.0.1 " in at_a[0]
    assert "HIT/200 " in at_a[1] and " HIER_NONE/- " in at_a[1]


def test_always_direct_domains_skip_the_parent(origin: Origin, child_a, parent_b):
    origin.put("chain-direct", b"direct", Cache_Control="no-store")
    url = f"http://localhost:{origin.port}/obj/chain-direct"
    assert proxy_get(child_a, url)[2] == b"direct"
    assert " HIER_DIRECT/127.0.0.1 " in lines_for(child_a, url, 1)[0]
    assert lines_for(parent_b, url, 0) == []


def test_connect_goes_through_the_parents_connect(echo: EchoServer, child_a, parent_b):
    head, data = connect_through(child_a.port, f"127.0.0.1:{echo.port}", b"ping through two proxies")
    assert head.startswith(b"HTTP/1.1 200")
    assert data == b"HELLO from the origin\r\nping through two proxies"
    target = f"127.0.0.1:{echo.port}"
    assert " TCP_TUNNEL/200 " in lines_for(parent_b, target, 1)[0]
    assert " DEFAULT_PARENT/127.0.0.1 " in lines_for(child_a, target, 1)[0]


def test_a_parent_that_dies_is_failed_over_to_the_next(tmp_path: Path, origin: Origin, parent_b, echo):
    (tmp_path / "doomed").mkdir()
    doomed = ProxyProcess(tmp_path / "doomed", {"server": {"name": "doomed"}, "cache": {"enabled": False},
                                                 "access": {"connect_ports": [echo.port]}}).start()
    (tmp_path / "a2").mkdir()
    a2 = ProxyProcess(tmp_path / "a2", {
        "server": {"name": "child-a2"}, "cache": {"enabled": False},
        "access": {"connect_ports": [echo.port]},
        "log": {"error_log": str(tmp_path / "a2-error.log")},
        "upstream": {"parent": [parent_entry(doomed.port), parent_entry(parent_b.port)]}}).start()
    try:
        first = origin.put("chain-fo-1", b"one")
        assert proxy_get(a2, first)[2] == b"one"
        assert len(lines_for(doomed, first, 1)) == 1
        assert " FIRSTUP_PARENT/127.0.0.1 " in lines_for(a2, first, 1)[0]
        doomed.stop()
        second = origin.put("chain-fo-2", b"two")
        assert proxy_get(a2, second)[2] == b"two"
        assert len(lines_for(parent_b, second, 1)) == 1  # the next parent answered
        assert f"parent proxy 127.0.0.1:{doomed.port} failed" in a2.error_log()
        head, data = connect_through(a2.port, f"127.0.0.1:{echo.port}", b"after failover")
        assert head.startswith(b"HTTP/1.1 200") and data.endswith(b"after failover")
    finally:
        doomed.stop()
        a2.stop()


def test_with_every_parent_down_it_goes_direct_or_answers_502_under_never_direct(tmp_path: Path, origin: Origin, echo):
    dead = free_port()
    (tmp_path / "d").mkdir()
    (tmp_path / "n").mkdir()
    direct_ok = ProxyProcess(tmp_path / "d", {"server": {"name": "child-d"}, "cache": {"enabled": False},
                                               "upstream": {"parent": [parent_entry(dead)]}}).start()
    never = ProxyProcess(tmp_path / "n", {"server": {"name": "child-n"}, "cache": {"enabled": False},
                                          "access": {"connect_ports": [echo.port]},
                                          "upstream": {"parent": [parent_entry(dead)], "never_direct": True}}).start()
    try:
        url = origin.put("chain-down", b"reached direct")
        assert proxy_get(direct_ok, url)[2] == b"reached direct"
        assert " HIER_DIRECT/127.0.0.1 " in lines_for(direct_ok, url, 1)[0]
        status, _, body = proxy_get(never, url)
        assert status == 502
        assert f"parent proxy 127.0.0.1:{dead}".encode() in body and b"never_direct" in body
        assert b"connection refused" in body
        head, rest = connect_through(never.port, f"127.0.0.1:{echo.port}", b"x")
        assert head.startswith(b"HTTP/1.1 502") and f"127.0.0.1:{dead}".encode() in rest
    finally:
        direct_ok.stop()
        never.stop()


def test_ftp_and_gopher_go_through_a_webproxy_parent_and_hit_at_the_child(tmp_path: Path, child_a, parent_b):
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "notes.txt").write_bytes(b"ftp notes\n")
    month_ago = time.time() - 30 * 86400  # an old file: B gives it days of heuristic freshness
    os.utime(tmp_path / "pub" / "notes.txt", (month_ago, month_ago))
    ftpd, gopherd = AnonymousFtp(str(tmp_path)), GopherServer(b"a gopher text\r\n")
    try:
        for url, host, body in [(f"ftp://127.0.0.1:{ftpd.port}/pub/notes.txt", f"127.0.0.1:{ftpd.port}", b"ftp notes\n"),
                                (f"gopher://127.0.0.1:{gopherd.port}/0/about", f"127.0.0.1:{gopherd.port}",
                                 b"a gopher text\r\n")]:
            assert raw_get(child_a, url, host) == (200, body)
            assert raw_get(child_a, url, host) == (200, body)
            at_b = lines_for(parent_b, url, 1)
            assert len(at_b) == 1 and " HIER_DIRECT/127.0.0.1 " in at_b[0]  # B fetched it, once
            at_a = lines_for(child_a, url, 2)
            assert " DEFAULT_PARENT/127.0.0.1 " in at_a[0] and "HIT/200 " in at_a[1]
        assert gopherd.selectors == ["/about"]
    finally:
        ftpd.close()
        gopherd.close()


# ---- a real Squid parent with proxy authentication ----------------------------------------------------

@pytest.fixture(scope="module")
def squid_parent(echo: EchoServer) -> Iterator[SquidParent]:
    why = squid_skip_reason()
    if why:
        pytest.skip(why)
    s = SquidParent("branch7", "pa ss:word", [echo.port])
    yield s
    s.close()


def test_a_squid_parent_accepts_our_credentials_for_misses_and_connect(tmp_path: Path, origin: Origin, echo,
                                                                       squid_parent: SquidParent):
    good = parent_entry(squid_parent.port, username="branch7", password="pa ss:word")
    bad = parent_entry(squid_parent.port, username="branch7", password="wrong", domains=["badcreds.test"])
    child = ProxyProcess(tmp_path, {"server": {"name": "child-s"}, "refresh": {"enabled": False},
                                    "access": {"connect_ports": [echo.port]},
                                    "upstream": {"parent": [bad, good], "never_direct": True}}).start()
    try:
        url = origin.put("chain-squid", b"from behind squid", Cache_Control="max-age=300")
        assert proxy_get(child, url)[2] == b"from behind squid"
        assert proxy_get(child, url)[2] == b"from behind squid"  # a hit: Squid sees it once
        assert wait_until(lambda: any(f" {url} branch7 " in line for line in squid_parent.log_lines()), 5)
        assert len([line for line in squid_parent.log_lines() if f" {url} " in line]) == 1
        assert origin.hits["/obj/chain-squid"] == 1
        head, data = connect_through(child.port, f"127.0.0.1:{echo.port}", b"through squid")
        assert head.startswith(b"HTTP/1.1 200") and data.endswith(b"through squid")
        # Squid answers wrong credentials with 407: the client gets a 502 naming the parent.
        status, _, body = proxy_get(child, "http://www.badcreds.test/")
        assert status == 502 and f"parent proxy {squid_parent.address} rejected our credentials".encode() in body
        head, body = connect_through(child.port, f"www.badcreds.test:{echo.port}", b"x")
        assert head.startswith(b"HTTP/1.1 502") and b"407" in body and b"username/password" in body
    finally:
        child.stop()


# ---- what a parent receives (raw-socket parent) --------------------------------------------------------

def test_the_parent_gets_absolute_form_with_its_credentials_on_a_kept_alive_connection(child_f, fake: FakeParent):
    before = len(fake.requests)
    for path in ("/one", "/two"):
        status, _, body = proxy_get(child_f, f"http://lab.example.test{path}",
                                    "Cache-Control: no-cache", "Proxy-Authorization: Basic Y2xpZW50OnB3")
        assert status == 200 and body == f"parent saw: GET http://lab.example.test{path} HTTP/1.1".encode()
    got = fake.requests[before:]
    assert [r["line"] for r in got] == ["GET http://lab.example.test/one HTTP/1.1",
                                        "GET http://lab.example.test/two HTTP/1.1"]
    expected = "Basic " + base64.b64encode(b"alice:s3cret pw").decode()
    assert all(r["fields"]["proxy-authorization"] == expected for r in got)  # ours, never the client's
    assert all(r["fields"]["host"] == "lab.example.test" and "child-f" in r["fields"]["via"] for r in got)
    assert got[0]["conn"] == got[1]["conn"]  # one pooled connection to the parent
    logs = child_f.access_lines() + child_f.stderr().splitlines() + child_f.error_log().splitlines()
    assert not [line for line in logs if "s3cret" in line or expected.split()[1] in line]


def test_a_parents_407_is_a_502_naming_the_parent(child_f, fake: FakeParent):
    status, _, body = proxy_get(child_f, "http://lab.example.test/need-auth")
    assert status == 502
    assert f"parent proxy {fake.address} rejected our credentials (407)".encode() in body


def test_connect_through_a_raw_parent_carries_credentials_and_a_refusal_is_a_502(child_f, fake, refusing):
    head, data = connect_through(child_f.port, "secure.example.test:443", b"tls bytes")
    assert head.startswith(b"HTTP/1.1 200") and data == b"tls bytes"
    sent = [r for r in fake.requests if r["line"].startswith("CONNECT secure.example.test:443 ")]
    assert sent and sent[-1]["fields"]["proxy-authorization"].startswith("Basic ")
    head, body = connect_through(child_f.port, "www.refuse.test:443", b"x")
    assert head.startswith(b"HTTP/1.1 502")
    assert f"parent proxy {refusing.address} refused CONNECT www.refuse.test:443: 403 Forbidden".encode() in body
    assert any(r["line"].startswith("CONNECT www.refuse.test:443 ") for r in refusing.requests)


@pytest.mark.parametrize("url, host", [("ftp://files.example.test/pub/readme.txt", "files.example.test"),
                                       ("gopher://hole.example.test/0/about.txt", "hole.example.test")])
def test_ftp_and_gopher_urls_go_to_the_parent_as_absolute_uris_and_are_cached(child_f, fake, url, host):
    before = len(fake.requests)
    assert raw_get(child_f, url, host) == (200, f"parent saw: GET {url} HTTP/1.1".encode())
    assert raw_get(child_f, url, host) == (200, f"parent saw: GET {url} HTTP/1.1".encode())
    assert [r["line"] for r in fake.requests[before:]] == [f"GET {url} HTTP/1.1"]  # the second was a hit
    logged = lines_for(child_f, url, 2)
    assert " DEFAULT_PARENT/127.0.0.1 " in logged[0] and "HIT/200 " in logged[1]


# ---- refused at start ------------------------------------------------------------------------------

def test_a_parent_that_is_this_proxy_is_refused_at_start(tmp_path: Path):
    port = free_port()
    cfg = write_config(tmp_path / "self.toml", {"server": {"listen": [f"127.0.0.1:{port}"]},
                                                "upstream": {"parent": [parent_entry(port)]}})
    r = run_cli("run", "--check", "-c", str(cfg))
    assert r.returncode == 2
    assert f"'upstream.parent' 127.0.0.1:{port} is this proxy's own listen address" in r.stderr
    assert "Traceback" not in r.stderr
    cfg = write_config(tmp_path / "nd.toml", {"upstream": {"never_direct": True}})
    r = run_cli("run", "-c", str(cfg))
    assert r.returncode == 2 and "no [[upstream.parent]] is configured" in r.stderr


def test_a_reload_naming_this_proxy_as_its_parent_is_refused_and_the_old_config_kept(tmp_path: Path, origin: Origin):
    p = ProxyProcess(tmp_path, {"server": {"name": "child-r"}, "cache": {"enabled": False},
                                "log": {"error_log": str(tmp_path / "error.log")}}).start()
    try:
        text = p.config_path.read_text()
        p.config_path.write_text(text.replace("[upstream]\n", "") + f'\n[upstream]\nparent = [{{address = "127.0.0.1:{p.port}"}}]\n')
        p.signal(signal.SIGHUP)
        assert wait_until(lambda: "reload failed, keeping the running config" in p.error_log(), 5)
        assert f"'upstream.parent' 127.0.0.1:{p.port} is this proxy's own listen address" in p.error_log()
        url = origin.put("chain-reload", b"still direct")
        assert proxy_get(p, url)[2] == b"still direct"
    finally:
        p.stop()
