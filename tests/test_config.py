"""Configuration and lifecycle as an admin meets them: the documented defaults, one-line errors with
exit code 2, graceful shutdown, SIGHUP reload."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import tomllib

import pytest

from tests.support import ROOT, RawClient, curl, free_port, run_cli, write_config
from webproxy import config


def test_documented_config_equals_embedded_defaults():
    data = tomllib.loads((ROOT / "conf" / "webproxy.toml").read_text())
    documented = config.from_dict(data).flat()
    defaults = config.load(None).flat()
    documented.pop("cache.directory")
    defaults.pop("cache.directory")
    if not config.ipv6_loopback():  # the documented default names [::1]:3128, kept only where IPv6 exists
        documented.pop("server.listen")
        defaults.pop("server.listen")
    assert documented == defaults
    for section, keys in config.SCHEMA.items():
        text = (ROOT / "conf" / "webproxy.toml").read_text()
        for key in keys:
            assert f"{key} = " in text, f"{section}.{key} is not documented in conf/webproxy.toml"


def test_defaults_listen_on_loopback_3128_only():
    cfg = config.load(None)
    expected = [("127.0.0.1", 3128)]
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):  # this machine has IPv6
        expected.append(("::1", 3128))
    assert cfg.server["listen"] == expected
    assert [str(n) for n in cfg.access["allow_clients"]] == ["127.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[server]\nlisen = ['127.0.0.1:1']\n", "unknown key 'server.lisen'"),
        ("[sever]\n", "unknown section [sever]"),
        ("[server]\nidle_timeout = 'soon'\n", "'server.idle_timeout': expected a number"),
        ("[server]\nlisten = ['127.0.0.1']\n", "'server.listen': '127.0.0.1' is not \"host:port\""),
        ("[access]\nallow_clients = ['10.0.0.0/99']\n", "'access.allow_clients': '10.0.0.0/99' is not a network"),
        ("[cache]\ncapacity = 'lots'\n", "'cache.capacity': 'lots' is not a size"),
        ("[server\n", "is not valid TOML"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    r = run_cli("run", "-c", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert expected in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_config_file_is_one_line_exit_2(tmp_path):
    r = run_cli("run", "-c", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line_exit_2(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    path = write_config(tmp_path / "c.toml", {"server": {"listen": [f"127.0.0.1:{port}"]},
                                               "cache": {"directory": str(tmp_path / "c")}})
    r = run_cli("run", "-c", str(path))
    s.close()
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unwritable_cache_directory_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = write_config(tmp_path / "c.toml", {"server": {"listen": [f"127.0.0.1:{free_port()}"]},
                                               "cache": {"directory": str(blocker / "cache")}})
    r = run_cli("run", "-c", str(path))
    assert r.returncode == 2
    assert "cache directory" in r.stderr and "not writable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_check_flag_validates_without_starting(tmp_path):
    path = write_config(tmp_path / "c.toml", {"server": {"listen": ["127.0.0.1:1"]}})
    r = run_cli("run", "--check", "-c", str(path))
    assert r.returncode == 0 and "valid" in r.stdout


def test_sigterm_lets_inflight_request_finish_then_exits_0(proxy, origin):
    result = {}

    def fetch() -> None:
        result["r"] = curl("-x", proxy.url, origin.url("/slow?s=1.5"))

    t = threading.Thread(target=fetch)
    t.start()
    time.sleep(0.5)
    proxy.signal(signal.SIGTERM)
    t.join(20)
    assert result["r"].stdout == b"late\n"
    assert proxy.proc.wait(15) == 0
    # and it no longer accepts
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), 1).close()


def test_sigterm_closes_idle_keepalive_connections(proxy, origin):
    c = RawClient(proxy.port)
    c.send(f"GET {origin.url('/text/idle')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    c.response()
    proxy.signal(signal.SIGTERM)
    assert c.closed_by_peer(wait=10)
    assert proxy.proc.wait(15) == 0


def test_sighup_reloads_access_rules_without_dropping_connections(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}})
    c = RawClient(p.port)
    c.send(f"GET {origin.url('/text/before')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert c.response()[0].status_code == 200
    text = p.config_path.read_text().replace("[server]", "[access]\ndeny_domains = [\"127.0.0.1\"]\n\n[server]", 1)
    text = text.replace('listen = ["127.0.0.1:', 'listen = ["127.0.0.1:1", "127.0.0.1:', 1)
    p.config_path.write_text(text)
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in p.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "server.listen changed; restart webproxy to apply" in p.stderr()
    c.send(f"GET {origin.url('/text/after')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    resp, body = c.response()
    assert resp.status_code == 403 and b"deny list" in body
    assert p.proc.poll() is None


def test_sighup_with_broken_config_keeps_running_config(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}})
    p.config_path.write_text("[server]\nbogus = 1\n")
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed" not in p.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "unknown key 'server.bogus'" in p.stderr()
    assert curl("-x", p.url, origin.url("/text/still")).stdout == b"hello still\n"
