"""What the first bytes of a TLS connection say, read without consuming them: is this a TLS
ClientHello, is it complete yet, and which server name (SNI, RFC 6066 section 3) does it ask for.

Pure functions of bytes: used by the CONNECT interception (on bytes peeked from the client socket)
and by transparent mode (on the sniffed bytes) to decide whether a connection is intercepted.
"""

from __future__ import annotations

from dataclasses import dataclass

HANDSHAKE = 0x16  # TLS record content type (RFC 8446 5.1)
CLIENT_HELLO = 1  # handshake message type (RFC 8446 4)
SERVER_NAME = 0  # extension type (RFC 6066 3)
RECORD_MAX = 5 + (1 << 14) + 2048  # header + the largest record a peer may send (RFC 8446 5.2)


@dataclass(frozen=True, slots=True)
class Hello:
    """The verdict on the bytes so far. `complete`: the ClientHello is all in (when `tls`);
    `sni`: the host_name asked for, lower-cased, or None when the client sent none."""

    tls: bool
    complete: bool = False
    sni: str | None = None


NOT_TLS = Hello(False)
NEED_MORE = Hello(True, False)


def looks_like_tls(data: bytes) -> bool | None:
    """True/False once the first bytes decide it, None while fewer than 3 bytes are in."""
    if data and data[0] != HANDSHAKE:
        return False
    if len(data) < 3:
        return None
    return data[1] == 3 and data[2] <= 4  # SSL 3.0 .. TLS 1.3 record versions (RFC 8446 5.1)


def parse_client_hello(data: bytes) -> Hello:
    """Read the ClientHello at the start of `data`. Only the first record is read: a ClientHello
    that spans several records (very rare) is complete once its first record is, with sni None
    when the extension is not in that record (the caller then names the CONNECT host)."""
    first = looks_like_tls(data)
    if first is None:
        return NEED_MORE
    if not first:
        return NOT_TLS
    if len(data) < 5:
        return NEED_MORE
    rec_len = int.from_bytes(data[3:5], "big")
    if rec_len == 0 or rec_len > RECORD_MAX:
        return NOT_TLS
    if len(data) < 5 + rec_len:
        return NEED_MORE
    body = data[5:5 + rec_len]
    if body[0] != CLIENT_HELLO or len(body) < 4:
        return NOT_TLS
    return Hello(True, True, _sni(body[4:4 + int.from_bytes(body[1:4], "big")]))


def _sni(hello: bytes) -> str | None:
    """The host_name of a ClientHello body (after its 4-byte header), None if absent or malformed."""
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + hello[pos]  # legacy_session_id
        pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")  # cipher_suites
        pos += 1 + hello[pos]  # legacy_compression_methods
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= min(end, len(hello)):
            ext_type = int.from_bytes(hello[pos:pos + 2], "big")
            ext_len = int.from_bytes(hello[pos + 2:pos + 4], "big")
            pos += 4
            if ext_type == SERVER_NAME:
                ext = hello[pos:pos + ext_len]
                p = 2  # server_name_list length
                while p + 3 <= len(ext):
                    name_type, name_len = ext[p], int.from_bytes(ext[p + 1:p + 3], "big")
                    name = ext[p + 3:p + 3 + name_len]
                    if name_type == 0 and len(name) == name_len and name.isascii():
                        return name.decode("ascii").lower().rstrip(".") or None
                    p += 3 + name_len
                return None
            pos += ext_len
    except IndexError:
        return None
    return None
