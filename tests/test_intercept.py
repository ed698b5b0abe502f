"""TLS interception (tls.intercept): real HTTPS origins with trustme certificates, real curl and pip
through a real webproxy process, and the pure rules (which host, which certificate name, when to
re-mint, what the inner URL is, what a ClientHello says) pinned without sockets."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.auth_support import write_htpasswd
from tests.intercept_support import (
    TlsOrigin,
    connect_tunnel,
    eager_tls_get,
    http_get,
    peer_issuer,
    tls_through,
)
from tests.support import ProxyProcess, curl, package_index, run_webproxy, wait_until, write_config
from tunnel.clienthello import parse_client_hello
from webproxy.httpmsg import BadTarget
from webproxy.tlspolicy import (
    cert_name,
    handshake_rejected,
    inner_url,
    intercepted,
    leaf_fresh,
)


# ---- pure rules ---------------------------------------------------------------------------------
def test_intercepted_matches_the_domain_and_its_subdomains_only():
    rules = ["pypi.org", ".debian.org"]
    assert intercepted("pypi.org", rules)
    assert intercepted("files.pypi.org", rules)
    assert intercepted("PyPI.org.", rules)
    assert not intercepted("evilpypi.org", rules)
    assert not intercepted("debian.org", rules)  # leading dot: subdomains only
    assert intercepted("deb.debian.org", rules)
    assert not intercepted("pypi.org", [])


def test_cert_name_is_the_sni_else_the_connect_host():
    assert cert_name("Files.Pythonhosted.org", "1.2.3.4") == "files.pythonhosted.org"
    assert cert_name(None, "pypi.org") == "pypi.org"
    assert cert_name("bad name!", "pypi.org") == "pypi.org"


def test_a_kept_leaf_is_reminted_a_week_before_it_expires():
    now = 1_000_000.0
    assert leaf_fresh(now + 8 * 86400, now)
    assert not leaf_fresh(now + 6 * 86400, now)
    assert not leaf_fresh(now - 1, now)


def test_inner_url_uses_the_connect_authority_and_refuses_another_host():
    assert inner_url("GET", "/a?b", "pypi.org", "pypi.org", 443) == "https://pypi.org/a?b"
    assert inner_url("GET", "/a", "pypi.org:8443", "pypi.org", 8443) == "https://pypi.org:8443/a"
    assert inner_url("GET", "/a", None, "pypi.org", 443) == "https://pypi.org/a"
    assert inner_url("GET", "https://pypi.org/x", "pypi.org", "pypi.org", 443) == "https://pypi.org/x"
    for method, target, host in [("GET", "/a", "evil.example"), ("GET", "https://evil.example/", None),
                                 ("GET", "http://pypi.org/", None), ("CONNECT", "pypi.org:443", None),
                                 ("OPTIONS", "*", None)]:
        with pytest.raises(BadTarget):
            inner_url(method, target, host, "pypi.org", 443)


def _client_hello(server_hostname: str | None) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    if server_hostname is None:
        ctx.check_hostname = False
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_client_hello_sni_is_read_from_the_bytes_a_real_client_sends():
    hello = _client_hello("Files.Pythonhosted.org")
    assert parse_client_hello(hello).sni == "files.pythonhosted.org"
    assert parse_client_hello(hello).complete
    partial = parse_client_hello(hello[:100])
    assert partial.tls and not partial.complete
    assert not parse_client_hello(b"GET / HTTP/1.1\r\n").tls
    assert not parse_client_hello(b"\x16\x00garbage").tls


def test_a_certificate_alert_or_a_hang_up_reads_as_the_client_refusing_our_certificate():
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    assert handshake_rejected(alert)
    assert handshake_rejected(ConnectionResetError())
    other = ssl.SSLError(1, "no shared cipher")
    other.reason = "NO_SHARED_CIPHER"
    assert not handshake_rejected(other)


# ---- a running proxy ----------------------------------------------------------------------------
class World:
    """One trustme CA for the origins, three HTTPS origins, one intercepting webproxy."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.origin_ca = trustme.CA()
        self.origin_ca_file = str(tmp / "origin-ca.pem")
        self.origin_ca.cert_pem.write_to_path(self.origin_ca_file)
        self.good = TlsOrigin(self.origin_ca.issue_cert("localhost", "127.0.0.1"))
        self.wheel_name, self.wheel = package_index(self.good)
        self.good.start()
        self.wrong_name = TlsOrigin(self.origin_ca.issue_cert("other.example")).start()
        self.untrusted = TlsOrigin(trustme.CA().issue_cert("localhost")).start()
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
        self.expired = TlsOrigin(self.origin_ca.issue_cert(
            "localhost", not_before=past - datetime.timedelta(days=30), not_after=past)).start()
        self.ca_dir = tmp / "ca"
        r = run_webproxy("ca", "init", "--dir", str(self.ca_dir))
        assert r.returncode == 0, r.stderr
        self.ca_file = str(self.ca_dir / "ca.pem")
        ports = [self.good.port, self.wrong_name.port, self.untrusted.port, self.expired.port]
        self.proxy = ProxyProcess(tmp, {
            "access": {"connect_ports": [443, *ports]},
            "tls": {"ca_dir": str(self.ca_dir), "intercept": ["localhost"],
                    "upstream_ca_file": self.origin_ca_file},
            "refresh": {"enabled": False},
        }).start()

    def stop(self) -> None:
        self.proxy.stop()
        for o in (self.good, self.wrong_name, self.untrusted, self.expired):
            o.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("intercept"))
    yield w
    w.stop()


