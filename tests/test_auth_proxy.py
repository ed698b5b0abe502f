"""Proxy authentication with an htpasswd file (issue 10), through a real webproxy process, as real
clients use it: curl --proxy-user / --proxy-anyauth, urllib, HTTP_PROXY=http://user:pw@..., pip,
CONNECT, SOCKS5 username/password, and raw bytes for every malformed Proxy-Authorization."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from tests.auth_support import basic, raw_exchange, status_of, user_cli, user_cli_on_tty, write_htpasswd
from tests.support import ProxyProcess, curl, free_port, package_index, pip_download, run_cli, wait_until

USERS = {"alice": "secret", "bob": "builder", "carol": "c4rol"}
RULES = """
[[auth.rule]]
name = "students"
groups = ["students"]
deny_domains = ["localhost"]
connect_ports = [443]
"""


def start_auth_proxy(tmp, origin_port: int, socks_port: int = 0, **auth) -> ProxyProcess:
    users = write_htpasswd(tmp / "users", USERS)
    (tmp / "groups").write_text("staff: alice\nstudents: bob\n")
    sections = {
        "auth": {"backend": "htpasswd", "realm": "Test Realm", "htpasswd_file": str(users),
                 "groups_file": str(tmp / "groups"), **auth},
        "access": {"connect_ports": [443, origin_port]},
        "refresh": {"enabled": False},
    }
    if socks_port:
        sections["socks"] = {"listen": [f"127.0.0.1:{socks_port}"], "deny_networks": []}
    p = ProxyProcess(tmp, sections)
    with open(p.config_path, "a") as f:
        f.write(RULES)
    return p.start()


@pytest.fixture(scope="module")
def authproxy(tmp_path_factory, origin):
    tmp = tmp_path_factory.mktemp("authproxy")
    socks_port = free_port()
    p = start_auth_proxy(tmp, origin.port, socks_port=socks_port, exempt_clients=["127.0.0.3/32"])
    p.socks_port = socks_port  # type: ignore[attr-defined]
    yield p
    p.stop()


def lines_with(p: ProxyProcess, needle: str, n: int = 1) -> list[str]:
    """The access-log lines holding `needle`, once there are `n` (the log is flushed every second)."""
    assert wait_until(lambda: sum(needle in line for line in p.access_lines()) >= n), p.access_lines()
    return [line for line in p.access_lines() if needle in line]


def last_line(p: ProxyProcess, needle: str) -> str:
    return lines_with(p, needle)[-1]


def fields(line: str) -> list[str]:
    return line.split()


def test_request_without_credentials_gets_407_with_a_basic_challenge(authproxy, origin):
    r = curl("-i", "-x", authproxy.url, origin.url("/text/nocreds"))
    head = r.stdout.decode("latin-1")
    assert head.startswith("HTTP/1.1 407 ")
    assert 'Proxy-Authenticate: Basic realm="Test Realm", charset="UTF-8"' in head
    assert "hello" not in head
    f = fields(last_line(authproxy, "/text/nocreds"))
    assert f[3] == "TCP_DENIED/407" and f[7] == "-"


def test_curl_proxy_user_gets_through_and_the_access_log_names_the_user(authproxy, origin):
    r = curl("-x", authproxy.url, "--proxy-user", "alice:secret", origin.url("/text/alice"))
    assert r.stdout == b"hello alice\n"
    f = fields(last_line(authproxy, "/text/alice"))
    assert f[3] == "TCP_MISS/200" and f[7] == "alice"


def test_curl_proxy_anyauth_answers_the_challenge(authproxy, origin):
    r = curl("-v", "-x", authproxy.url, "--proxy-anyauth", "--proxy-user", "bob:builder", origin.url("/text/anyauth"))
    assert r.stdout == b"hello anyauth\n"
    assert b"< HTTP/1.1 407" in r.stderr  # curl asked without credentials first, then with Basic
    lines = lines_with(authproxy, "/text/anyauth", 2)
    assert [fields(x)[3] for x in lines[-2:]] == ["TCP_DENIED/407", "TCP_MISS/200"]


def test_wrong_password_and_unknown_user_get_407_again(authproxy, origin):
    for user in ("alice:wrong", "mallory:secret"):
        r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", authproxy.url, "--proxy-user", user,
                 origin.url("/text/wrong"))
        assert r.stdout == b"407"
    assert origin.hits["/text/wrong"] == 0


@pytest.mark.parametrize("value", [
    "Basic !!!not-base64",
    "Basic YWxpY2VzZWNyZXQ=",  # "alicesecret": no colon
    "Basic //46c2VjcmV0",  # bytes ff fe before the colon: not UTF-8
    'Digest username="alice", realm="Test Realm"',
    "Basic",
    "Basic " + "A" * 20000,
])
def test_malformed_proxy_authorization_gets_407_and_the_connection_goes_on(authproxy, origin, value):
    request = (f"GET {origin.url('/text/malformed')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Proxy-Authorization: {value}\r\n\r\n").encode()
    # the same connection then serves a request with good credentials
    good = (f"GET {origin.url('/text/after')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Proxy-Authorization: {basic('alice', 'secret')}\r\n\r\n").encode()
    out = raw_exchange(authproxy.port, request + good)
    assert status_of(out) == 407
    assert b"Proxy-Authenticate: Basic" in out
    assert b"Traceback" not in out
    assert origin.hits["/text/malformed"] == 0


def test_a_refused_request_with_a_body_gets_407_and_connection_close(authproxy, origin):
    body = b"x" * 1000
    out = raw_exchange(authproxy.port, f"POST {origin.url('/upload')} HTTP/1.1\r\nHost: x\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert status_of(out) == 407 and b"\r\nConnection: close\r\n" in out
    assert origin.hits["/upload"] == 0


def test_proxy_authorization_is_never_forwarded_to_the_origin(authproxy, origin):
    r = curl("-x", authproxy.url, "--proxy-user", "alice:secret", "-H", "Authorization: Bearer for-the-origin",
             origin.url("/echo/auth"))
    echoed = r.stdout.decode().lower()
    assert "get /echo/auth" in echoed
    assert "proxy-authorization" not in echoed
    assert "authorization: bearer for-the-origin" in echoed  # the origin's own credentials go through


def test_connect_needs_credentials_too(authproxy, origin):
    url = origin.url("/text/tunnelled")
    r = curl("-p", "-x", authproxy.url, url)
    assert r.returncode != 0 and b"hello" not in r.stdout
    assert fields(last_line(authproxy, f"CONNECT 127.0.0.1:{origin.port}"))[3] == "TCP_DENIED/407"
    r = curl("-p", "-x", authproxy.url, "--proxy-user", "alice:secret", url)
    assert r.stdout == b"hello tunnelled\n"
    assert wait_until(lambda: any("TCP_TUNNEL/200" in x and " alice " in x for x in authproxy.access_lines()))


def test_a_cached_object_is_not_served_to_a_client_without_credentials(authproxy, origin):
    url = origin.put("auth-cached", b"cached body\n", Cache_Control="max-age=600")
    assert curl("-x", authproxy.url, "--proxy-user", "alice:secret", url).stdout == b"cached body\n"
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", authproxy.url, url)
    assert r.stdout == b"407"
    assert curl("-x", authproxy.url, "--proxy-user", "carol:c4rol", url).stdout == b"cached body\n"
    f = fields(last_line(authproxy, "/obj/auth-cached"))
    assert f[3] == "TCP_MEM_HIT/200" and f[7] == "carol"
    assert origin.full["auth-cached"] == 1


def test_urllib_proxy_basic_auth_handler(authproxy, origin):
    code = f"""
