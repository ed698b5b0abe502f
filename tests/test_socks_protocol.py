"""SOCKS5 wire format (RFC 1928, RFC 1929) and the SOCKS decisions, as pure functions on bytes:
no sockets. The byte strings are written out from the RFCs, not produced by the code under test."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from tunnel import socksproto as sp
from tunnel.socks import SessionRecord, SocksSettings, address_refusal, destination_refusal
from webproxy.config import from_dict
from webproxy.socksgate import log_fields

# -- method negotiation (RFC 1928 section 3) ------------------------------------------------------

def test_greeting_needs_all_its_bytes():
    assert sp.parse_greeting(b"") is None
    assert sp.parse_greeting(b"\x05") is None
    assert sp.parse_greeting(b"\x05\x02\x00") is None
    assert sp.parse_greeting(b"\x05\x02\x00\x02rest") == ([0, 2], 4)


def test_greeting_of_another_version_is_closed_without_reply():
    with pytest.raises(sp.SocksError) as e:
        sp.parse_greeting(b"\x04\x01\x00")
    assert e.value.reply is None


@pytest.mark.parametrize("offered, auth, chosen", [
    ([0], False, 0x00), ([0, 2], False, 0x00), ([2], False, 0xFF), ([], False, 0xFF),
    ([0, 2], True, 0x02), ([2], True, 0x02), ([0], True, 0xFF), ([1], True, 0xFF),
])
def test_method_choice(offered, auth, chosen):
    assert sp.choose_method(offered, auth) == chosen
    assert sp.method_reply(chosen) == bytes([5, chosen])


# -- RFC 1929 -----------------------------------------------------------------------------------

def test_username_password_subnegotiation():
    msg = b"\x01\x05alice\x06s3cr t"
    for cut in range(len(msg)):
        assert sp.parse_userpass(msg[:cut]) is None
    assert sp.parse_userpass(msg + b"more") == ("alice", "s3cr t", len(msg))
    assert sp.parse_userpass(b"\x01\x00\x00") == ("", "", 3)
    with pytest.raises(sp.SocksError):
        sp.parse_userpass(b"\x05\x01a\x01b")
    assert sp.USERPASS_OK == b"\x01\x00" and sp.USERPASS_FAILED[1] != 0


# -- requests and replies (sections 4, 5, 6) ----------------------------------------------------

def test_requests_for_each_address_type():
    v4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    assert sp.parse_request(v4) == (sp.Request(1, sp.Address(1, "127.0.0.1", 80)), 10)
    v6 = b"\x05\x01\x00\x04" + ipaddress.IPv6Address("2001:db8::1").packed + b"\x01\xbb"
    req, used = sp.parse_request(v6 + b"payload")
    assert req.dst == sp.Address(4, "2001:db8::1", 443) and used == 22 and str(req.dst) == "[2001:db8::1]:443"
    name = b"\x05\x03\x00\x03\x0bExample.COM\x00\x35"
    assert sp.parse_request(name)[0] == sp.Request(3, sp.Address(3, "example.com", 53))
    for full in (v4, v6, name):
        for cut in range(len(full)):
            assert sp.parse_request(full[:cut]) is None


@pytest.mark.parametrize("data, code", [
    (b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", sp.COMMAND_NOT_SUPPORTED),
    (b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", sp.ADDRESS_TYPE_NOT_SUPPORTED),
    (b"\x05\x01\x00\x05", sp.ADDRESS_TYPE_NOT_SUPPORTED),
    (b"\x05\x01\x00\x03\x03a b\x00\x50", sp.HOST_UNREACHABLE),  # not a host name
    (b"\x05\x01\x00\x03\x02\xc3\xa9\x00\x50", sp.HOST_UNREACHABLE),  # not ASCII (send IDNA)
    (b"\x05\x01\x00\x03\x00\x00\x50", sp.HOST_UNREACHABLE),  # empty name
    (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", sp.GENERAL_FAILURE),
])
def test_bad_requests_name_their_reply_code(data, code):
    with pytest.raises(sp.SocksError) as e:
        sp.parse_request(data)
    assert e.value.reply == code


def test_replies_are_byte_exact():
    assert sp.encode_reply(0, "10.1.2.3", 1080) == b"\x05\x00\x00\x01\x0a\x01\x02\x03\x04\x38"
    assert sp.encode_reply(5) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    assert sp.encode_reply(0, "::1", 1) == b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x01"


@pytest.mark.parametrize("kind, err, code", [
    ("denied", None, 0x02), ("refused", None, 0x05), ("timeout", None, 0x06), ("dns", None, 0x04),
    ("unreachable", errno.ENETUNREACH, 0x03), ("unreachable", errno.EHOSTUNREACH, 0x04),
    ("unreachable", None, 0x04), ("unreachable", errno.EMFILE, 0x01), ("failed", None, 0x01),
])
def test_upstream_failures_map_to_rfc_reply_codes(kind, err, code):
    assert sp.reply_for_failure(kind, err) == code


# -- UDP header (section 7) ---------------------------------------------------------------------

def test_udp_header_both_ways():
    pkt = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x1f\x90hello"
    assert sp.parse_udp(pkt) == (0, sp.Address(1, "127.0.0.1", 8080), b"hello")
    assert sp.encode_udp("127.0.0.1", 8080, b"hello") == pkt
    assert sp.parse_udp(b"\x00\x00\x07\x03\x01a\x00\x35x")[0] == 7  # FRAG is reported (and dropped)
    for bad in (b"", b"\x00\x00", b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x00\x00\x00\x01\x7f"):
        with pytest.raises(sp.SocksError):
            sp.parse_udp(bad)


# -- decisions ----------------------------------------------------------------------------------

def shipped() -> SocksSettings:
    return SocksSettings.from_section(from_dict({}).socks, 10.0)


def test_shipped_defaults_refuse_loopback_and_this_host():
    s = shipped()
    assert s.deny_local and s.commands == ["connect", "udp", "bind"] and s.allow_ports == []
    assert address_refusal("127.0.0.1", s) and address_refusal("::1", s)
    assert address_refusal("::ffff:127.0.0.1", s)  # IPv4-mapped spelling of loopback
    assert address_refusal("0.0.0.0", s) and address_refusal("::", s)
    assert address_refusal("192.0.2.1", s) is None  # TEST-NET-1: not ours


def test_ports_and_domains():
    s = SocksSettings(allow_ports=[443])
    dst = sp.Address(3, "www.example.com", 443)
    assert destination_refusal(dst, s, lambda h: None) is None
    assert "allow_ports" in destination_refusal(sp.Address(3, "www.example.com", 80), s, lambda h: None)
    assert destination_refusal(dst, s, lambda h: f"{h} blocked") == "www.example.com blocked"
    assert destination_refusal(sp.Address(1, "1.2.3.4", 9), SocksSettings(), lambda h: None) is None


def test_log_fields_are_squid_shaped():
    ok = SessionRecord(0.0, "10.0.0.7", "CONNECT", "example.com:443", "al ice", 0, "93.184.216.34", 100, 5000)
    assert log_fields(ok) == ("TCP_TUNNEL", 200, 5100, "SOCKS5-CONNECT", "example.com:443",
                              "HIER_DIRECT/93.184.216.34", "al%20ice")
    denied = SessionRecord(0.0, "10.0.0.7", "UDP", "1.2.3.4:53", reply=sp.NOT_ALLOWED)
    assert log_fields(denied)[:2] == ("TCP_DENIED", 403)
    assert log_fields(SessionRecord(0.0, "10.0.0.7", "CONNECT", "h:1", reply=sp.TTL_EXPIRED))[:2] == ("TCP_TUNNEL", 504)
    assert log_fields(SessionRecord(0.0, "10.0.0.7", note="refused-full"))[:2] == ("TCP_DENIED", 503)
    assert log_fields(SessionRecord(0.0, "10.0.0.7", user="bob", reply=2, note="auth-failed"))[:2] == ("TCP_DENIED", 407)
