"""Real tools pointed at the proxy the way users point them: pip --proxy, HTTP_PROXY for urllib, and
the origin connect timeout a user would hit with a dead server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.support import curl, package_index, pip_download


def test_pip_download_through_the_proxy_is_cached(make_proxy, make_origin, tmp_path):
    o = make_origin()
    name, wheel = package_index(o)
    o.start()
    p = make_proxy({"refresh": {"enabled": False}})
    for i in range(2):
        dest = tmp_path / f"d{i}"
        r = pip_download(p.url, o.url("/simple/"), dest)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (dest / name).read_bytes() == wheel
    assert o.hits[f"/files/{name}"] == 1  # the second pip got the wheel from the proxy's cache
    assert "TCP_MEM_HIT/200" in "\n".join(p.access_lines(wait_for=4))


def test_http_proxy_environment_variable_with_urllib(proxy, origin):
    code = ("import urllib.request;"
            f"print(urllib.request.urlopen({origin.url('/text/env')!r}, timeout=10).read().decode(), end='')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": ""})
    assert r.stdout == "hello env\n", r.stderr
    assert origin.url("/text/env") in proxy.access_lines(wait_for=1)[-1]


def test_origin_that_never_accepts_gets_504_after_the_connect_timeout(make_proxy):
    # A listener whose accept queue is full: further SYNs are dropped, so connecting times out.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    p = make_proxy({"cache": {"enabled": False}, "upstream": {"connect_timeout": 0.5}})
    r = curl("-x", p.url, "-i", f"http://127.0.0.1:{port}/")
    assert r.stdout.startswith(b"HTTP/1.1 504"), r.stdout
    assert b"timed out connecting to 127.0.0.1" in r.stdout
    for s in fillers:
        s.close()
    srv.close()