import urllib.request
pm = urllib.request.HTTPPasswordMgrWithDefaultRealm()
pm.add_password(None, {authproxy.url!r}, "bob", "builder")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{"http": {authproxy.url!r}}}),
                                     urllib.request.ProxyBasicAuthHandler(pm))
print(opener.open({origin.url('/text/urllib')!r}, timeout=10).read().decode(), end="")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout == "hello urllib\n", r.stderr
    assert fields(last_line(authproxy, "/text/urllib"))[7] == "bob"


def test_http_proxy_variable_with_user_and_password(authproxy, origin):
    proxy = f"http://carol:c4rol@127.0.0.1:{authproxy.port}"
    code = f"import urllib.request; print(urllib.request.urlopen({origin.url('/text/env')!r}, timeout=10).read().decode(), end='')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": ""})
    assert r.stdout == "hello env\n", r.stderr
    assert fields(last_line(authproxy, "/text/env"))[7] == "carol"


def test_pip_with_credentials_in_the_proxy_url(authproxy, make_origin, tmp_path):
    o = make_origin()
    name, wheel = package_index(o)
    o.start()
    password = urllib.parse.quote("secret")
    r = pip_download(f"http://alice:{password}@127.0.0.1:{authproxy.port}", o.url("/simple/"), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / name).read_bytes() == wheel
    r = pip_download(authproxy.url, o.url("/simple/"), tmp_path / "without")
    assert r.returncode != 0 and not (tmp_path / "without" / name).exists()