def test_https_through_the_proxy_twice_the_second_is_a_hit(world):
    url = world.good.put("twice", b"cached over https\n", Cache_Control="max-age=600")
    url = url.replace("http://127.0.0.1", "https://localhost")
    for _ in range(2):
        r = curl("-x", world.proxy.url, "--cacert", world.ca_file, url)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"cached over https\n"
    assert world.good.full["twice"] == 1
    lines = [line for line in world.proxy.access_lines() if url in line]
    assert wait_until(lambda: len([ln for ln in world.proxy.access_lines() if url in ln]) >= 2)
    lines = [ln for ln in world.proxy.access_lines() if url in ln]
    assert "HIT/200" in lines[-1], lines
    assert any("CONNECT localhost:" in ln for ln in world.proxy.access_lines())


def test_a_large_hit_over_tls_is_sent_encrypted_and_whole(world):
    # Bodies stored in files are sendfile()d to plain clients; over TLS they must go through the
    # TLS layer, or the client would get plaintext inside its TLS stream.
    body = os.urandom(3 << 20)
    url = world.good.put("large", body, Cache_Control="max-age=600").replace("http://127.0.0.1", "https://localhost")
    for _ in range(2):
        r = curl("-x", world.proxy.url, "--cacert", world.ca_file, url)
        assert r.returncode == 0, r.stderr
        assert r.stdout == body
    assert world.good.full["large"] == 1


def test_a_post_inside_an_intercepted_tunnel_reaches_the_origin_with_its_body(world):
    data = os.urandom(300_000)
    (world.tmp / "post.bin").write_bytes(data)
    r = curl("-x", world.proxy.url, "--cacert", world.ca_file, "--data-binary", f"@{world.tmp / 'post.bin'}",
             f"https://localhost:{world.good.port}/upload")
    assert r.returncode == 0, r.stderr
    assert f'"length": {len(data)}'.encode() in r.stdout
    assert hashlib.sha256(data).hexdigest().encode() in r.stdout


def test_minted_certificates_are_kept_on_disk_in_the_ca_directory(world):
    r = curl("-x", world.proxy.url, "--cacert", world.ca_file, f"https://localhost:{world.good.port}/text/disk")
    assert r.returncode == 0, r.stderr
    leaves = list((world.ca_dir / "leaves").glob("*/localhost.pem"))
    assert len(leaves) == 1
    assert stat.S_IMODE(os.stat(world.ca_dir / "leaf-key.pem").st_mode) == 0o600


def test_pip_downloads_from_an_https_index_through_the_proxy_and_the_second_from_cache(world):
    name = world.wheel_name
    index = f"https://localhost:{world.good.port}/simple/"
    # PIP_CERT and REQUESTS_CA_BUNDLE as `webproxy ca show` says (the environment's would win over --cert).
    env = {**os.environ, "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "", "PIP_EXTRA_INDEX_URL": "",
           "PIP_CERT": world.ca_file, "REQUESTS_CA_BUNDLE": world.ca_file}
    for i in range(2):
        dest = world.tmp / f"pip{i}"
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                            "--proxy", world.proxy.url, "--cert", world.ca_file, "--index-url", index,
                            "-d", str(dest), "webproxy-probe"], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (dest / name).read_bytes() == world.wheel
    assert world.good.hits[f"/files/{name}"] == 1  # the second pip got the wheel from the proxy's cache
    assert wait_until(lambda: any(f"https://localhost:{world.good.port}/files/{name}" in ln and "HIT/200" in ln
                                  for ln in world.proxy.access_lines()))


@pytest.mark.parametrize(("which", "reason"), [("untrusted", "unknown issuer"), ("wrong_name", "name mismatch"),
                                               ("expired", "certificate expired")])
def test_an_origin_that_fails_verification_is_a_502_naming_the_reason(world, which, reason):
    origin = getattr(world, which)
    r = curl("-x", world.proxy.url, "--cacert", world.ca_file, "-w", "%{http_code}",
             f"https://localhost:{origin.port}/text/x")
    assert r.stdout.endswith(b"502"), r.stdout
    assert reason.encode() in r.stdout
    assert origin.hits["/text/x"] == 0


