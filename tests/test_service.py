"""Running webproxy as a service, as an admin meets it: log paths checked at start and by --check
(one line, exit 2), SIGHUP that cannot open a new log keeps the old one, the error log with
upstream failures summarised per host and minute, privilege drop seen in /proc, the pid file,
IPv6 loopback, and a second SIGTERM that does not wait for the grace period."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT, curl, free_port, run_cli, wait_until, write_config
from webproxy import config
from webproxy.errorlog import FailureSummary


def base_config(tmp_path: Path, **sections: dict) -> dict:
    conf = {"server": {"listen": [f"127.0.0.1:{free_port()}"]}, "cache": {"directory": str(tmp_path / "cache")}}
    for section, keys in sections.items():
        conf.setdefault(section, {}).update(keys)
    return conf


@pytest.mark.parametrize("check", [False, True], ids=["run", "run --check"])
@pytest.mark.parametrize("key, make_path, expected", [
    ("access_log", lambda t: t / "missing" / "access.log",
     "webproxy: log.access_log: cannot open {p}: the directory {t}/missing does not exist; "
     "create it or change log.access_log"),
    ("error_log", lambda t: t,
     "webproxy: log.error_log: cannot open {p}: it is a directory; give a file path in log.error_log"),
])
def test_unopenable_log_path_is_one_line_exit_2(tmp_path, check, key, make_path, expected):
    path = make_path(tmp_path)
    conf = write_config(tmp_path / "c.toml", base_config(tmp_path, log={key: str(path)}))
    r = run_cli("run", *(["--check"] if check else []), "-c", str(conf))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [expected.format(p=path, t=tmp_path)]


@pytest.mark.parametrize("server, expected", [
    ({"user": "no-such-user-x"},
     "webproxy: server.user: no such user 'no-such-user-x'; create it (useradd --system no-such-user-x) "
     "or change server.user"),
    ({"user": "nobody", "group": "no-such-group-x"},
     "webproxy: server.group: no such group 'no-such-group-x'; create it or change server.group"),
    ({"group": "nogroup"}, "webproxy: server.group is set without server.user; set server.user too"),
])
def test_bad_service_user_is_one_line_exit_2(tmp_path, server, expected):
    conf = write_config(tmp_path / "c.toml", base_config(tmp_path, server=server))
    for args in (["run"], ["run", "--check"]):
        r = run_cli(*args, "-c", str(conf))
        assert (r.returncode, r.stderr.splitlines()) == (2, [expected])


def test_pid_file_in_missing_directory_is_one_line_exit_2(tmp_path):
    pid_file = tmp_path / "run" / "webproxy.pid"
    conf = write_config(tmp_path / "c.toml", base_config(tmp_path, server={"pid_file": str(pid_file)}))
    r = run_cli("run", "--check", "-c", str(conf))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"webproxy: server.pid_file: cannot write {pid_file}: the directory "
                                     f"{tmp_path}/run does not exist or is not writable; create it or change "
                                     "server.pid_file"]
    r = run_cli("run", "-c", str(conf))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"webproxy: server.pid_file: cannot write {pid_file}: No such file or "
                                     "directory; create its directory, make it writable or change server.pid_file"]


def test_pid_file_names_the_running_proxy_and_refuses_a_second_one(make_proxy, tmp_path):
    pid_file = tmp_path / "webproxy.pid"
    p = make_proxy({"server": {"pid_file": str(pid_file)}, "cache": {"enabled": False}})
    assert pid_file.read_text() == f"{p.proc.pid}\n"
    conf = write_config(tmp_path / "second.toml", base_config(tmp_path, server={"pid_file": str(pid_file)}))
    r = run_cli("run", "-c", str(conf))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"webproxy: server.pid_file {pid_file} names process {p.proc.pid}, which is "
                                     "running: is webproxy already running? stop it or choose another "
                                     "server.pid_file"]
    assert p.stop() == 0
    assert not pid_file.exists()


def test_started_as_root_without_user_warns_once_and_serves(proxy, origin):
    assert os.geteuid() == 0, "the tests run as root"
    warnings = [line for line in proxy.stderr().splitlines() if "running as root" in line]
    assert len(warnings) == 1
    assert 'set server.user (e.g. "nobody"' in warnings[0]
    assert curl("-x", proxy.url, origin.url("/text/root")).stdout == b"hello root\n"


def test_start_line_names_config_cache_and_status_page(make_proxy):
    p = make_proxy({"cache": {"capacity": "512 MiB"}})
    line = next(line for line in p.stderr().splitlines() if "listening on" in line)
    assert line.endswith(f"webproxy: listening on 127.0.0.1:{p.port} (pid {p.proc.pid}); config {p.config_path}; "
                         f"cache {p.tmp / 'cache'} (512.0 MiB); status page http://127.0.0.1:{p.port}/")


def test_sighup_with_unopenable_access_log_keeps_the_old_file(make_proxy, origin, tmp_path):
    p = make_proxy({"cache": {"enabled": False}})
    assert curl("-x", p.url, origin.url("/text/before")).returncode == 0
    assert len(p.access_lines(wait_for=1)) == 1
    bad = tmp_path / "no-such-dir" / "access.log"
    text = p.config_path.read_text().replace(f'access_log = "{p.log_path}"', f'access_log = "{bad}"')
    text = text.replace("[server]", "[access]\ndeny_domains = [\"127.0.0.1\"]\n\n[server]", 1)
    p.config_path.write_text(text)
    p.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed" in p.stderr())
    assert (f"reload failed, keeping the running config: log.access_log: cannot open {bad}: the directory "
            f"{bad.parent} does not exist; create it or change log.access_log") in p.stderr()
    assert "Traceback" not in p.stderr()
    # The old file is still written, and the rest of that reload (deny_domains) was not applied.
    r = curl("-x", p.url, origin.url("/text/after"))
    assert r.stdout == b"hello after\n"
    lines = p.access_lines(wait_for=2)
    assert len(lines) == 2 and lines[1].split()[6] == origin.url("/text/after")
    assert not bad.parent.exists()


def test_upstream_failures_are_summarised_per_host_in_the_error_log(make_proxy, tmp_path):
    error_log = tmp_path / "error.log"
    p = make_proxy({"cache": {"enabled": False}, "log": {"error_log": str(error_log)}})
    assert "listening on" in error_log.read_text()  # the start line went to the error log, not stderr
    dead = free_port()  # nothing listens there: every request is a 502
    while time.time() % 60 > 50:  # all requests inside one clock minute
        time.sleep(0.5)
    for i in range(8):
        assert b"502" in curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", p.url,
                              f"http://127.0.0.1:{dead}/page{i}").stdout
    assert len(p.access_lines(wait_for=8)) == 8
    failures = [line for line in error_log.read_text().splitlines() if f"127.0.0.1:{dead}" in line]
    assert len(failures) == 1, failures
    assert f"502 for GET http://127.0.0.1:{dead}/page0: " in failures[0]


def test_failure_summary_writes_the_first_whole_and_one_line_per_host_and_minute():
    s = FailureSummary()
    t0 = 1_800_000_000 - 1_800_000_000 % 60
    assert s.record("a.example", t0 + 1, "502 for GET http://a.example/1: refused") == [
        "502 for GET http://a.example/1: refused"]
    assert s.record("a.example", t0 + 2, "502 for GET http://a.example/2: refused") == []
    assert s.record("b.example", t0 + 3, "504 for GET http://b.example/: timed out") == [
        "504 for GET http://b.example/: timed out"]
    assert s.record("a.example", t0 + 59, "502 for GET http://a.example/3: refused") == []
    assert s.due(t0 + 59.9) == []
    at = time.strftime("%H:%M", time.localtime(t0))
    assert s.due(t0 + 60) == [f"upstream: 2 more failure(s) for a.example in the minute from {at} "
                              "(last: 502 for GET http://a.example/3: refused)"]
    assert s.due(t0 + 61) == []
    # A new minute starts over with a whole line.
    assert s.record("a.example", t0 + 62, "502 for GET http://a.example/4: refused") == [
        "502 for GET http://a.example/4: refused"]


def test_second_sigterm_exits_without_waiting_for_the_grace_period(make_proxy, origin):
    p = make_proxy({"cache": {"enabled": False}, "server": {"grace_period": 30.0}})
    result = {}
    before = origin.hits["/slow"]  # the origin is shared by the whole session
    t = threading.Thread(target=lambda: result.setdefault("r", curl("-x", p.url, origin.url("/slow?s=20"))))
    t.start()
    assert wait_until(lambda: origin.hits["/slow"] > before)
    p.signal(signal.SIGTERM)
    assert wait_until(lambda: "stopping:" in p.stderr())
    assert "stopping: 1 request(s) in flight, waiting up to 30 s for them (send SIGTERM or press Ctrl-C again " \
           "to stop at once)" in p.stderr()
    time.sleep(0.3)
    assert p.proc.poll() is None  # the first one waits for the slow request
    start = time.monotonic()
    p.signal(signal.SIGTERM)
    assert p.proc.wait(5) == 0
    assert time.monotonic() - start < 3
    t.join(10)
    assert result["r"].stdout != b"late\n"


def test_ipv6_loopback_answers_when_listed(make_proxy, origin):
    if not config.ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    p = make_proxy({"cache": {"enabled": False}})
    text = p.config_path.read_text()
    p.stop()
    port = free_port()
    p.config_path.write_text(text.replace(f'listen = ["127.0.0.1:{p.port}"]',
                                          f'listen = ["127.0.0.1:{port}", "[::1]:{port}"]'))
    p.port = port
    p.start()
    assert f"listening on 127.0.0.1:{port}, [::1]:{port}" in p.stderr()
    assert curl("-x", f"http://[::1]:{port}", origin.url("/text/six")).stdout == b"hello six\n"
    assert curl("-x", f"http://127.0.0.1:{port}", origin.url("/text/four")).stdout == b"hello four\n"
    lines = p.access_lines(wait_for=2)
    assert lines[0].split()[2] == "::1"


def _status_ids(pid: int) -> tuple[list[int], list[int]]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = [int(x) for x in value.split()] if key in ("Uid", "Gid", "Groups") else value
    return fields["Uid"], fields["Gid"]


def test_server_user_drops_privileges_after_binding(make_proxy, origin):
    nobody = pwd.getpwnam("nobody")
    # The cache directory must be reachable by nobody (pytest's tmp_path is not).
    base = Path(tempfile.mkdtemp(prefix="webproxy-drop-"))
    base.chmod(0o755)
    try:
        p = make_proxy({"server": {"user": "nobody"}, "cache": {"directory": str(base / "cache")}})
        uid, gid = _status_ids(p.proc.pid)
        assert uid == [nobody.pw_uid] * 4 and gid == [nobody.pw_gid] * 4
        assert "running as root" not in p.stderr()
        assert (base / "cache").stat().st_uid == nobody.pw_uid
        # It still serves, caches (files written as nobody) and answers its own pages.
        url = origin.put("dropped", b"kept", Cache_Control="max-age=60")
        assert curl("-x", p.url, url).stdout == b"kept"
        assert curl("-x", p.url, url).stdout == b"kept"
        assert b"webproxy_requests_total" in curl(p.url + "/metrics").stdout
        owners = {f.stat().st_uid for f in (base / "cache").rglob("*")}
        assert owners == {nobody.pw_uid}
        assert p.stop() == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_cache_directory_of_another_user_is_one_line_exit_2(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="webproxy-drop-"))
    try:
        (base / "cache").mkdir()  # belongs to root
        conf = write_config(tmp_path / "c.toml", base_config(tmp_path, server={"user": "nobody"},
                                                             cache={"directory": str(base / "cache")}))
        r = run_cli("run", "-c", str(conf))
        assert r.returncode == 2
        assert r.stderr.splitlines() == [f"webproxy: cache directory {base}/cache belongs to uid 0, not to "
                                         f"server.user 'nobody'; run: chown -R nobody {base}/cache"]
    finally:
        shutil.rmtree(base, ignore_errors=True)



def test_ctrl_c_with_workers_stops_gracefully_once_and_at_once_the_second_time(make_proxy, origin):
    p = make_proxy({"server": {"workers": 2, "grace_period": 30.0}, "cache": {"enabled": False}})
    children = [int(x) for x in Path(f"/proc/{p.proc.pid}/task/{p.proc.pid}/children").read_text().split()]
    assert len(children) == 2
    assert wait_until(lambda: p.stderr().count("listening on") == 2)  # both workers handle signals now
    before = origin.hits["/slow"]
    t = threading.Thread(target=lambda: curl("-x", p.url, origin.url("/slow?s=20")))
    t.start()
    assert wait_until(lambda: origin.hits["/slow"] > before)

    def ctrl_c() -> None:  # what a terminal does: SIGINT to every process of the foreground group
        for pid in (p.proc.pid, *children):
            with contextlib.suppress(ProcessLookupError):  # the idle worker is gone after the first
                os.kill(pid, signal.SIGINT)

    ctrl_c()
    assert wait_until(lambda: p.stderr().count("stopping:") == 2)  # one line per worker
    time.sleep(0.5)
    assert p.proc.poll() is None and "second stop signal" not in p.stderr()
    start = time.monotonic()
    ctrl_c()
    assert p.proc.wait(5) == 0
    assert time.monotonic() - start < 3
    t.join(10)


def test_systemd_unit_is_valid(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "conf" / "webproxy.service").read_text()
    assert "ExecStart=/usr/local/bin/webproxy run -c /etc/webproxy/webproxy.toml" in unit
    # verify checks that the executables exist: point them at one that does.
    (tmp_path / "webproxy.service").write_text(unit.replace("/usr/local/bin/webproxy", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "webproxy.service")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