def test_group_rule_refuses_a_known_user_with_403_naming_the_rule(authproxy, origin):
    url = f"http://localhost:{origin.port}/text/rule"
    r = curl("-s", "-w", "\n%{http_code}", "-x", authproxy.url, "--proxy-user", "bob:builder", url)
    body, _, code = r.stdout.decode().rpartition("\n")
    assert code == "403" and 'auth.rule[0] "students"' in body and "bob" in body
    f = fields(last_line(authproxy, "localhost"))
    assert f[3] == "TCP_DENIED/403" and f[7] == "bob"
    # alice (staff) matches no rule: [access] alone, which allows it
    assert curl("-x", authproxy.url, "--proxy-user", "alice:secret", url).stdout == b"hello rule\n"


def test_group_rule_connect_ports(authproxy, origin):
    r = curl("-p", "-v", "-x", authproxy.url, "--proxy-user", "bob:builder", origin.url("/text/x"))
    assert r.returncode != 0 and b"< HTTP/1.1 403" in r.stderr
    r = curl("-p", "-x", authproxy.url, "--proxy-user", "alice:secret", origin.url("/text/x"))
    assert r.stdout == b"hello x\n"


def test_socks5_username_password_uses_the_same_users(authproxy, origin):
    socks = f"127.0.0.1:{authproxy.socks_port}"
    r = curl("--socks5", socks, "--proxy-user", "alice:secret", origin.url("/text/socks"))
    assert r.stdout == b"hello socks\n", r.stderr
    r = curl("--socks5", socks, "--proxy-user", "alice:nope", origin.url("/text/socks"))
    assert r.returncode != 0
    r = curl("--socks5", socks, origin.url("/text/socks"))
    assert r.returncode != 0
    assert origin.hits["/text/socks"] == 1


def test_socks5_exempt_clients_need_no_password_and_wrong_ones_are_logged_per_address(authproxy, origin):
    socks = f"127.0.0.1:{authproxy.socks_port}"
    r = curl("--interface", "127.0.0.3", "--socks5", socks, origin.url("/text/socks-exempt"))
    assert r.stdout == b"hello socks-exempt\n", r.stderr
    r = curl("--interface", "127.0.0.4", "--socks5", socks, origin.url("/text/socks-exempt"))
    assert r.returncode != 0  # not exempt, no password: refused
    r = curl("--interface", "127.0.0.5", "--socks5", socks, "--proxy-user", "alice:Wr0ng-pw-x",
             origin.url("/text/socks-exempt"))
    assert r.returncode != 0
    assert origin.hits["/text/socks-exempt"] == 1
    assert wait_until(lambda: "failed attempt 1 from 127.0.0.5 as user 'alice'" in authproxy.stderr())
    assert "Wr0ng-pw-x" not in authproxy.stderr()  # the password is never logged


def test_exempt_clients_need_no_credentials(authproxy, origin):
    request = f"GET {origin.url('/text/exempt')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert status_of(raw_exchange(authproxy.port, request, source="127.0.0.3")) == 200
    assert status_of(raw_exchange(authproxy.port, request, source="127.0.0.4")) == 407
    lines = lines_with(authproxy, "/text/exempt", 2)
    assert [(fields(x)[2], fields(x)[3], fields(x)[7]) for x in lines] == [
        ("127.0.0.3", "TCP_MISS/200", "-"), ("127.0.0.4", "TCP_DENIED/407", "-")]


def test_the_status_page_needs_no_credentials(authproxy):
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", authproxy.url + "/")
    assert r.stdout == b"200"


def test_revoked_user_is_refused_at_once_after_sighup(origin, tmp_path):
    p = start_auth_proxy(tmp_path, origin.port)
    try:
        assert curl("-x", p.url, "--proxy-user", "carol:c4rol", origin.url("/text/revoke")).stdout == b"hello revoke\n"
        r = run_cli("user", "remove", "carol", "-f", str(tmp_path / "users"))
        assert r.returncode == 0, r.stderr
        p.signal(signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in p.stderr())
        r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", p.url, "--proxy-user", "carol:c4rol",
                 origin.url("/text/revoke"))
        assert r.stdout == b"407"
        # a user added while it runs is seen without a signal (the file's mtime is watched)
        r = user_cli("add", "dave", "--password-stdin", "-f", str(tmp_path / "users"), stdin="d4ve\n")
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: curl("-x", p.url, "--proxy-user", "dave:d4ve", origin.url("/text/dave")).stdout
                          == b"hello dave\n", timeout=5)
    finally:
        p.stop()


