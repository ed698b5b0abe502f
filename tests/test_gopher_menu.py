"""gopher:// URLs and menus as pure functions (RFC 4266, RFC 1436), and how a text item's
terminating "." line is dropped while streaming."""

from __future__ import annotations

import asyncio
import re
from html import unescape

import pytest

from webproxy.gopher import GopherOriginResponse
from webproxy.gophermenu import (
    BadGopherUrl,
    GopherUrl,
    Item,
    error_text,
    item_url,
    media_type,
    parse_menu,
    parse_path,
    render_menu,
)


@pytest.mark.parametrize("path, want", [
    ("/", GopherUrl("1", b"")),
    ("", GopherUrl("1", b"")),
    ("/1/pub/", GopherUrl("1", b"/pub/")),
    ("/0/a%20b%09c", GopherUrl("0", b"/a b", b"c")),
    ("/9/bin%FF.dat", GopherUrl("9", b"/bin\xff.dat")),
    ("/7/find%09two%20words%09+", GopherUrl("7", b"/find", b"two words")),  # a Gopher+ field is cut
    ("/7/find?two+words", GopherUrl("7", b"/find", b"two words")),
    ("/7/find?search=a%26b", GopherUrl("7", b"/find", b"a&b")),
    ("/7/find", GopherUrl("7", b"/find")),
    ("/0/cgi?x=1", GopherUrl("0", b"/cgi?x=1")),  # ? is only a search for type 7
    ("/%3Bmovie.mp4", GopherUrl(";", b"movie.mp4")),
])
def test_url_paths(path, want):
    assert parse_path(path) == want


def test_request_line_is_selector_tab_search_crlf():
    assert GopherUrl("1", b"/pub").request() == b"/pub\r\n"
    assert GopherUrl("7", b"/find", b"x y").request() == b"/find\tx y\r\n"


@pytest.mark.parametrize("path", ["/0/a%0Db", "/0/a%0Ab", "/7/f?x%0Ay"])
def test_cr_or_lf_in_a_selector_is_refused(path):
    with pytest.raises(BadGopherUrl):
        parse_path(path)


MENU = (b"iHello <world>\tfake\t(NULL)\t0\r\n"
        b"1Pub\t/pub/\tgopher.example\t70\r\n"
        b"0Notes\t/notes.txt\tother.example\t7070\r\n"
        b"9Odd \"name\"\t/a b/\xff&x\"y\tgopher.example\t70\r\n"
        b"hWeb\tURL:https://www.example.org/?a=1&b=2\tgopher.example\t70\r\n"
        b"hEvil\tURL:javascript:alert(1)\tgopher.example\t70\r\n"
        b"8Telnet\t\tbbs.example\t23\r\n"
        b"1Bad host\t/x\tevil host\"onclick\t70\r\n"
        b"a line without tabs\r\n"
        b".\r\n"
        b"1After the end\t/no\tgopher.example\t70\r\n")


def test_menu_parsing():
    items = parse_menu(MENU)
    assert [i.item_type for i in items] == ["i", "1", "0", "9", "h", "h", "8", "1", "i"]
    assert items[2] == Item("0", "Notes", b"/notes.txt", "other.example", 7070)
    assert items[3].selector == b"/a b/\xff&x\"y"


def test_menu_links_round_trip_to_the_same_selector():
    page = render_menu("gopher://gopher.example/", parse_menu(MENU))
    hrefs = [unescape(h) for h in re.findall(r'href="([^"]*)"', page)]
    assert hrefs == ["gopher://gopher.example/1/pub/", "gopher://other.example:7070/0/notes.txt",
                     "gopher://gopher.example/9/a%20b/%FF%26x%22y", "https://www.example.org/?a=1&b=2",
                     "gopher://gopher.example/hURL%3Ajavascript%3Aalert%281%29", "telnet://bbs.example:23/"]
    assert parse_path(hrefs[2].split("gopher.example", 1)[1]).selector == b"/a b/\xff&x\"y"
    assert "Hello &lt;world&gt;" in page and "<world>" not in page
    assert 'Odd &quot;name&quot;' in page


def test_error_replies_are_recognised():
    assert error_text(b"3Not found\terror.host\t1\r\n.\r\n") == "Not found"
    assert error_text(b"3Error: gone\t\tnull.host\t1\r\niand more\t\t\t\r\n") == "Error: gone"
    assert error_text(b"1A menu\t/m\th\t70\r\n3an error line among items\t\th\t1\r\n") is None
    assert error_text(b"30 bytes of a binary that starts with 3") is None


@pytest.mark.parametrize("item_type, selector, ctype", [
    ("0", b"/x", "text/plain"), ("g", b"/x", "image/gif"), ("I", b"/photo.jpg", "image/jpeg"),
    ("I", b"/photo", "application/octet-stream"), ("9", b"/a.tar.gz", "application/x-tar"),
    ("9", b"/blob", "application/octet-stream"), ("s", b"/song.wav", "audio/x-wav"), ("h", b"/", "text/html"),
])
def test_media_types(item_type, selector, ctype):
    assert media_type(item_type, selector) == ctype


@pytest.mark.parametrize("sent, shown", [
    ([b"line one\r\n", b"line two\r\n.\r\n"], b"line one\r\nline two\r\n"),
    ([b"a\n.", b"\n"], b"a\n"),
    ([b".\r\n"], b""),
    ([b"no terminator\r\n"], b"no terminator\r\n"),
    ([b"a dot.\r\n", b"..\r\n", b"x" * 20], b"a dot.\r\n..\r\n" + b"x" * 20),
])
def test_text_items_stream_without_their_terminating_dot_line(sent, shown):
    async def run() -> bytes:
        reader = asyncio.StreamReader()
        for part in sent:
            reader.feed_data(part)
        reader.feed_eof()
        resp = GopherOriginResponse(200, [], reader=reader, text=True)
        return b"".join([c async for c in resp.chunks()])

    assert asyncio.run(run()) == shown


def test_item_url_for_info_and_error_lines_is_none():
    assert item_url(Item("i", "x", b"", "h", 70)) is None
    assert item_url(Item("3", "x", b"", "h", 70)) is None
    assert item_url(Item("1", "x", b"/", "::1", 70)) == "gopher://[::1]/1/"
