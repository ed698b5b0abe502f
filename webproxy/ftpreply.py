"""What an FTP server says, judged: pure rules, no sockets.

A hostile or broken server must never make the proxy wait without end, grow without bound, connect
somewhere it should not, or take a half-sent file for a whole one:

- a reply (RFC 959 4.2: "xyz-" continuation lines up to the final "xyz ") is bounded in size
  (`MAX_REPLY_BYTES`, lines included) and in time (the caller's whole-reply deadline);
- a passive reply (PASV 227, RFC 959 4.1.2; EPSV 229, RFC 2428 3) names a port in 1-65535 with
  octets in 0-255, or it is a bad reply;
- a transfer is complete only when the data connection closed, the server's final reply is
  226 or 250 (RFC 959 4.2, "Closing data connection" / "Requested file action okay, completed"),
  and the byte count matches SIZE when SIZE was given (RFC 3659 4).

`BadReply` carries the sentence the HTTP client sees in the 502.
"""

from __future__ import annotations

import re

MAX_REPLY_BYTES = 8 * 1024  # a whole reply, continuation lines included: greetings are a few lines
MAX_LINE_BYTES = 4 * 1024  # one line of it (the control connection's read limit)
COMPLETE_CODES = frozenset({"226", "250"})


class BadReply(Exception):
    """The server's reply breaks the protocol or our bounds (502 "bad reply from the FTP server")."""


class ReplyReader:
    """Assembles one reply from lines: `feed(line)` returns (code, lines) once the final line is in,
    None while more lines are due, and raises BadReply when the reply is malformed or too large."""

    __slots__ = ("code", "lines", "size")

    def __init__(self) -> None:
        self.code: str | None = None
        self.lines: list[str] = []
        self.size = 0

    def feed(self, line: str) -> tuple[str, list[str]] | None:
        self.size += len(line) + 2
        if self.size > MAX_REPLY_BYTES:
            raise BadReply(f"a reply longer than {MAX_REPLY_BYTES} bytes")
        line = line.rstrip("\r\n")
        head = line[:3]
        if self.code is None:
            if not (len(head) == 3 and head.isdigit() and head.isascii()):
                raise BadReply(f"a reply line without a status code: {line[:60]!r}")
            self.code = head
            self.lines.append(line[3:])
            if line[3:4] == "-":
                return None
            return self.code, self.lines
        if head == self.code and line[3:4] != "-":
            self.lines.append(line[3:])
            return self.code, self.lines
        # A continuation line: anything, including "xyz-" lines and lines with other codes.
        self.lines.append(line)
        return None


_EPSV_RE = re.compile(r"\(([\x21-\x7e])\1\1(\d{1,5})\1\)")
_PASV_RE = re.compile(r"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")


def epsv_port(text: str) -> int:
    """The port of a 229 reply's "(|||port|)" (RFC 2428 3; any printable delimiter)."""
    m = _EPSV_RE.search(text)
    if m is None:
        raise BadReply(f"an EPSV reply without a port: {text[:80]!r}")
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise BadReply(f"an EPSV reply naming port {port}")
    return port


def pasv_port(text: str) -> int:
    """The port of a 227 reply's "h1,h2,h3,h4,p1,p2" (RFC 959 4.1.2); the address is not used
    (see FtpSession.open_data), but every octet must still be an octet."""
    m = _PASV_RE.search(text)
    if m is None:
        raise BadReply(f"a PASV reply without an address: {text[:80]!r}")
    octets = [int(g) for g in m.groups()]
    if any(o > 255 for o in octets):
        raise BadReply(f"a PASV reply with an octet out of range: {m.group(0)}")
    port = octets[4] << 8 | octets[5]
    if port == 0:
        raise BadReply("a PASV reply naming port 0")
    return port


def transfer_problem(received: int, size: int | None, final_code: str | None) -> str | None:
    """Why a transfer whose data connection has closed is not complete, or None when it is.
    `final_code` is the server's final reply after the data (None if none came)."""
    if final_code not in COMPLETE_CODES:
        return f"the server ended the transfer with {final_code or 'no reply'}, not 226/250"
    if size is not None and received != size:
        return f"got {received} of the {size} bytes SIZE announced"
    return None
