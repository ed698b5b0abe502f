"""SOCKS5 wire format (RFC 1928) and username/password sub-negotiation (RFC 1929), as pure
functions on bytes: parsing answers "need more bytes" (None), a value, or raises SocksError with
the reply code the server should send. No sockets here; `tunnel/socks.py` does the I/O.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from dataclasses import dataclass

VERSION = 5

# Methods (RFC 1928 section 3).
NO_AUTH = 0x00
USERPASS = 0x02
NO_ACCEPTABLE = 0xFF

# Commands (section 4).
CONNECT = 0x01
BIND = 0x02
UDP_ASSOCIATE = 0x03
COMMAND_NAMES = {CONNECT: "CONNECT", BIND: "BIND", UDP_ASSOCIATE: "UDP"}

# Address types (section 4).
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# Reply codes (section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

# RFC 1929 section 2: the sub-negotiation has its own version number; status 0 is success.
USERPASS_VERSION = 0x01
USERPASS_OK = b"\x01\x00"
USERPASS_FAILED = b"\x01\x01"


class SocksError(Exception):
    """The client sent something we must refuse; `reply` is the code to answer with (None when
    the protocol allows no answer, e.g. a wrong version byte: the connection is just closed)."""

    def __init__(self, message: str, reply: int | None = GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Address:
    """A SOCKS address: `host` is an IP literal (IPv6 without brackets) or a domain name."""

    atyp: int
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.atyp == ATYP_IPV6 else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Request:
    command: int
    dst: Address


# -- method negotiation (section 3) -------------------------------------------------------------

def parse_greeting(buf: bytes) -> tuple[list[int], int] | None:
    """VER NMETHODS METHODS... -> (offered methods, bytes used), or None for more bytes."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise SocksError(f"not a SOCKS5 client (version byte {buf[0]})", None)
    n = buf[1]
    if len(buf) < 2 + n:
        return None
    return list(buf[2:2 + n]), 2 + n


def choose_method(offered: list[int], auth_required: bool) -> int:
    """The method the server selects: username/password when a verifier is configured, else no
    authentication; NO_ACCEPTABLE (the client must then close, section 3) when not offered."""
    wanted = USERPASS if auth_required else NO_AUTH
    return wanted if wanted in offered else NO_ACCEPTABLE


def method_reply(method: int) -> bytes:
    return bytes((VERSION, method))


def parse_userpass(buf: bytes) -> tuple[str, str, int] | None:
    """RFC 1929 section 2: VER ULEN UNAME PLEN PASSWD -> (user, password, bytes used)."""
    if len(buf) < 2:
        return None
    if buf[0] != USERPASS_VERSION:
        raise SocksError(f"bad username/password version {buf[0]} (RFC 1929 wants 1)", None)
    ulen = buf[1]
    if len(buf) < 3 + ulen:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    user = buf[2:2 + ulen].decode("utf-8", "surrogateescape")
    password = buf[3 + ulen:end].decode("utf-8", "surrogateescape")
    return user, password, end


# -- addresses (section 5) ----------------------------------------------------------------------

def parse_address(buf: bytes, offset: int) -> tuple[Address, int] | None:
    """ATYP DST.ADDR DST.PORT starting at `offset` -> (address, offset after it), or None."""
    if len(buf) < offset + 1:
        return None
    atyp = buf[offset]
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv4Address(buf[offset + 1:offset + 5]))
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv6Address(buf[offset + 1:offset + 17]))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < offset + 2:
            return None
        n = buf[offset + 1]
        end = offset + 2 + n + 2
        if len(buf) < end:
            return None
        raw = buf[offset + 2:offset + 2 + n]
        host = _domain(raw)
    else:
        raise SocksError(f"address type {atyp} is not one of 1 (IPv4), 3 (domain), 4 (IPv6)",
                         ADDRESS_TYPE_NOT_SUPPORTED)
    port = struct.unpack_from("!H", buf, end - 2)[0]
    return Address(atyp, host, port), end


def _domain(raw: bytes) -> str:
    """A domain name as sent (section 5: no terminating NUL). Only printable ASCII host-name
    characters are accepted: anything else could not be resolved and must not reach a log line."""
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise SocksError("domain name is not ASCII (send IDNA/punycode)", HOST_UNREACHABLE) from None
    if not name or len(name) > 253 or not all(c.isalnum() or c in "-._" for c in name):
        raise SocksError(f"bad domain name {name[:100]!r}", HOST_UNREACHABLE)
    return name


def encode_address(host: str, port: int) -> bytes:
    """ATYP ADDR PORT for an IP literal or a domain name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        return bytes((ATYP_DOMAIN, len(raw))) + raw + struct.pack("!H", port)
    if ip.version == 4:
        return bytes((ATYP_IPV4,)) + ip.packed + struct.pack("!H", port)
    return bytes((ATYP_IPV6,)) + ip.packed + struct.pack("!H", port)


# -- requests and replies (sections 4 and 6) ----------------------------------------------------

def parse_request(buf: bytes) -> tuple[Request, int] | None:
    """VER CMD RSV ATYP DST.ADDR DST.PORT -> (request, bytes used), or None for more bytes."""
    if len(buf) < 4:
        return None
    if buf[0] != VERSION:
        raise SocksError(f"request version byte {buf[0]} is not 5", GENERAL_FAILURE)
    parsed = parse_address(buf, 3)
    if parsed is None:
        return None
    addr, end = parsed
    cmd = buf[1]
    if cmd not in COMMAND_NAMES:
        raise SocksError(f"command {cmd} is not CONNECT (1), BIND (2) or UDP ASSOCIATE (3)",
                         COMMAND_NOT_SUPPORTED)
    return Request(cmd, addr), end


def encode_reply(rep: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT. Failures carry an all-zero IPv4 address."""
    return bytes((VERSION, rep, 0)) + encode_address(host, port)


def reply_for_failure(kind: str, os_errno: int | None = None) -> int:
    """The reply code for a failed upstream connect, from tunnel.connect's error `kind`."""
    if kind == "denied":
        return NOT_ALLOWED
    if kind == "refused":
        return REFUSED
    if kind == "timeout":
        # No RFC code says "no answer in time"; TTL expired is the one for a packet that never
        # arrived, and lets a client tell a silent host from a refusing one.
        return TTL_EXPIRED
    if kind == "dns":
        return HOST_UNREACHABLE
    if kind == "unreachable":
        if os_errno == errno.ENETUNREACH:
            return NETWORK_UNREACHABLE
        if os_errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.EADDRNOTAVAIL):
            return HOST_UNREACHABLE
        return HOST_UNREACHABLE if os_errno is None else GENERAL_FAILURE
    return GENERAL_FAILURE


# -- UDP (section 7) ----------------------------------------------------------------------------

def parse_udp(datagram: bytes) -> tuple[int, Address, bytes]:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA -> (frag, destination, data). Raises SocksError for
    a datagram that is too short or malformed (the relay drops it silently, section 7)."""
    if len(datagram) < 4 or datagram[0] or datagram[1]:
        raise SocksError("not a SOCKS UDP datagram")
    parsed = parse_address(datagram, 3)
    if parsed is None:
        raise SocksError("truncated SOCKS UDP header")
    addr, end = parsed
    return datagram[2], addr, datagram[end:]


def encode_udp(host: str, port: int, data: bytes) -> bytes:
    return b"\x00\x00\x00" + encode_address(host, port) + data
