"""The status page in a real browser: headless Chromium renders it (as an admin opening
http://127.0.0.1:3128/ would see it) at desktop and phone widths; the screenshot has content, and
nothing runs off the right edge (the page's margin stays background-coloured)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.support import curl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (tests/run.sh installs it)")

BACKGROUND = (0xF6, 0xF7, 0xF9)  # the page's --bg in light mode


def screenshot(url: str, path: Path, width: int, height: int) -> None:
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--force-prefers-reduced-motion", "--blink-settings=preferredColorScheme=1",
                        f"--window-size={width},{height}", f"--screenshot={path}", url],
                       capture_output=True, text=True, timeout=90)
    assert path.exists(), r.stderr[-2000:]


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG, as Chromium writes them."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i] for i in range(len(r)) if i % bpp < 3) for r in rows]


@pytest.mark.parametrize("width, height", [(1280, 1000), (420, 1600)], ids=["desktop", "phone"])
def test_status_page_renders_in_chromium(make_proxy, origin, tmp_path, width, height):
    p = make_proxy({"server": {"name": "proxy-lab"}})
    url = origin.put("chromium-shot", b"c" * 50_000, Cache_Control="max-age=600")
    for _ in range(4):
        assert len(curl("-x", p.url, url).stdout) == 50_000
    shot = tmp_path / f"status-{width}.png"
    screenshot(p.url + "/", shot, width, height)
    w, h, rows = read_png(shot)
    assert (w, h) == (width, height)
    colours = {row[i:i + 3] for row in rows[::8] for i in range(0, len(row), 3 * 8)}
    assert len(colours) > 20, "the page looks blank"
    margin = bytes(BACKGROUND)
    right_edge = {row[3 * (w - 12):] for row in rows}
    assert right_edge == {margin * 12}, "something runs off the right edge of the page"
    # Chromium fetched the page itself (loopback: no proxy involved), and the proxy logged it.
    assert any(" GET / " in line for line in p.access_lines(wait_for=5))
