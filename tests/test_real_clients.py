"""Real tools pointed at the proxy the way users point them: pip --proxy, HTTP_PROXY for urllib, and
the origin connect timeout a user would hit with a dead server."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

from aiohttp import web

from tests.support import curl, tiny_wheel


def test_pip_download_through_the_proxy_is_cached(make_proxy, make_origin, tmp_path):
    name, wheel = tiny_wheel()
    sha = hashlib.sha256(wheel).hexdigest()
    o = make_origin()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f'<a href="/files/{name}#sha256={sha}">{name}</a>', content_type="text/html",
                            headers={"Cache-Control": "max-age=600"})

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=wheel, content_type="application/octet-stream",
                            headers={"Cache-Control": "max-age=86400"})

    o.route("GET", "/simple/webproxy-probe/", index)
    o.route("GET", f"/files/{name}", file)
    o.start()
    p = make_proxy({"refresh": {"enabled": False}})
    for i in range(2):
        dest = tmp_path / f"d{i}"
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--proxy", p.url,
                            "--index-url", o.url("/simple/"), "--trusted-host", "127.0.0.1", "-d", str(dest),
                            "webproxy-probe"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""})
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