def test_repeated_failures_from_one_address_are_slowed_without_slowing_others(origin, tmp_path):
    p = start_auth_proxy(tmp_path, origin.port)
    try:
        started = time.monotonic()
        bad_done: list[float] = []
        bad_status: list[int] = []

        def attacker(i: int) -> None:
            req = (f"GET {origin.url('/text/guess')} HTTP/1.1\r\nHost: x\r\n"
                   f"Proxy-Authorization: {basic('alice', f'guess{i}')}\r\nConnection: close\r\n\r\n").encode()
            bad_status.append(status_of(raw_exchange(p.port, req, source="127.0.0.2", timeout=30)))
            bad_done.append(time.monotonic())

        threads = [threading.Thread(target=attacker, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        # meanwhile an honest client on another address is answered at once, request after request
        good_times = []
        for i in range(10):
            req = (f"GET {origin.url(f'/text/honest{i}')} HTTP/1.1\r\nHost: x\r\n"
                   f"Proxy-Authorization: {basic('bob', 'builder')}\r\nConnection: close\r\n\r\n").encode()
            assert status_of(raw_exchange(p.port, req, source="127.0.0.1")) == 200
            good_times.append(time.monotonic())
        for t in threads:
            t.join(60)
        assert bad_status == [407] * 50
        # the guesses answered last waited for their growing delays; the honest client had long finished
        assert max(bad_done) - started >= 1.5
        assert max(good_times) < max(bad_done) - 0.5
        assert sorted(bad_done)[-10] - started > 1.0  # not one slow outlier: the later ones all wait
        log = p.stderr()
        assert "failed attempt 32 from 127.0.0.2" in log
        assert "127.0.0.1 " not in "".join(line for line in log.splitlines() if "failed attempt" in line)
        assert "guess" not in log and basic("alice", "guess1").split()[1] not in log
    finally:
        p.stop()


def test_non_bcrypt_hash_is_refused_at_start_in_one_line(tmp_path):
    users = tmp_path / "users"
    users.write_text("# users\nalice:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n")
    conf = tmp_path / "p.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n[cache]\nenabled = false\n'
                    f'[auth]\nbackend = "htpasswd"\nhtpasswd_file = "{users}"\n')
    for args in (("run", "-c", str(conf)), ("run", "--check", "-c", str(conf))):
        r = run_cli(*args)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert str(users) in lines[0] and "line 2" in lines[0] and "only bcrypt" in lines[0]


def test_auth_with_transparent_listeners_needs_exempt_clients(tmp_path):
    conf = tmp_path / "p.toml"
    users = write_htpasswd(tmp_path / "users", {"alice": "secret"})
    conf.write_text(f'[transparent]\nlisten = ["127.0.0.1:{free_port()}"]\n'
                    f'[auth]\nbackend = "htpasswd"\nhtpasswd_file = "{users}"\n')
    r = run_cli("run", "--check", "-c", str(conf))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "auth.exempt_clients" in r.stderr
    with open(conf, "a") as f:
        f.write('exempt_clients = ["192.168.0.0/16"]\n')
    assert run_cli("run", "--check", "-c", str(conf)).returncode == 0


def test_user_add_list_remove(tmp_path):
    users = tmp_path / "users"

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return user_cli(*args, stdin=stdin)

    assert cli("add", "alice", "--password-stdin", "-f", str(users), stdin="s3cret\n").returncode == 0
    assert cli("add", "bob", "--password-stdin", "-f", str(users), stdin="other\n").returncode == 0
    line = users.read_text().splitlines()[0]
    assert line.startswith("alice:$2b$") and "s3cret" not in users.read_text()
    assert oct(users.stat().st_mode & 0o777) == "0o640"
    assert cli("list", "-f", str(users)).stdout.split() == ["alice", "bob"]
    r = cli("add", "bad:name", "--password-stdin", "-f", str(users), stdin="x\n")
    assert r.returncode == 2 and "cannot be a user name" in r.stderr
    r = cli("add", "eve", "--password-stdin", "-f", str(users), stdin="\n")
    assert r.returncode == 2 and "empty password" in r.stderr
    assert cli("remove", "alice", "-f", str(users)).returncode == 0
    assert [line.split(":")[0] for line in users.read_text().splitlines()] == ["bob"]
    r = cli("list")
    assert r.returncode == 2 and "-f HTPASSWD" in r.stderr


def test_user_add_asks_for_the_password_twice_without_echo(tmp_path):
    users = tmp_path / "users"
    code, shown = user_cli_on_tty(["add", "zed", "-f", str(users)], ["t0p-secret", "t0p-secret"])
    assert code == 0 and shown.count("Password") == 2 and "t0p-secret" not in shown
    assert users.read_text().startswith("zed:$2b$")
    code, shown = user_cli_on_tty(["add", "amy", "-f", str(users)], ["one", "two"])
    assert code == 2 and "differ" in shown
    assert "amy" not in users.read_text()
