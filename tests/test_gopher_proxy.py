"""gopher:// URLs through the running proxy, against a real gopher server: Debian's gophernicus
(an inetd-style server) behind `socat TCP-LISTEN:...,fork EXEC:...`. Requests are written raw and
the answers read with h11, as a browser configured with an HTTP proxy for gopher would send them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from html import unescape
from pathlib import Path

import pytest

from tests.support import RawClient, free_port, header

GOPHERNICUS = shutil.which("gophernicus") or "/usr/sbin/gophernicus"
# No "?" in a name: gophernicus reads it as the start of a CGI query string, even in its own links.
HOSTILE = ['<script>alert(1)<.script>.txt', 'quote"and\'amp&.txt', "sp ace;semi#hash%25+plus.txt"]


class Gophernicus:
    """gophernicus serving `root` on 127.0.0.1:port, one process per connection (socat fork);
    `requests()` counts the lines of its access log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.log = root.parent / "gopher.log"
        self.log.touch()
        self.log.chmod(0o666)
        cmd = f"{GOPHERNICUS} -h 127.0.0.1 -p {self.port} -r {root} -nv -nf -l {self.log}"
        # gophernicus refuses to run as root: socat drops to nobody for each connection. nofork:
        # gophernicus gets the socket itself; through socat's relay pipes it answered nothing to
        # 3-25% of requests (measured: 10 of 300 back to back, 53 of 200 sent 50 ms after connect).
        su = ",su=nobody" if os.geteuid() == 0 else ""
        self.proc = subprocess.Popen(["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
                                      f"EXEC:{cmd}{su},nofork"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "socat/gophernicus did not start"
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"gopher://127.0.0.1:{self.port}"

    def requests(self) -> int:
        """Lines in the access log once it has stopped growing: each connection's gophernicus
        writes its line as it exits, a moment after the answer."""
        count = -1
        while True:
            time.sleep(0.3)
            now = len(self.log.read_text().splitlines())
            if now == count:
                return now
            count = now

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def gopherd(origin):
    if not os.path.exists(GOPHERNICUS) or not shutil.which("socat"):
        pytest.skip("needs gophernicus and socat (tests/run.sh installs them)")
    # Outside pytest's private tmp: the server runs as nobody and must read the tree.
    base = Path(tempfile.mkdtemp(prefix="webproxy-gopher-"))
    base.chmod(0o755)
    try:
        root = base / "root"
        (root / "sub").mkdir(parents=True)
        (root / "odd").mkdir()
        (root / "cgi-bin").mkdir()
        (root / "hello.txt").write_bytes(b"hello gopher\r\n")
        (root / "blob.bin").write_bytes(os.urandom(300 * 1024 + 7))
        (root / "pic.gif").write_bytes(b"GIF89a" + os.urandom(5000))
        (root / "sub" / "deep.txt").write_bytes(b"deep\r\n")
        for name in HOSTILE:
            (root / "odd" / name).write_bytes(name.encode() + b"\r\n")
        search = root / "cgi-bin" / "search"
        search.write_text("#!/bin/sh\nprintf 'iYou searched for: %s\\tfake\\t(NULL)\\t0\\r\\n' \"$SEARCHREQUEST\"\n")
        search.chmod(0o755)
        server = Gophernicus(root)
        p = server.port
        (root / "gophermap").write_text(
            "iWelcome to <b>the</b> & test server\tfake\t(NULL)\t0\r\n"
            f"1Sub directory\t/sub/\t127.0.0.1\t{p}\r\n"
            f"1Odd names\t/odd/\t127.0.0.1\t{p}\r\n"
            f"0Hello text\t/hello.txt\t127.0.0.1\t{p}\r\n"
            f"9A binary\t/blob.bin\t127.0.0.1\t{p}\r\n"
            f"gA picture\t/pic.gif\t127.0.0.1\t{p}\r\n"
            f"7Search this server\t/cgi-bin/search\t127.0.0.1\t{p}\r\n"
            f"hA web page\tURL:http://127.0.0.1:{origin.port}/text/web\t127.0.0.1\t{p}\r\n"
            f"1<img src=x onerror=alert(1)>\t/sub/\t127.0.0.1\t{p}\r\n")
        for path in [base, *base.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def gproxy(tmp_path_factory):
    from tests.support import ProxyProcess

    p = ProxyProcess(tmp_path_factory.mktemp("gproxy"), {"refresh": {"enabled": False},
                                                         "gopher": {"timeout": 2.0}}).start()
    yield p
    p.stop()


def get(proxy, url: str, method: str = "GET") -> tuple[int, object, bytes]:
    c = RawClient(proxy.port)
    try:
        c.send(f"{method} {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp, body = c.response(method.encode())
        return resp.status_code, resp, body
    finally:
        c.close()


def links(page: bytes) -> list[str]:
    return [unescape(h) for h in re.findall(r'href="([^"]*)"', page.decode())]


def test_menu_becomes_html_whose_links_all_work(gproxy, gopherd, origin):
    status, resp, page = get(gproxy, f"{gopherd.url}/")
    assert status == 200 and header(resp, "content-type").startswith("text/html")
    text = page.decode()
    assert "Welcome to &lt;b&gt;the&lt;/b&gt; &amp; test server" in text  # info line, escaped
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    hrefs = links(page)
    assert f"{gopherd.url}/1/sub/" in hrefs and f"{gopherd.url}/9/blob.bin" in hrefs
    assert f"http://127.0.0.1:{origin.port}/text/web" in hrefs  # an h item with URL: links out
    for href in hrefs:
        status, _, body = get(gproxy, href + ("?gopher" if "/7/" in href else ""))
        assert status == 200, href
    assert get(gproxy, f"{gopherd.url}/0/hello.txt")[2] == b"hello gopher\r\n"


def test_hostile_names_are_escaped_and_their_links_fetch_the_right_file(gproxy, gopherd):
    status, _, page = get(gproxy, f"{gopherd.url}/1/odd/")
    assert status == 200
    assert "<script>" not in page.decode()
    hrefs = [h for h in links(page) if "/odd/" in h]
    assert len(hrefs) == len(HOSTILE)
    got = {get(gproxy, h)[2] for h in hrefs}
    assert got == {name.encode() + b"\r\n" for name in HOSTILE}


def test_binary_is_byte_exact_and_typed(gproxy, gopherd):
    status, resp, body = get(gproxy, f"{gopherd.url}/9/blob.bin")
    assert status == 200 and body == (gopherd.root / "blob.bin").read_bytes()
    assert header(resp, "content-type") == "application/octet-stream"
    status, resp, body = get(gproxy, f"{gopherd.url}/g/pic.gif")
    assert body == (gopherd.root / "pic.gif").read_bytes() and header(resp, "content-type") == "image/gif"


def test_second_fetch_is_a_cache_hit(gproxy, gopherd):
    url = f"{gopherd.url}/1/sub/"
    first = get(gproxy, url)
    assert first[0] == 200
    before = gopherd.requests()
    status, resp, body = get(gproxy, url)
    assert status == 200 and body == first[2]
    assert header(resp, "x-cache").startswith("HIT")
    assert gopherd.requests() == before  # the gopher server saw nothing
    line = gproxy.access_lines(wait_for=1)[-1]
    assert "TCP_MEM_HIT/200" in line and f" GET {url} " in line
    binary = f"{gopherd.url}/9/blob.bin"
    get(gproxy, binary)
    before = gopherd.requests()
    status, resp, body = get(gproxy, binary)
    assert body == (gopherd.root / "blob.bin").read_bytes() and header(resp, "x-cache").startswith("HIT")
    assert gopherd.requests() == before


def test_search_takes_the_words_after_question_mark_or_tab(gproxy, gopherd):
    for url in (f"{gopherd.url}/7/cgi-bin/search?two+words", f"{gopherd.url}/7/cgi-bin/search%09two%20words",
                f"{gopherd.url}/7/cgi-bin/search?search=two+words"):
        status, _, page = get(gproxy, url)
        assert status == 200 and "You searched for: two words" in page.decode(), url
    status, _, page = get(gproxy, f"{gopherd.url}/7/cgi-bin/search")
    assert status == 200 and '<input name="search"' in page.decode()  # no words yet: a form


def test_missing_selector_is_404_with_the_servers_words(gproxy, gopherd):
    status, resp, body = get(gproxy, f"{gopherd.url}/1/nope/")
    assert status == 404 and b"not found" in body.lower()
    assert header(resp, "content-type").startswith("text/plain")


def test_unreachable_gopher_server_is_502_and_a_silent_one_504(gproxy):
    status, _, body = get(gproxy, "gopher://127.0.0.1:9/")
    assert status == 502 and b"cannot reach gopher server" in body
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    try:
        start = time.monotonic()
        status, _, body = get(gproxy, f"gopher://127.0.0.1:{silent.getsockname()[1]}/0/x")
        assert status == 504 and b"gopher.timeout" in body
        assert time.monotonic() - start < 10
    finally:
        silent.close()


def test_bad_gopher_requests(gproxy, gopherd):
    assert get(gproxy, f"{gopherd.url}/0/a%0D%0Ab")[0] == 400  # CR LF would end the selector early
    assert get(gproxy, f"{gopherd.url}/0/hello.txt", "POST")[0] == 405
    status, resp, body = get(gproxy, f"{gopherd.url}/0/hello.txt", "HEAD")
    assert status == 200 and body == b""


def test_domain_filter_applies_to_gopher(make_proxy, gopherd):
    p = make_proxy({"access": {"deny_domains": ["127.0.0.1"]}})
    status, _, body = get(p, f"{gopherd.url}/")
    assert status == 403 and b"blocked" in body


def test_an_answer_ending_in_its_dot_line_is_complete_even_if_the_server_keeps_the_connection(gproxy):
    # RFC 1436 section 3.8: the "." line ends a menu or a text; some servers then wait for the client.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            held.append(c)
            selector = c.recv(1024)
            if selector.startswith(b"/menu"):
                c.sendall(b"0Text\t/text\t127.0.0.1\t%d\r\n.\r\n" % srv.getsockname()[1])
            else:
                c.sendall(b"some text\r\n.\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        # Waiting for the close instead would end in gopher.timeout: a 504, or a cut-off text.
        status, _, page = get(gproxy, f"gopher://127.0.0.1:{srv.getsockname()[1]}/1/menu")
        assert status == 200 and b">Text</a>" in page
        status, _, body = get(gproxy, f"gopher://127.0.0.1:{srv.getsockname()[1]}/0/text")
        assert status == 200 and body == b"some text\r\n"
    finally:
        srv.close()
        for c in held:
            c.close()
