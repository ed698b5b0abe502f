"""The authentication policy as pure functions (webproxy.authpolicy): no sockets, no files."""

from __future__ import annotations

import base64

import pytest

from webproxy import config
from webproxy.authpolicy import (
    FORGET_AFTER,
    MAX_DELAY,
    Credentials,
    Kind,
    admit,
    challenge,
    count_failure,
    credential_key,
    failure_delay,
    identity,
    parse_basic,
    rule_refusal,
    worth_logging,
)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def rules(*tables: dict) -> list[dict]:
    return config.from_dict({"auth": {"rule": list(tables)}}).auth["rule"]


@pytest.mark.parametrize("value, expected", [
    (f"Basic {b64(b'alice:secret')}", Credentials("alice", "secret")),
    (f"basic   {b64(b'alice:secret')}", Credentials("alice", "secret")),  # the scheme is case-insensitive
    (f"BASIC {b64(b'alice:se:cr:et')}", Credentials("alice", "se:cr:et")),  # the user ends at the first colon
    (f"Basic {b64('jörg:pässwort'.encode())}", Credentials("jörg", "pässwort")),  # UTF-8 (RFC 7617 2.1)
    (f"Basic {b64(b'alice:')}", Credentials("alice", "")),
])
def test_basic_credentials_are_parsed(value, expected):
    assert parse_basic(value) == expected


@pytest.mark.parametrize("value, why", [
    ("Basic !!!notbase64", "not valid base64"),
    ("Basic YWxpY2U=6c2VjcmV0", "not valid base64"),  # padding inside
    (f"Basic {b64(b'alicesecret')}", "no colon"),
    (f"Basic {b64(bytes([0xff, 0xfe]) + b':pw')}", "not UTF-8"),
    (f"Basic {b64(b':pw')}", "no valid user"),
    ("Basic " + b64(b"al\x01ice:pw"), "no valid user"),
    ("Digest username=\"alice\"", "only Basic"),
    ("Bearer abc", "only Basic"),
    ("", "only Basic"),
    ("Basic", "empty"),
])
def test_malformed_credentials_say_why(value, why):
    result = parse_basic(value)
    assert isinstance(result, str) and why in result


def test_exempt_clients_pass_whatever_they_send():
    assert admit(None, True, None, None).kind is Kind.PASS
    assert admit("Basic garbage", True, None, None).kind is Kind.PASS


def test_no_credentials_is_a_challenge_not_a_counted_failure():
    step = admit(None, False, None, None)
    assert step.kind is Kind.CHALLENGE and not step.attempt


def test_a_connection_s_inherited_user_answers_requests_without_credentials():
    alice = identity("alice", {"staff"})
    assert admit(None, False, alice, None).user is alice


def test_a_remembered_verdict_skips_verification():
    alice = identity("alice")
    assert admit(f"Basic {b64(b'alice:pw')}", False, None, alice).user is alice


def test_unremembered_credentials_are_verified():
    step = admit(f"Basic {b64(b'alice:pw')}", False, None, None)
    assert step.kind is Kind.VERIFY and step.credentials == Credentials("alice", "pw")


def test_malformed_basic_is_a_counted_failure_but_another_scheme_is_not():
    assert admit("Basic %%%", False, None, None).attempt
    step = admit("Negotiate abc", False, None, None)
    assert step.kind is Kind.CHALLENGE and not step.attempt


def test_challenge_quotes_the_realm():
    assert challenge('Corp "HQ"') == ("Proxy-Authenticate", 'Basic realm="Corp \\"HQ\\"", charset="UTF-8"')


def test_credential_key_depends_on_the_whole_field_and_the_secret():
    a = credential_key("Basic YTpi", b"k1")
    assert a == credential_key("Basic YTpi", b"k1")
    assert a != credential_key("Basic YTpj", b"k1")
    assert a != credential_key("Basic YTpi", b"k2")
    assert b"YTpi" not in a


def test_log_name_is_percent_encoded_like_squid():
    assert identity("jörg smith").log_name == "j%C3%B6rg%20smith"


def test_first_matching_rule_wins():
    table = rules({"name": "students", "groups": ["students"], "deny_domains": ["games.example"]},
                  {"groups": [], "allow_domains": ["example.org"]})
    bob = identity("bob", {"students"})
    why = rule_refusal(bob, table, "games.example", 80, False)
    assert why is not None and 'auth.rule[0] "students"' in why and "bob" in why
    # bob's rule is the first one: the catch-all's allow list does not apply to him
    assert rule_refusal(bob, table, "elsewhere.example", 80, False) is None
    carol = identity("carol")
    why = rule_refusal(carol, table, "elsewhere.example", 80, False)
    assert why is not None and "auth.rule[1]" in why
    assert rule_refusal(carol, table, "www.example.org", 80, False) is None


def test_no_matching_rule_falls_back_to_access():
    table = rules({"groups": ["staff"], "deny_domains": ["example.com"]})
    assert rule_refusal(identity("dave", {"guests"}), table, "example.com", 80, False) is None
    assert rule_refusal(None, table, "example.com", 80, False) is None  # exempt clients


def test_rule_connect_ports_apply_to_connect_only():
    table = rules({"groups": ["students"], "connect_ports": [443]})
    bob = identity("bob", {"students"})
    why = rule_refusal(bob, table, "example.com", 8443, True)
    assert why is not None and "port 8443" in why and "443" in why
    assert rule_refusal(bob, table, "example.com", 443, True) is None
    assert rule_refusal(bob, table, "example.com", 8443, False) is None


def test_failures_grow_a_delay_up_to_a_cap_and_are_forgotten():
    state = None
    delays = []
    for t in range(12):
        state = count_failure(state, float(t))
        delays.append(failure_delay(state[0]))
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))
    assert delays[4] > delays[3] > 0 and delays[-1] == MAX_DELAY
    assert count_failure(state, 11 + FORGET_AFTER + 1) == (1, 11 + FORGET_AFTER + 1)


def test_failures_are_logged_at_powers_of_two():
    assert [n for n in range(1, 40) if worth_logging(n)] == [1, 2, 4, 8, 16, 32]
