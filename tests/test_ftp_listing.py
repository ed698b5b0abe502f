"""webproxy.ftplisting: MLSD/LIST parsing and listing rendering, no server needed."""

from __future__ import annotations

from datetime import UTC, datetime
from html.parser import HTMLParser

from webproxy.ftplisting import (
    Entry,
    format_size,
    href,
    parse_list_line,
    parse_mlsd_line,
    render_html,
    render_names,
    visible,
)

NOW = datetime(2024, 3, 15, 12, 0, tzinfo=UTC)


def test_mlsd_file_dir_and_link_lines():
    assert parse_mlsd_line("type=file;size=1234;modify=20240131235959;perm=r; a b.txt") == Entry(
        "a b.txt", "file", 1234, datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC))
    assert parse_mlsd_line("Type=dir;Modify=20240101000000.123;Sizd=4096; pub\r\n") == Entry(
        "pub", "dir", None, datetime(2024, 1, 1, tzinfo=UTC))
    assert parse_mlsd_line("type=OS.unix=slink:/etc;modify=20240101000000; etc").kind == "link"
    assert parse_mlsd_line("type=OS.unix=symlink;size=3; l").kind == "link"


def test_mlsd_skips_self_parent_and_garbage():
    assert parse_mlsd_line("type=cdir;modify=20240101000000; /pub") is None
    assert parse_mlsd_line("type=pdir;modify=20240101000000; ..") is None
    assert parse_mlsd_line("no facts here") is None
    assert parse_mlsd_line("") is None


def test_mlsd_keeps_spaces_and_semicolons_in_names():
    e = parse_mlsd_line("type=file;size=1;  leading space;and=semicolon")
    assert e is not None and e.name == " leading space;and=semicolon"


def test_mlsd_bad_date_and_size_become_unknown():
    e = parse_mlsd_line("type=file;size=abc;modify=20241399000000; x")
    assert e == Entry("x", "file", None, None)


def test_unix_list_lines():
    assert parse_list_line("-rw-r--r--   1 ftp  ftp     1048576 Jan 05  2021 big file.iso", NOW) == Entry(
        "big file.iso", "file", 1048576, datetime(2021, 1, 5, tzinfo=UTC))
    assert parse_list_line("drwxr-xr-x 2 0 0 4096 Mar 10 09:30 pub", NOW) == Entry(
        "pub", "dir", None, datetime(2024, 3, 10, 9, 30, tzinfo=UTC))
    assert parse_list_line("lrwxrwxrwx 1 root root 7 Feb 1 2020 latest -> v1.2.3", NOW) == Entry(
        "latest", "link", None, datetime(2020, 2, 1, tzinfo=UTC))
    # Owner only, no group column (some servers).
    assert parse_list_line("-rw-r--r-- 1 owner 12 Mar 01 10:00 a.txt", NOW).size == 12


def test_unix_date_without_year_in_the_future_means_last_year():
    e = parse_list_line("-rw-r--r-- 1 u g 1 Dec 24 18:00 xmas.txt", NOW)
    assert e is not None and e.modified == datetime(2023, 12, 24, 18, 0, tzinfo=UTC)


def test_dos_list_lines():
    assert parse_list_line("01-31-24  11:05PM       <DIR>          My Documents", NOW) == Entry(
        "My Documents", "dir", None, datetime(2024, 1, 31, 23, 5, tzinfo=UTC))
    assert parse_list_line("12-01-1999  12:15AM              2048 old.zip", NOW) == Entry(
        "old.zip", "file", 2048, datetime(1999, 12, 1, 0, 15, tzinfo=UTC))


def test_list_skips_total_and_dot_entries():
    assert parse_list_line("total 48", NOW) is None
    assert parse_list_line("drwxr-xr-x 2 u g 4096 Mar 10 09:30 .", NOW) is None
    assert parse_list_line("drwxr-xr-x 2 u g 4096 Mar 10 09:30 ..", NOW) is None


def test_href_percent_encodes_every_reserved_character():
    assert href(Entry("a b;type=d#x?y:z&.txt", "file")) == "a%20b%3Btype%3Dd%23x%3Fy%3Az%26.txt"
    assert href(Entry("ünï", "dir")) == "%C3%BCn%C3%AF/"
    # A Latin-1 name from an old server (decoded with surrogateescape) links to its exact bytes.
    latin = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert href(Entry(latin, "file")) == "caf%E9"
    assert visible(latin) == "caf\ufffd"


class Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.title = ""
        self._in: str | None = None
        self._href = ""

    def handle_starttag(self, tag, attrs):
        self._in = tag
        if tag == "a":
            self._href = dict(attrs)["href"]

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "a":
            self.links.append((self._href, data))
        elif self._in == "title":
            self.title += data


def test_render_html_escapes_names_and_orders_directories_first():
    entries = [
        Entry("z.txt", "file", 10, datetime(2024, 1, 2, 3, 4, tzinfo=UTC)),
        Entry('<b>"bold"&</b>', "file", 2048, None),
        Entry("sub", "dir", None, None),
    ]
    page = render_html("ftp://h/<dir>/", entries, parent=True)
    assert "<b>" not in page.replace("<body>", "")  # no markup injected from names or the title
    rows = Rows()
    rows.feed(page)
    assert rows.title == "Index of ftp://h/<dir>/"
    assert rows.links == [
        ("../", "Parent directory"),
        ("sub/", "sub/"),
        ("%3Cb%3E%22bold%22%26%3C%2Fb%3E", '<b>"bold"&</b>'),
        ("z.txt", "z.txt"),
    ]
    assert "2024-01-02 03:04" in page and "2.0 KiB" in page and 'title="10 bytes"' in page


def test_render_html_root_has_no_parent_link():
    rows = Rows()
    rows.feed(render_html("ftp://h/", [Entry("a", "file", 1)], parent=False))
    assert rows.links == [("a", "a")]


def test_render_names_is_one_name_per_line():
    assert render_names([Entry("b", "file"), Entry("a dir", "dir")]) == "a dir\nb\n"


def test_format_size():
    assert [format_size(n) for n in (None, 0, 1023, 1024, 1536, 5 << 20, 3 << 40)] == [
        "-", "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 TiB"]
