"""ftp:// URLs through the running proxy, with curl as the client and a real pyftpdlib server."""

from __future__ import annotations

import hashlib
import os
import re
import time

import pytest

from tests.support import curl
from tests.test_ftp_fetch import ThreadedFtpServer


@pytest.fixture(scope="module")
def ftp_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftproot")
    home = tmp_path_factory.mktemp("home")
    (root / "pub" / "sub").mkdir(parents=True)
    (root / "pub" / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    (root / "pub" / "notes.txt").write_bytes(b"notes\n")
    (root / "pub" / "sub" / "deep file.txt").write_bytes(b"deep\n")
    (home / "private.txt").write_bytes(b"alice only\n")
    month_ago = time.time() - 30 * 86400  # old files earn heuristic freshness (10% of their age)
    for path in [*root.rglob("*"), *home.rglob("*")]:
        os.utime(path, (month_ago, month_ago))
    return root, home


@pytest.fixture
def ftpd(ftp_tree):
    server = ThreadedFtpServer(*ftp_tree)
    yield server
    server.stop()


def test_ftp_file_download_through_proxy_is_byte_exact(proxy, ftpd, ftp_tree):
    r = curl("-x", proxy.url, f"{ftpd.url}/pub/big.bin", "-D", "-", "-o", "-")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    expected = (ftp_tree[0] / "pub" / "big.bin").read_bytes()
    assert head.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    assert f"content-length: {len(expected)}".encode() in head.lower()
    assert b"last-modified:" in head.lower()
    line = proxy.access_lines(wait_for=1)[-1]
    assert "TCP_MISS/200" in line and f"{ftpd.url}/pub/big.bin" in line


def test_ftp_directory_listing_links_can_be_followed(proxy, ftpd):
    r = curl("-x", proxy.url, f"{ftpd.url}/pub/")
    page = r.stdout.decode()
    assert "<html" in page.lower()
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert "big.bin" in hrefs and "notes.txt" in hrefs and "sub/" in hrefs
    r = curl("-x", proxy.url, f"{ftpd.url}/pub/sub/")
    deep = [h for h in re.findall(r'href="([^"]+)"', r.stdout.decode()) if "deep" in h][0]
    assert curl("-x", proxy.url, f"{ftpd.url}/pub/sub/{deep}").stdout == b"deep\n"


def test_ftp_directory_without_slash_redirects(proxy, ftpd):
    r = curl("-x", proxy.url, "-i", f"{ftpd.url}/pub")
    assert r.stdout.startswith(b"HTTP/1.1 301")
    assert f"location: {ftpd.url}/pub/".encode() in r.stdout.lower()


def test_ftp_missing_file_is_404(proxy, ftpd):
    r = curl("-x", proxy.url, "-i", f"{ftpd.url}/pub/nope.txt")
    assert r.stdout.startswith(b"HTTP/1.1 404")


def test_ftp_login_with_credentials_in_url(proxy, ftpd):
    url = ftpd.url.replace("ftp://", "ftp://alice:s3cret@")
    assert curl("-x", proxy.url, f"{url}/private.txt").stdout == b"alice only\n"


def test_ftp_wrong_password_in_authorization_prompts_with_401(proxy, ftpd):
    r = curl("-x", proxy.url, "-i", "-H", "Authorization: Basic YWxpY2U6d3Jvbmc=", f"{ftpd.url}/private.txt")
    assert r.stdout.startswith(b"HTTP/1.1 401")
    assert b"www-authenticate: basic" in r.stdout.lower()


def test_ftp_wrong_password_in_url_is_403(proxy, ftpd):
    # curl -u puts the credentials in the ftp URL; a prompt could not override those, so: 403
    r = curl("-x", proxy.url, "-i", "-u", "alice:wrong", f"{ftpd.url}/private.txt")
    assert r.stdout.startswith(b"HTTP/1.1 403")
    assert b"wrong" not in r.stdout


def test_ftp_put_is_405(proxy, ftpd):
    r = curl("-x", proxy.url, "-i", "-X", "PUT", "--data", "x", f"{ftpd.url}/pub/new.txt")
    assert r.stdout.startswith(b"HTTP/1.1 405")
    assert b"allow: get, head" in r.stdout.lower()


def test_ftp_unreachable_server_is_502(proxy):
    r = curl("-x", proxy.url, "-i", "ftp://127.0.0.1:9/x")
    assert r.stdout.startswith(b"HTTP/1.1 502")


def test_second_ftp_download_comes_from_the_cache(make_proxy, ftpd, ftp_tree):
    p = make_proxy({"refresh": {"enabled": False}})
    url = f"{ftpd.url}/pub/notes.txt"
    assert curl("-x", p.url, url).stdout == b"notes\n"
    retr = ftpd.stats.retr
    r = curl("-x", p.url, "-i", url)
    assert r.stdout.endswith(b"\r\n\r\nnotes\n")
    assert b"x-cache: hit" in r.stdout.lower()
    assert ftpd.stats.retr == retr
    assert "TCP_MEM_HIT/200" in p.access_lines(wait_for=2)[-1]


def test_changed_ftp_file_is_refetched_after_its_freshness_ends(make_proxy, ftpd, ftp_tree):
    # default_ttl 0 and a tiny heuristic fraction: every request revalidates (If-Modified-Since -> MDTM)
    p = make_proxy({"refresh": {"enabled": False}, "ftp": {"heuristic_fraction": 0.0, "default_ttl": 0.0}})
    path = ftp_tree[0] / "pub" / "changing.txt"
    path.write_bytes(b"first\n")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    url = f"{ftpd.url}/pub/changing.txt"
    assert curl("-x", p.url, url).stdout == b"first\n"
    retr = ftpd.stats.retr
    assert curl("-x", p.url, url).stdout == b"first\n"
    assert ftpd.stats.retr == retr  # unchanged MDTM: 304 from the FTP side, body from the cache
    assert "TCP_REFRESH_UNMODIFIED" in p.access_lines(wait_for=2)[-1]
    path.write_bytes(b"second version\n")
    assert curl("-x", p.url, url).stdout == b"second version\n"
    assert ftpd.stats.retr == retr + 1
    assert "TCP_REFRESH_MODIFIED" in p.access_lines(wait_for=3)[-1]


def test_webproxy_purge_works_on_ftp_urls(make_proxy, ftpd):
    from tests.test_cache_proxy import run_cli

    p = make_proxy({"refresh": {"enabled": False}})
    url = f"{ftpd.url}/pub/notes.txt"
    curl("-x", p.url, url)
    r = run_cli("purge", "-c", str(p.config_path), url)
    assert r.returncode == 0 and url in r.stdout
