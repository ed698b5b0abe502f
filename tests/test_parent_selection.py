"""Which hops a request tries (webproxy.parents): pure rules, no sockets."""

from __future__ import annotations

import base64
import re
from collections import Counter

import pytest

from tunnel.parentdial import connect_request, parse_answer
from webproxy import config, logcodes
from webproxy.parents import DIRECT, DownTable, Parent, check, parse_parents, select, unreachable

A = Parent("a.example", 3128)
B = Parent("b.example", 3128)
LAB = Parent("lab.example", 8080, domains=("lab.test",))


def up(**kw: object) -> dict[str, object]:
    base = config.load(None).upstream
    return {**base, **kw}


def test_without_parents_everything_goes_direct():
    plan = select("example.com", up(), (), {}, 0.0)
    assert plan.hops == (DIRECT,) and plan.direct_only


def test_first_up_keeps_config_order_then_direct():
    plan = select("example.com", up(), (A, B), {}, 0.0)
    assert plan.hops == (A, B, DIRECT) and plan.code == logcodes.FIRSTUP_PARENT


def test_a_single_candidate_is_the_default_parent():
    assert select("example.com", up(), (A,), {}, 0.0).code == logcodes.DEFAULT_PARENT


def test_domains_choose_the_candidates():
    assert select("www.lab.test", up(), (LAB, A), {}, 0.0).hops == (LAB, A, DIRECT)
    assert select("lab.test", up(), (LAB, A), {}, 0.0).hops == (LAB, A, DIRECT)
    assert select("notlab.test", up(), (LAB, A), {}, 0.0).hops == (A, DIRECT)
    assert select("example.com", up(), (LAB,), {}, 0.0).hops == (DIRECT,)


def test_always_direct_domains_and_intercepted_requests_skip_parents():
    cfg = up(always_direct=["intranet.example"], never_direct=True)
    assert select("wiki.intranet.example", cfg, (A,), {}, 0.0).hops == (DIRECT,)
    assert select("example.com", up(), (A,), {}, 0.0, intercepted=True).hops == (DIRECT,)


def test_a_down_parent_is_skipped_until_its_time_is_up():
    down = {A.name: 100.0}
    assert select("example.com", up(), (A, B), down, 99.0).hops == (B, DIRECT)
    assert select("example.com", up(), (A, B), down, 100.0).hops == (A, B, DIRECT)


def test_never_direct_tries_down_parents_last_and_never_direct():
    down = {A.name: 100.0}
    assert select("example.com", up(never_direct=True), (A, B), down, 50.0).hops == (B, A)
    assert select("example.com", up(never_direct=True), (A,), down, 50.0).hops == (A,)


def test_never_direct_with_no_parent_for_the_domain_has_no_hop_and_says_why():
    plan = select("example.com", up(never_direct=True), (LAB,), {}, 0.0)
    assert plan.hops == ()
    assert "no parent proxy serves example.com" in plan.reason and "lab.example:8080" in plan.reason


def test_weighted_selection_is_stable_per_host_and_follows_the_weights():
    heavy, light = Parent("heavy.example", 3128, weight=3), Parent("light.example", 3128, weight=1)
    cfg = up(parent_selection="weighted")
    first = Counter(select(f"site{i}.example", cfg, (heavy, light), {}, 0.0).hops[0].host for i in range(4000))
    assert 2800 < first["heavy.example"] < 3200  # 3/4 of sites
    plan = select("site7.example", cfg, (heavy, light), {}, 0.0)
    assert plan == select("site7.example", cfg, (light, heavy), {}, 0.0)  # order-independent
    assert plan.code == logcodes.CARP and plan.hops[-1] is DIRECT


def test_weighted_removing_a_parent_moves_only_its_sites():
    ps = tuple(Parent(f"p{i}.example", 3128) for i in range(3))
    cfg = up(parent_selection="weighted")
    before = {h: select(h, cfg, ps, {}, 0.0).hops[0] for h in (f"s{i}.example" for i in range(600))}
    after = {h: select(h, cfg, ps, {ps[2].name: 10.0}, 0.0).hops[0] for h in before}
    moved = [h for h in before if before[h] != after[h]]
    assert moved and all(before[h] == ps[2] for h in moved)


def test_down_time_grows_with_failures_in_a_row_and_resets_on_success():
    t = DownTable()
    assert t.failed("a:1", 0.0, 30.0) == 30.0
    assert t.failed("a:1", 30.0, 30.0) == 60.0
    assert t.failed("a:1", 90.0, 30.0) == 120.0
    for _ in range(5):
        last = t.failed("a:1", 0.0, 30.0)
    assert last == 240.0  # capped at 8x
    t.succeeded("a:1")
    assert "a:1" not in t.until and t.failed("a:1", 0.0, 30.0) == 30.0


def entry(**kw: object) -> dict[str, object]:
    return {"address": ("proxy.example", 3128), "username": "", "password": "", "domains": [], "weight": 1, **kw}


def test_credentials_become_a_basic_proxy_authorization_kept_out_of_repr():
    (p,) = parse_parents(up(parent=[entry(username="alice", password="pa:ss")]))
    assert p.fields() == [("Proxy-Authorization", "Basic " + base64.b64encode(b"alice:pa:ss").decode())]
    assert "pa:ss" not in repr(p) and "YWxpY2U6" not in repr(p)
    (anon,) = parse_parents(up(parent=[entry()]))
    assert anon.fields() == []


@pytest.mark.parametrize("cfg, message", [
    (up(never_direct=True), "no [[upstream.parent]] is configured"),
    (up(parent=[entry(password="x")]), "a password without a username"),
    (up(parent=[entry(address=("p.example", 0))]), "has no port"),
])
def test_bad_parent_config_is_one_clear_line(cfg, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        parse_parents(cfg)


def test_a_parent_on_our_own_listen_address_is_refused():
    cfg = up(parent=[entry(address=("127.0.0.1", 3128))])
    with pytest.raises(config.ConfigError, match="is this proxy's own listen address"):
        check(cfg, [("0.0.0.0", 3128)], lambda ip: True)
    check(cfg, [("127.0.0.1", 3129)], lambda ip: True)  # another port: another proxy


def test_parent_table_keys_are_checked_by_the_config_schema():
    cfg = config.from_dict({"upstream": {"parent": [{"address": "p.example:3128", "domains": "lab.test"}]}})
    assert cfg.upstream["parent"][0]["domains"] == ["lab.test"]
    with pytest.raises(config.ConfigError, match=r"'upstream.parent\[0\].address' is required"):
        config.from_dict({"upstream": {"parent": [{"username": "u"}]}})
    with pytest.raises(config.ConfigError, match=r"unknown key 'upstream.parent\[0\].port'"):
        config.from_dict({"upstream": {"parent": [{"address": "p:1", "port": 2}]}})


def test_the_connect_to_a_parent_and_its_answer():
    assert connect_request("::1", 443, [("Proxy-Authorization", "Basic eA==")]) == (
        b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nProxy-Authorization: Basic eA==\r\n\r\n")
    assert parse_answer(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y") == (407, "Proxy Authentication Required")
    assert parse_answer(b"HTTP/1.0 200") == (200, "")
    with pytest.raises(ValueError):
        parse_answer(b"SSH-2.0-OpenSSH")


def test_the_all_failed_message_names_every_parent():
    text = unreachable("example.com", [(A, "connection refused"), (B, "timed out")], True)
    assert "parent proxy a.example:3128: connection refused" in text
    assert "parent proxy b.example:3128: timed out" in text and "never_direct" in text
