"""What an FTP server says, judged with no socket (webproxy.ftpreply), and listings rendered as they
stream (webproxy.ftplisting.ListingRenderer)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from webproxy.ftplisting import SORT_LIMIT, ListingRenderer, render_html, render_names
from webproxy.ftplisting import parse_mlsd_line as mlsd
from webproxy.ftppool import CODEC
from webproxy.ftpreply import MAX_REPLY_BYTES, BadReply, ReplyReader, epsv_port, pasv_port, transfer_problem


def read_reply(*lines: str):
    r = ReplyReader()
    for line in lines:
        done = r.feed(line)
        if done is not None:
            return done
    return None


def test_single_and_multiline_replies():
    assert read_reply("220 hello\r\n") == ("220", [" hello"])
    assert read_reply("220-one\r\n", " two\r\n", "123 other code inside\r\n", "220 end\r\n") == (
        "220", ["-one", " two", "123 other code inside", " end"])
    assert read_reply("220-one\r\n", "220-still\r\n") is None


def test_reply_larger_than_the_bound_is_a_bad_reply():
    r = ReplyReader()
    r.feed("220-start\r\n")
    with pytest.raises(BadReply, match="longer than"):
        for _ in range(MAX_REPLY_BYTES):
            r.feed("220-" + "x" * 100 + "\r\n")


@pytest.mark.parametrize("line", ["hello\r\n", "22 short\r\n", "\r\n", "２２０ unicode digits\r\n"])
def test_reply_without_a_status_code_is_a_bad_reply(line):
    with pytest.raises(BadReply):
        ReplyReader().feed(line)


@pytest.mark.parametrize("text,port", [
    ("Entering Extended Passive Mode (|||6446|)", 6446),
    ("ok (!!!21!)", 21),
    ("(|||65535|)", 65535),
])
def test_epsv_port(text, port):
    assert epsv_port(text) == port


@pytest.mark.parametrize("text", ["(|||99999|)", "(|||-1|)", "(|||0|)", "(|||65536|)", "no port", "(||6446|)",
                                  "(|||123456|)"])
def test_epsv_reply_out_of_range_or_malformed_is_bad(text):
    with pytest.raises(BadReply):
        epsv_port(text)


def test_pasv_port():
    assert pasv_port("Entering Passive Mode (10,0,0,1,195,80)") == 195 * 256 + 80


@pytest.mark.parametrize("text", ["(127,0,0,1,300,11)", "(127,0,0,999,4,1)", "(127,0,0,1,0,0)", "(1,2,3,4,5)",
                                  "nothing"])
def test_pasv_reply_out_of_range_or_malformed_is_bad(text):
    with pytest.raises(BadReply):
        pasv_port(text)


@pytest.mark.parametrize("received,size,code,ok", [
    (10, 10, "226", True),
    (10, 10, "250", True),
    (10, None, "226", True),
    (10, 10, "451", False),  # every byte, then a failure reply: not complete
    (10, 10, "200", False),
    (10, 10, None, False),
    (9, 10, "226", False),
])
def test_transfer_complete_only_on_226_or_250_with_the_announced_length(received, size, code, ok):
    assert (transfer_problem(received, size, code) is None) is ok


NOW = datetime(2024, 6, 1, tzinfo=UTC)


def render(data: bytes, pieces: int = 7, names_only: bool = False) -> str:
    r = ListingRenderer("ftp://h/d/", parent=True, mlsd=True, names_only=names_only, now=NOW, codec=CODEC)
    step = max(1, len(data) // pieces)
    return "".join(r.feed(data[i:i + step]) for i in range(0, len(data), step)) + r.finish()


def test_streamed_small_listing_is_the_sorted_page_whatever_the_pieces():
    lines = [b"type=file;size=3; b.txt\r\n", b"type=dir; sub\r\n", "type=file; \u00e9t\u00e9.txt\r\n".encode(),
             b"type=file;size=1; a.txt"]  # the last line without its line end
    data = b"".join(lines)
    entries = [mlsd(line.decode(CODEC)) for line in lines]
    assert render(data) == render_html("ftp://h/d/", entries, parent=True)
    assert render(data, 1) == render(data, len(data))
    assert render(data, 3, names_only=True) == render_names(entries)


def test_streamed_large_listing_goes_out_in_server_order_before_the_end():
    r = ListingRenderer("t", parent=False, mlsd=True, names_only=True, now=NOW, codec=CODEC)
    out = r.feed(b"".join(b"type=file; f%06d\r\n" % i for i in range(SORT_LIMIT + 10, 0, -1)))
    assert out.startswith(f"f{SORT_LIMIT + 10:06d}\n")  # streamed unsorted once past SORT_LIMIT
    assert r.feed(b"type=file; late\r\n") == "late\n" and r.finish() == ""


def test_an_over_long_listing_line_is_skipped_not_held():
    r = ListingRenderer("t", parent=False, mlsd=True, names_only=True, now=NOW, codec=CODEC)
    for _ in range(100):
        r.feed(b"x" * 10_000)
    assert len(r.partial) < 20_000
    r.feed(b"tail of that line\r\ntype=file; ok\r\n")
    assert r.finish() == "ok\n"