def test_a_domain_not_listed_is_tunneled_and_the_client_sees_the_origins_own_certificate(world):
    with tls_through(world.proxy.port, "127.0.0.1", world.good.port, world.origin_ca_file) as s:
        assert "trustme" in peer_issuer(s) or "webproxy" not in peer_issuer(s)
        assert b"hello tunnel" in http_get(s, "/text/tunnel", "127.0.0.1")
    with tls_through(world.proxy.port, "localhost", world.good.port, world.ca_file) as s:
        assert "webproxy" in peer_issuer(s)  # the listed one: our minted certificate


def test_a_client_that_refuses_our_certificate_is_logged_once_with_the_hint(world):
    url = f"https://localhost:{world.good.port}/text/pinned"
    for _ in range(2):
        r = curl("-x", world.proxy.url, "--cacert", world.origin_ca_file, url)  # does not trust our CA
        assert r.returncode != 0
    hint = "remove localhost from tls.intercept"
    assert wait_until(lambda: hint in world.proxy.stderr())
    time.sleep(0.3)
    assert world.proxy.stderr().count(hint) == 1
    assert world.good.hits["/text/pinned"] == 0


def test_plain_http_inside_an_intercepted_tunnel_gets_a_400_and_is_closed(world):
    s, head = connect_tunnel(world.proxy.port, f"localhost:{world.good.port}")
    assert head.startswith(b"HTTP/1.1 200")
    s.sendall(b"GET /text/plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    s.close()
    assert out.startswith(b"HTTP/1.1 400") and b"speak TLS" in out
    assert wait_until(lambda: "sent plain HTTP instead of a TLS handshake" in world.proxy.stderr())


def test_garbage_inside_an_intercepted_tunnel_is_closed_and_logged(world):
    s, head = connect_tunnel(world.proxy.port, f"localhost:{world.good.port}")
    assert head.startswith(b"HTTP/1.1 200")
    s.sendall(b"\x00\x01\x02garbage\r\n\r\n")
    assert s.recv(4096) == b""
    s.close()
    assert wait_until(lambda: "bytes that are not TLS" in world.proxy.stderr())
    assert "Traceback" not in world.proxy.stderr()
    r = curl("-x", world.proxy.url, "--cacert", world.ca_file, f"https://localhost:{world.good.port}/text/alive")
    assert r.stdout == b"hello alive\n"


def test_pipelined_requests_inside_the_tunnel_are_answered_in_order(world):
    with tls_through(world.proxy.port, "localhost", world.good.port, world.ca_file) as s:
        host = f"localhost:{world.good.port}"
        s.sendall(f"GET /text/one HTTP/1.1\r\nHost: {host}\r\n\r\nGET /text/two HTTP/1.1\r\nHost: {host}\r\n"
                  "Connection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.count(b"HTTP/1.1 200") == 2
    assert out.index(b"hello one") < out.index(b"hello two")


def test_a_client_hello_sent_with_the_connect_is_not_lost(world):
    # Bytes after the CONNECT head that the front end already read are fed to the TLS side first.
    out = eager_tls_get(world.proxy.port, "localhost", world.good.port, world.ca_file, "/text/eager")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"hello eager\n")


def test_a_host_header_naming_another_host_inside_the_tunnel_is_a_400(world):
    with tls_through(world.proxy.port, "localhost", world.good.port, world.ca_file) as s:
        out = http_get(s, "/text/fronted", "evil.example")
    assert out.startswith(b"HTTP/1.1 400") and b"evil.example" in out
    assert world.good.hits["/text/fronted"] == 0


# ---- the CA command and start-up checks -------------------------------------------------------
def test_ca_init_makes_a_key_only_its_owner_can_read_and_show_says_how_to_trust_it(tmp_path):
    d = tmp_path / "ca"
    assert run_webproxy("ca", "init", "--dir", str(d)).returncode == 0
    assert stat.S_IMODE(os.stat(d / "ca-key.pem").st_mode) == 0o600
    again = run_webproxy("ca", "init", "--dir", str(d))
    assert again.returncode == 2 and "already exists" in again.stderr
    shown = run_webproxy("ca", "show", "--dir", str(d))
    assert shown.returncode == 0
    assert shown.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert (d / "ca.pem").read_text() in shown.stdout
    for needle in ("--cacert", "CURL_CA_BUNDLE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "cafile",
                   "NODE_EXTRA_CA_CERTS", "/usr/local/share/ca-certificates", "update-ca-certificates", "certutil"):
        assert needle in shown.stdout
    assert "PRIVATE KEY" not in shown.stdout


def test_the_proxy_refuses_to_start_with_a_ca_key_others_can_read(world, tmp_path):
    d = tmp_path / "ca"
    d.mkdir()
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(world.ca_dir / name, d / name)
    os.chmod(d / "ca-key.pem", 0o644)
    cfg = write_config(tmp_path / "w.toml", {"server": {"listen": ["127.0.0.1:0"]},
                                             "cache": {"directory": str(tmp_path / "cache")},
                                             "tls": {"ca_dir": str(d), "intercept": ["example.org"]}})
    r = run_webproxy("run", "-c", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "chmod 600" in r.stderr and "Traceback" not in r.stderr


def test_the_proxy_refuses_to_intercept_without_a_ca(tmp_path):
    cfg = write_config(tmp_path / "w.toml", {"server": {"listen": ["127.0.0.1:0"]},
                                             "cache": {"directory": str(tmp_path / "cache")},
                                             "tls": {"ca_dir": str(tmp_path / "none"), "intercept": ["example.org"]}})
    r = run_webproxy("run", "-c", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "webproxy ca init" in r.stderr


def test_an_intercepted_request_reaches_the_origin_through_the_parents_connect_never_in_clear(world):
    # Parent B tunnels; A (intercepting, never_direct) sends its TLS to the origin inside B's
    # CONNECT, so B sees an authority, never a path, and A still caches the https:// object.
    for d in ("parent", "child"):
        (world.tmp / d).mkdir(exist_ok=True)
    parent = ProxyProcess(world.tmp / "parent", {"access": {"connect_ports": [world.good.port]},
                                                "cache": {"enabled": False}}).start()
    child = ProxyProcess(world.tmp / "child", {
        "access": {"connect_ports": [world.good.port]},
        "upstream": {"parent": [{"address": f"127.0.0.1:{parent.port}"}], "never_direct": True,
                     "keepalive_timeout": 0.5},  # the parent logs a tunnel when it ends
        "tls": {"ca_dir": str(world.ca_dir), "intercept": ["localhost"], "upstream_ca_file": world.origin_ca_file},
        "refresh": {"enabled": False},
    }).start()
    try:
        url = world.good.put("via-parent", b"through the parent\n", Cache_Control="max-age=600")
        url = url.replace("http://127.0.0.1", "https://localhost")
        for _ in range(2):
            r = curl("-x", child.url, "--cacert", world.ca_file, url)
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"through the parent\n"
        assert world.good.full["via-parent"] == 1
        assert wait_until(lambda: len([ln for ln in child.access_lines() if url in ln]) == 2)
        miss, hit = [ln for ln in child.access_lines() if url in ln]
        assert "PARENT/127.0.0.1" in miss and "HIT/200" in hit
        assert wait_until(lambda: any(f"CONNECT localhost:{world.good.port}" in ln for ln in parent.access_lines()))
        assert not any("via-parent" in ln for ln in parent.access_lines())
        parent.stop()
        r = curl("-x", child.url, "--cacert", world.ca_file, "-w", "%{http_code}", url.replace("via-parent", "x"))
        assert r.stdout.endswith(b"502") and b"parent" in r.stdout
    finally:
        child.stop()
        parent.stop()


def test_an_intercepted_tunnel_needs_credentials_and_its_requests_are_logged_as_the_connects_user(world):
    # The requests inside carry no Proxy-Authorization (the client sent it on the CONNECT only):
    # they belong to the user the CONNECT authenticated as, and are logged with that name.
    (world.tmp / "authed").mkdir(exist_ok=True)
    users = write_htpasswd(world.tmp / "authed" / "users", {"alice": "secret"})
    proxy = ProxyProcess(world.tmp / "authed", {
        "access": {"connect_ports": [world.good.port]},
        "auth": {"backend": "htpasswd", "htpasswd_file": str(users)},
        "tls": {"ca_dir": str(world.ca_dir), "intercept": ["localhost"], "upstream_ca_file": world.origin_ca_file},
        "refresh": {"enabled": False},
    }).start()
    try:
        url = world.good.put("authed", b"for alice\n", Cache_Control="max-age=600")
        url = url.replace("http://127.0.0.1", "https://localhost")
        r = curl("-x", proxy.url, "--cacert", world.ca_file, url)
        assert r.returncode != 0 and b"407" in r.stderr  # curl: CONNECT tunnel failed, response 407
        for _ in range(2):
            r = curl("-x", proxy.url, "--proxy-user", "alice:secret", "--cacert", world.ca_file, url)
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"for alice\n"
        assert world.good.full["authed"] == 1
        assert wait_until(lambda: len([ln for ln in proxy.access_lines() if url in ln]) == 2)
        for line in [ln for ln in proxy.access_lines() if url in ln]:
            assert line.split()[7] == "alice", line
    finally:
        proxy.stop()
