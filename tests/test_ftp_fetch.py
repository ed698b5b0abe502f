"""webproxy.ftp against a real pyftpdlib server on 127.0.0.1 (run in a thread by the fixtures).

The server counts logins, RETR commands and completed transfers, so tests prove what reached it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import socket
import threading
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urljoin

import pytest
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer

from webproxy.ftp import CHUNK, FtpPool, FtpStat, FtpTransferError, fetch, stat

logging.getLogger("pyftpdlib").setLevel(logging.WARNING)

ODD_NAME = "with space ü;x#1.txt"  # spaces, UTF-8, and characters that mean something in URLs
LARGE = 6 * 1024 * 1024 + 123


@dataclass
class Stats:
    logins: list[str] = field(default_factory=list)
    retr: int = 0  # RETR commands received
    sent: int = 0  # files sent completely
    incomplete: int = 0
    live: int = 0
    max_live: int = 0
    disconnects: int = 0
    commands: Counter[str] = field(default_factory=Counter)


class CountingHandler(FTPHandler):
    stats: Stats
    auth_failed_timeout = 0  # pyftpdlib stalls 3 s after a bad password by default

    def pre_process_command(self, line, cmd, arg):
        self.stats.commands[cmd] += 1
        return super().pre_process_command(line, cmd, arg)

    def on_connect(self) -> None:
        self.stats.live += 1
        self.stats.max_live = max(self.stats.max_live, self.stats.live)

    def on_disconnect(self) -> None:
        self.stats.live -= 1
        self.stats.disconnects += 1

    def on_login(self, username: str) -> None:
        self.stats.logins.append(username)

    def ftp_RETR(self, file: str):  # noqa: N802 (pyftpdlib's naming)
        self.stats.retr += 1
        return super().ftp_RETR(file)

    def on_file_sent(self, file: str) -> None:
        self.stats.sent += 1

    def on_incomplete_file_sent(self, file: str) -> None:
        self.stats.incomplete += 1


class ThreadedFtpServer:
    def __init__(self, root: Path, home: Path, **handler_attrs: object) -> None:
        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(str(root))
        authorizer.add_user("alice", "s3cret", str(home), perm="elr")
        self.stats = Stats()
        handler = type("Handler", (CountingHandler,), {"authorizer": authorizer, "stats": self.stats,
                                                       **handler_attrs})
        # Each server needs its own IOLoop: the default is one process-wide instance, and closing
        # it would close every other server's sockets.
        self.server = FTPServer(("127.0.0.1", 0), handler, ioloop=IOLoop())
        self.port = self.server.address[1]
        self.url = f"ftp://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.server.serve_forever(timeout=0.02, blocking=False, handle_exit=False)
        self.server.close_all()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ftproot")
    home = tmp_path_factory.mktemp("alice")
    rnd = hashlib.sha256(b"seed").digest()
    (root / "empty.bin").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello, world\n")
    (root / "medium.bin").write_bytes(os.urandom(300 * 1024 + 7))
    (root / "large.bin").write_bytes(os.urandom(LARGE))
    (root / "text.txt").write_bytes(b"one\ntwo\nthree\n")
    (root / "archive.tar.gz").write_bytes(rnd)
    (root / ODD_NAME).write_bytes("ünïcode body\n".encode())
    (root / "pub" / "nested").mkdir(parents=True)
    (root / "pub" / "readme.txt").write_bytes(b"read me\n")
    (root / "pub" / "nested" / "deep.txt").write_bytes(b"deep\n")
    (root / "pub" / "nested" / "empty dir").mkdir()
    (home / "private.txt").write_bytes(b"alice only\n")
    return {"root": root, "home": home}


@pytest.fixture(scope="module")
def ftpd(tree: dict[str, Path]):
    server = ThreadedFtpServer(tree["root"], tree["home"])
    yield server
    server.stop()


@pytest.fixture
def make_server(tree: dict[str, Path]):
    """A dedicated server with handler attributes changed (older servers, short idle timeouts)."""
    servers = []

    def make(**attrs: object) -> ThreadedFtpServer:
        servers.append(ThreadedFtpServer(tree["root"], tree["home"], **attrs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
async def pool():
    p = FtpPool({"timeout": 10.0, "idle_timeout": 30.0, "max_sessions_per_server": 4})
    yield p
    await p.close()


async def get(url: str, pool: FtpPool, method: str = "GET", headers=None) -> tuple[object, bytes]:
    resp = await fetch(url, method, headers or [], pool)
    try:
        body = b"".join([c async for c in resp.body()])
    finally:
        await resp.aclose()
    return resp, body


async def until(predicate, what: str) -> None:
    """Wait for something the server thread does; generous bound, only to never hang."""
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def basic(user: str, password: str) -> list[tuple[str, str]]:
    return [("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())]


# --- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["empty.bin", "small.txt", "medium.bin", "large.bin"])
async def test_download_is_byte_exact_with_size_type_and_date(ftpd, tree, pool, name):
    resp, body = await get(f"{ftpd.url}/{name}", pool)
    expected = (tree["root"] / name).read_bytes()
    assert resp.status == 200
    assert body == expected
    assert resp.header("Content-Length") == str(len(expected))
    assert resp.header("Content-Type") == ("text/plain" if name.endswith(".txt") else "application/octet-stream")
    mtime = int((tree["root"] / name).stat().st_mtime)
    assert resp.header("Last-Modified") == formatdate(mtime, usegmt=True)
    assert (resp.mdtm is not None and int(resp.mdtm), resp.size) == (mtime, len(expected))


async def test_large_download_streams_in_bounded_chunks(ftpd, tree, pool):
    expected = hashlib.sha256((tree["root"] / "large.bin").read_bytes()).hexdigest()
    digest = hashlib.sha256()
    largest = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        resp = await fetch(f"{ftpd.url}/large.bin", "GET", [], pool)
        async for chunk in resp.body():
            largest = max(largest, len(chunk))
            digest.update(chunk)
        await resp.aclose()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == expected
    assert largest <= CHUNK
    # Buffered whole, the 6 MiB body alone would exceed this; streamed, only a few chunks are alive.
    assert peak < 2 * 1024 * 1024, f"peak traced memory {peak} bytes"


async def test_stalled_reader_does_not_make_the_proxy_buffer_the_file(ftpd, tree, pool):
    resp = await fetch(f"{ftpd.url}/large.bin", "GET", [], pool)
    body = resp.body()
    tracemalloc.start()
    try:
        first = await body.__anext__()
        await asyncio.sleep(0.3)  # the client stops reading; the server keeps trying to send
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rest = b"".join([c async for c in body])
    await resp.aclose()
    assert first + rest == (tree["root"] / "large.bin").read_bytes()
    assert peak < 2 * 1024 * 1024, f"peak traced memory {peak} bytes while stalled"


async def test_head_has_the_get_headers_and_sends_no_retr(ftpd, pool):
    before = ftpd.stats.retr
    head, body = await get(f"{ftpd.url}/medium.bin", pool, "HEAD")
    got, _ = await get(f"{ftpd.url}/medium.bin", pool)
    assert head.status == 200 and body == b""
    assert head.headers == got.headers
    assert ftpd.stats.retr == before + 1  # only the GET


async def test_archive_is_typed_not_content_encoded(ftpd, pool):
    resp, _ = await get(f"{ftpd.url}/archive.tar.gz", pool)
    assert resp.header("Content-Type") == "application/gzip"
    assert resp.header("Content-Encoding") is None


async def test_non_ascii_name_with_url_syntax_characters_downloads(ftpd, tree, pool):
    resp, body = await get(f"{ftpd.url}/{quote(ODD_NAME)}", pool)
    assert (resp.status, body) == (200, (tree["root"] / ODD_NAME).read_bytes())


async def test_type_a_sends_text_with_network_line_ends(ftpd, pool):
    resp, body = await get(f"{ftpd.url}/text.txt;type=a", pool)
    assert resp.status == 200
    assert body == b"one\r\ntwo\r\nthree\r\n"
    assert resp.header("Content-Length") is None  # SIZE counts stored bytes, not what ASCII mode sends
    assert resp.header("Content-Type") == "text/plain"


async def test_if_modified_since_not_older_than_mdtm_gives_304_without_retr(ftpd, tree, pool):
    mtime = int((tree["root"] / "small.txt").stat().st_mtime)
    before = ftpd.stats.retr
    resp, body = await get(f"{ftpd.url}/small.txt", pool,
                           headers=[("If-Modified-Since", formatdate(mtime, usegmt=True))])
    assert (resp.status, body) == (304, b"")
    assert ftpd.stats.retr == before
    resp, _ = await get(f"{ftpd.url}/small.txt", pool,
                        headers=[("If-Modified-Since", formatdate(mtime - 10, usegmt=True))])
    assert resp.status == 200


# --- directories -------------------------------------------------------------------------------


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs)["href"]

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((self._href, data))
            self._href = None


async def test_every_listing_link_leads_somewhere_that_fetches(ftpd, tree, pool):
    seen: dict[str, int] = {}
    todo = [f"{ftpd.url}/"]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        resp, body = await get(url, pool)
        seen[url] = resp.status
        assert resp.status == 200, url
        if url.endswith("/"):
            assert resp.header("Content-Type") == "text/html; charset=utf-8"
            parser = Links()
            parser.feed(body.decode())
            todo.extend(urljoin(url, href) for href, _ in parser.links)
        else:
            rel = url[len(ftpd.url) + 1:]
            assert body == (tree["root"] / unquote(rel)).read_bytes()
    files = {u for u in seen if not u.endswith("/")}
    assert f"{ftpd.url}/{quote(ODD_NAME, safe='')}" in files
    assert f"{ftpd.url}/pub/nested/deep.txt" in files
    assert f"{ftpd.url}/pub/nested/empty%20dir/" in seen
    assert ftpd.stats.incomplete == 0


async def test_listing_shows_names_sizes_dates_and_a_parent_link(ftpd, pool):
    _, body = await get(f"{ftpd.url}/", pool)
    root_links = Links()
    root_links.feed(body.decode())
    assert ("../", "Parent directory") not in root_links.links  # nothing above the URL's root
    assert (quote(ODD_NAME, safe=""), ODD_NAME) in root_links.links
    assert ("pub/", "pub/") in root_links.links
    page = body.decode()
    assert "300.0 KiB" in page and 'title="307207 bytes"' in page
    _, body = await get(f"{ftpd.url}/pub/nested/", pool)
    parser = Links()
    parser.feed(body.decode())
    assert parser.links[0] == ("../", "Parent directory")
    assert ("empty%20dir/", "empty dir/") in parser.links


async def test_directory_without_slash_redirects_to_slash_form(ftpd, pool):
    resp, _ = await get(f"{ftpd.url}/pub/nested", pool)
    assert resp.status == 301
    assert resp.header("Location") == f"{ftpd.url}/pub/nested/"
    resp, _ = await get(f"ftp://alice:s3cret@127.0.0.1:{ftpd.port}/", pool)
    assert resp.status == 200


async def test_type_d_lists_plain_names(ftpd, pool):
    resp, body = await get(f"{ftpd.url}/pub;type=d", pool)
    assert resp.status == 200
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert body == b"nested\nreadme.txt\n"


async def test_head_on_a_directory_is_200_html_without_listing_it(ftpd, pool):
    before = ftpd.stats.commands["MLSD"] + ftpd.stats.commands["LIST"]
    resp, body = await get(f"{ftpd.url}/pub/", pool, "HEAD")
    assert resp.status == 200 and body == b""
    assert resp.header("Content-Type") == "text/html; charset=utf-8"
    assert resp.header("Content-Length") is None  # a streamed listing's length is unknown up front
    assert ftpd.stats.commands["MLSD"] + ftpd.stats.commands["LIST"] == before


# --- errors ------------------------------------------------------------------------------------


async def test_missing_file_and_directory_are_404(ftpd, pool):
    resp, body = await get(f"{ftpd.url}/no-such-file.txt", pool)
    assert resp.status == 404 and b"550" in body
    resp, _ = await get(f"{ftpd.url}/no-such-dir/", pool)
    assert resp.status == 404
    head, _ = await get(f"{ftpd.url}/no-such-file.txt", pool, "HEAD")
    assert head.status == 404


async def test_refused_anonymous_login_prompts_for_credentials(ftpd):
    pool = FtpPool({"anonymous_user": "nobody", "timeout": 10.0})
    try:
        resp, body = await get(f"{ftpd.url}/small.txt", pool)
    finally:
        await pool.close()
    assert resp.status == 401
    assert resp.header("WWW-Authenticate") == f'Basic realm="ftp://127.0.0.1:{ftpd.port}"'
    assert b"530" in body


async def test_bad_password_from_header_is_401_and_from_url_is_403(ftpd, pool):
    resp, _ = await get(f"{ftpd.url}/private.txt", pool, headers=basic("alice", "wrong"))
    assert resp.status == 401 and resp.header("WWW-Authenticate")
    resp, body = await get(f"ftp://alice:wrong@127.0.0.1:{ftpd.port}/private.txt", pool)
    assert resp.status == 403 and resp.header("WWW-Authenticate") is None
    assert b"wrong" not in body  # the password is never echoed


async def test_credentials_from_url_and_from_authorization_header(ftpd, pool):
    resp, body = await get(f"ftp://alice:s3cret@127.0.0.1:{ftpd.port}/private.txt", pool)
    assert (resp.status, body) == (200, b"alice only\n")
    resp, body = await get(f"{ftpd.url}/private.txt", pool, headers=basic("alice", "s3cret"))
    assert (resp.status, body) == (200, b"alice only\n")
    # A URL naming the user takes the password from the header (the browser's answer to a 401).
    resp, body = await get(f"ftp://alice@127.0.0.1:{ftpd.port}/private.txt", pool,
                           headers=basic("ignored", "s3cret"))
    assert (resp.status, body) == (200, b"alice only\n")
    # Percent-encoded credentials are decoded.
    resp, _ = await get(f"ftp://%61lice:s3%63ret@127.0.0.1:{ftpd.port}/private.txt", pool)
    assert resp.status == 200
    assert "alice" in ftpd.stats.logins


async def test_closed_port_is_502(pool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    resp, body = await get(f"ftp://127.0.0.1:{port}/x", pool)
    assert resp.status == 502 and b"cannot connect" in body


async def test_server_that_never_greets_is_504():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)  # connections complete in the backlog; nothing is ever sent
        pool = FtpPool({"timeout": 0.3})
        try:
            resp, _ = await get(f"ftp://127.0.0.1:{listener.getsockname()[1]}/x", pool)
        finally:
            await pool.close()
    assert resp.status == 504


async def test_pool_resolver_replaces_dns_and_its_failure_is_502(ftpd):
    async def resolve(host: str, port: int) -> str:
        if host == "ftp.example.test":
            return "127.0.0.1"
        raise OSError(f"{host}: name does not resolve")

    pool = FtpPool({"timeout": 10.0}, resolve=resolve)
    try:
        resp, body = await get(f"ftp://ftp.example.test:{ftpd.port}/small.txt", pool)
        assert (resp.status, body) == (200, b"hello, world\n")
        resp, body = await get(f"ftp://nowhere.example.test:{ftpd.port}/small.txt", pool)
        assert resp.status == 502 and b"does not resolve" in body
    finally:
        await pool.close()


async def test_methods_other_than_get_and_head_are_405(ftpd, pool):
    resp, _ = await get(f"{ftpd.url}/small.txt", pool, "PUT")
    assert resp.status == 405 and resp.header("Allow") == "GET, HEAD"


async def test_bad_type_is_400(ftpd, pool):
    resp, _ = await get(f"{ftpd.url}/small.txt;type=x", pool)
    assert resp.status == 400


# --- sessions ----------------------------------------------------------------------------------


async def test_sequential_fetches_reuse_one_login(make_server, pool):
    server = make_server()
    for name in ("small.txt", "medium.bin", "pub/", "small.txt"):
        resp, _ = await get(f"{server.url}/{name}", pool)
        assert resp.status == 200
    assert server.stats.logins == ["anonymous"]
    assert server.stats.commands["TYPE"] == 1  # the session remembers its transfer type
    assert server.stats.commands["EPSV"] == 4


async def test_other_user_gets_own_session(make_server, pool):
    server = make_server()
    await get(f"{server.url}/small.txt", pool)
    await get(f"{server.url}/private.txt", pool, headers=basic("alice", "s3cret"))
    await get(f"{server.url}/small.txt", pool)
    assert sorted(server.stats.logins) == ["alice", "anonymous"]


async def test_session_limit_makes_extra_requests_wait(make_server, tree):
    server = make_server()
    pool = FtpPool({"max_sessions_per_server": 1, "timeout": 10.0})
    try:
        first = await fetch(f"{server.url}/medium.bin", "GET", [], pool)  # holds the only session
        second = asyncio.create_task(get(f"{server.url}/small.txt", pool))
        await until(lambda: pool.stats()[f"127.0.0.1:{server.port}"]["waiting"] == 1, "second request queued")
        assert server.stats.max_live == 1
        assert b"".join([c async for c in first.body()]) == (tree["root"] / "medium.bin").read_bytes()
        await first.aclose()
        resp, body = await second
        assert (resp.status, body) == (200, b"hello, world\n")
        assert server.stats.logins == ["anonymous"]  # the freed session was handed over
        assert server.stats.max_live == 1
    finally:
        await pool.close()


async def test_idle_session_of_another_user_makes_room_at_the_limit(make_server):
    server = make_server()
    pool = FtpPool({"max_sessions_per_server": 1, "timeout": 10.0})
    try:
        await get(f"{server.url}/small.txt", pool)  # leaves an idle anonymous session
        resp, body = await get(f"{server.url}/private.txt", pool, headers=basic("alice", "s3cret"))
        assert (resp.status, body) == (200, b"alice only\n")
    finally:
        await pool.close()
    assert server.stats.logins == ["anonymous", "alice"]


async def test_request_cancelled_while_queued_leaves_the_pool_usable(make_server):
    server = make_server()
    pool = FtpPool({"max_sessions_per_server": 1, "timeout": 10.0})
    key = f"127.0.0.1:{server.port}"
    try:
        first = await fetch(f"{server.url}/small.txt", "GET", [], pool)
        queued = asyncio.create_task(fetch(f"{server.url}/small.txt", "GET", [], pool))
        await until(lambda: pool.stats()[key]["waiting"] == 1, "request queued")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool.stats()[key]["waiting"] == 0
        assert b"".join([c async for c in first.body()]) == b"hello, world\n"
        await first.aclose()
        resp, body = await get(f"{server.url}/small.txt", pool)
        assert (resp.status, body) == (200, b"hello, world\n")
    finally:
        await pool.close()
    assert server.stats.logins == ["anonymous"]


async def test_concurrent_requests_never_exceed_the_limit(make_server):
    server = make_server()
    pool = FtpPool({"max_sessions_per_server": 2, "timeout": 10.0})
    try:
        results = await asyncio.gather(*(get(f"{server.url}/medium.bin", pool) for _ in range(6)))
    finally:
        await pool.close()
    assert all(r.status == 200 for r, _ in results)
    assert server.stats.max_live <= 2
    assert server.stats.sent == 6


async def test_abandoned_transfer_discards_the_session(make_server, pool):
    server = make_server()
    resp = await fetch(f"{server.url}/large.bin", "GET", [], pool)
    it = resp.body()
    await it.__anext__()
    await resp.aclose()
    resp, body = await get(f"{server.url}/small.txt", pool)
    assert body == b"hello, world\n"
    assert server.stats.logins == ["anonymous", "anonymous"]


async def test_idle_session_closes_after_idle_timeout(make_server):
    server = make_server()
    pool = FtpPool({"idle_timeout": 0.05, "timeout": 10.0})
    try:
        await get(f"{server.url}/small.txt", pool)
        await until(lambda: server.stats.disconnects == 1, "idle session closed")
        await get(f"{server.url}/small.txt", pool)
    finally:
        await pool.close()
    assert server.stats.logins == ["anonymous", "anonymous"]


async def test_session_dropped_by_server_is_replaced_transparently(make_server, pool):
    server = make_server(timeout=0.3)  # pyftpdlib's idle timeout for control connections
    await get(f"{server.url}/small.txt", pool)
    await until(lambda: server.stats.disconnects == 1, "server dropped the idle session")
    resp, body = await get(f"{server.url}/small.txt", pool)
    assert (resp.status, body) == (200, b"hello, world\n")
    assert server.stats.logins == ["anonymous", "anonymous"]


async def test_pool_close_quits_idle_sessions(make_server):
    server = make_server()
    pool = FtpPool({"timeout": 10.0})
    await get(f"{server.url}/small.txt", pool)
    await pool.close()
    await until(lambda: server.stats.live == 0, "server saw the session end")
    resp, _ = await get(f"{server.url}/small.txt", pool)
    assert resp.status == 503


async def test_epsv_refused_falls_back_to_pasv(make_server, tree, pool):
    cmds = {k: v for k, v in FTPHandler.proto_cmds.items() if k != "EPSV"}
    server = make_server(proto_cmds=cmds)
    for _ in range(2):
        resp, body = await get(f"{server.url}/medium.bin", pool)
        assert body == (tree["root"] / "medium.bin").read_bytes()
    resp, body = await get(f"{server.url}/pub/", pool)
    assert resp.status == 200 and b"readme.txt" in body
    # EPSV was tried once; the session remembered the refusal and used PASV for all three transfers.
    assert (server.stats.commands["EPSV"], server.stats.commands["PASV"]) == (1, 3)


async def test_mlsd_refused_falls_back_to_list(make_server, pool):
    cmds = {k: v for k, v in FTPHandler.proto_cmds.items() if k != "MLSD"}
    server = make_server(proto_cmds=cmds)
    resp, body = await get(f"{server.url}/pub/", pool)
    parser = Links()
    parser.feed(body.decode())
    assert ("nested/", "nested/") in parser.links and ("readme.txt", "readme.txt") in parser.links
    resp, body = await get(f"{server.url}/;type=d", pool)
    assert ODD_NAME.encode() in body.splitlines()
    assert (server.stats.commands["MLSD"], server.stats.commands["LIST"]) == (1, 2)


# --- revalidation ------------------------------------------------------------------------------


async def test_stat_reports_mdtm_and_size_without_retr_and_sees_a_change(ftpd, tree, pool):
    path = tree["root"] / "changing.txt"
    path.write_bytes(b"version 1\n")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    before = ftpd.stats.retr
    first = await stat(f"{ftpd.url}/changing.txt", [], pool)
    assert first == FtpStat(1_700_000_000.0, 10)
    path.write_bytes(b"version two\n")
    os.utime(path, (1_700_000_500, 1_700_000_500))
    second = await stat(f"{ftpd.url}/changing.txt", [], pool)
    assert second == FtpStat(1_700_000_500.0, 12)
    assert ftpd.stats.retr == before
    missing = await stat(f"{ftpd.url}/gone.txt", [], pool)
    assert not isinstance(missing, FtpStat) and missing.status == 404
    resp, body = await get(f"{ftpd.url}/changing.txt", pool)
    assert body == b"version two\n"
    assert parsedate_to_datetime(resp.header("Last-Modified")).timestamp() == 1_700_000_500


async def test_file_shorter_than_announced_raises_instead_of_ending_quietly(make_server, tree, pool):
    path = tree["root"] / "shrinking.bin"
    path.write_bytes(b"x" * 100_000)

    def shrinking_retr(self, file):  # the file shrinks between our SIZE and our RETR
        Path(file).write_bytes(b"x" * 10)
        return CountingHandler.ftp_RETR(self, file)

    server = make_server(ftp_RETR=shrinking_retr)
    resp = await fetch(f"{server.url}/shrinking.bin", "GET", [], pool)
    assert resp.header("Content-Length") == "100000"
    with pytest.raises(FtpTransferError, match="10 of the 100000"):
        async for _ in resp.body():
            pass
    await resp.aclose()
    resp, body = await get(f"{server.url}/shrinking.bin", pool)
    assert (resp.status, body) == (200, b"x" * 10)
