"""webproxy.ftpurl and the pure helpers of webproxy.ftp: URLs, credentials, statuses, types."""

from __future__ import annotations

import base64

import pytest

from webproxy.ftp import content_type, parse_mdtm, status_for_reply
from webproxy.ftpurl import (
    FtpUrlError,
    credentials,
    directory_location,
    if_modified_since,
    parse_ftp_url,
    server_path,
)


def test_parse_plain_url():
    t = parse_ftp_url("ftp://FTP.Example.test/pub/file.iso")
    assert (t.host, t.port, t.user, t.password) == ("ftp.example.test", 21, None, None)
    assert (t.segments, t.is_dir, t.type, t.name) == (("pub", "file.iso"), False, "i", "file.iso")
    assert t.origin == "ftp://ftp.example.test"


def test_parse_credentials_port_and_type():
    t = parse_ftp_url("ftp://us%40er:p%3Ass@host:2121/a%20b/c.txt;type=A")
    assert (t.user, t.password, t.port, t.type) == ("us@er", "p:ss", 2121, "a")
    assert t.segments == ("a b", "c.txt")
    assert t.origin == "ftp://host:2121"


def test_parse_directories_and_root():
    assert parse_ftp_url("ftp://h").is_dir and parse_ftp_url("ftp://h").segments == ()
    assert parse_ftp_url("ftp://h/").segments == ()
    t = parse_ftp_url("ftp://h/pub/")
    assert (t.segments, t.is_dir) == (("pub",), True)
    t = parse_ftp_url("ftp://h/pub;type=d")
    assert (t.segments, t.is_dir, t.type) == (("pub",), False, "d")


def test_parse_ipv6_and_user_without_password():
    t = parse_ftp_url("ftp://bob@[::1]:2121/x")
    assert (t.host, t.port, t.user, t.password) == ("::1", 2121, "bob", None)
    assert t.origin == "ftp://[::1]:2121"


@pytest.mark.parametrize("url", [
    "http://h/x", "ftp://h:99999/x", "ftp://h:0/", "ftp://h/x;type=q", "ftp://h/a%0d%0aDELE%20x",
    "ftp:///x", "ftp://h/x\r\n",
])
def test_bad_urls_are_refused(url):
    with pytest.raises(FtpUrlError):
        parse_ftp_url(url)


def test_server_path_is_relative_to_login_directory_unless_first_segment_is_absolute():
    assert server_path(parse_ftp_url("ftp://h/pub/f"), "/home/u") == "/home/u/pub/f"
    assert server_path(parse_ftp_url("ftp://h/"), "/home/u") == "/home/u"
    assert server_path(parse_ftp_url("ftp://h/pub/f"), "/") == "/pub/f"
    assert server_path(parse_ftp_url("ftp://h/"), "/") == "/"
    assert server_path(parse_ftp_url("ftp://h/%2Fetc/motd"), "/home/u") == "/etc/motd"


def test_latin1_bytes_in_url_survive_as_surrogates():
    t = parse_ftp_url("ftp://h/caf%E9")
    assert t.name.encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_directory_location_keeps_what_the_client_wrote():
    assert directory_location(parse_ftp_url("ftp://u:p@h:21/a%20b")) == "ftp://u:p@h:21/a%20b/"
    assert directory_location(parse_ftp_url("ftp://h/pub;type=i")) == "ftp://h/pub/"


def _basic(user: str, password: str) -> list[tuple[str, str]]:
    return [("authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())]


def test_credentials_precedence():
    url = parse_ftp_url("ftp://u:p@h/x")
    anon = parse_ftp_url("ftp://h/x")
    user_only = parse_ftp_url("ftp://u@h/x")
    c = credentials(url, _basic("v", "q"), "anonymous", "a@")
    assert (c.user, c.password, c.source, c.prompt_helps) == ("u", "p", "url", False)
    c = credentials(anon, _basic("v", "q:colon"), "anonymous", "a@")
    assert (c.user, c.password, c.source, c.prompt_helps) == ("v", "q:colon", "header", True)
    c = credentials(anon, [], "anonymous", "a@")
    assert (c.user, c.password, c.source, c.prompt_helps) == ("anonymous", "a@", "anonymous", True)
    c = credentials(user_only, _basic("v", "q"), "anonymous", "a@")
    assert (c.user, c.password) == ("u", "q")
    c = credentials(user_only, [], "anonymous", "a@")
    assert (c.user, c.password, c.prompt_helps) == ("u", "", True)


def test_malformed_authorization_is_ignored():
    anon = parse_ftp_url("ftp://h/x")
    for value in ("Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"nocolon").decode()):
        assert credentials(anon, [("Authorization", value)], "anonymous", "a@").source == "anonymous"


def test_if_modified_since():
    assert if_modified_since([("If-Modified-Since", "Tue, 14 Nov 2023 22:13:20 GMT")]) == 1_700_000_000
    assert if_modified_since([("If-Modified-Since", "yesterday")]) is None
    assert if_modified_since([]) is None


def test_parse_mdtm():
    assert parse_mdtm(" 20231114221320") == 1_700_000_000
    assert parse_mdtm("20231114221320.5") == 1_700_000_000.5
    assert parse_mdtm("191231114221320") is None  # the old "19100" year bug
    assert parse_mdtm("20231314221320") is None


def test_status_for_reply():
    assert status_for_reply("550", "No such file or directory.") == 404
    assert status_for_reply("550", "Permission denied.") == 403
    assert status_for_reply("530", "Not logged in.") == 403
    assert status_for_reply("425", "Can't open data connection.") == 502
    assert status_for_reply("451", "Local error in processing.") == 502


def test_content_type():
    assert content_type("a.html") == "text/html"
    assert content_type("x.tar.gz") == "application/gzip"
    assert content_type("x.bz2") == "application/x-bzip2"
    assert content_type("README") == "application/octet-stream"
    assert content_type("README", ascii_mode=True) == "text/plain"
    assert content_type("a:b.txt") == "text/plain"
