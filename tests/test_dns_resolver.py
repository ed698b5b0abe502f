"""The shared resolver (webproxy.dns): TTL cache, one lookup in flight per name, IP literals
without a lookup, the answer shape tunnels and transparent mode read, the getaddrinfo fallback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from webproxy import dns
from webproxy.dns import DNSError, Resolver


class Counting:
    """A lookup hook: answers from a table, counts calls, can be slowed down."""

    def __init__(self, table: dict[str, list[tuple[int, str]]], delay: float = 0.0) -> None:
        self.table = table
        self.delay = delay
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[tuple[int, str]]:
        self.calls.append(host)
        if self.delay:
            await asyncio.sleep(self.delay)
        if host not in self.table:
            raise DNSError(4, "Domain name not found")
        return self.table[host]


TABLE = {"origin.test": [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]}


async def test_answers_are_cached_for_the_ttl():
    hook = Counting(TABLE)
    r = Resolver(60, lookup=hook)
    for _ in range(5):
        assert await r.address("origin.test", 80) == "127.0.0.1"
    assert hook.calls == ["origin.test"]


async def test_ttl_zero_looks_up_every_time():
    hook = Counting(TABLE)
    r = Resolver(0, lookup=hook)
    for _ in range(3):
        await r.addresses("origin.test", 80)
    assert len(hook.calls) == 3


async def test_an_expired_answer_is_looked_up_again():
    hook = Counting(TABLE)
    r = Resolver(0.2, lookup=hook)
    await r.addresses("origin.test")
    await r.addresses("origin.test")
    await asyncio.sleep(0.3)
    await r.addresses("origin.test")
    assert len(hook.calls) == 2


async def test_concurrent_lookups_of_one_name_share_one_query():
    hook = Counting(TABLE, delay=0.1)
    r = Resolver(60, lookup=hook)
    answers = await asyncio.gather(*(r.addresses("origin.test") for _ in range(10)))
    assert hook.calls == ["origin.test"]
    assert all(a == answers[0] for a in answers)


async def test_the_ftp_address_prefers_ipv4():
    r = Resolver(60, lookup=Counting({"dual.test": [(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")],
                                      "v6.test": [(socket.AF_INET6, "::1")]}))
    assert await r.address("dual.test", 21) == "127.0.0.1"
    assert await r.address("v6.test", 21) == "::1"


async def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(dns, "MAX_CACHED", 10)

    async def any_name(host: str, port: int) -> list[tuple[int, str]]:
        return [(socket.AF_INET, "127.0.0.1")]

    r = Resolver(60, lookup=any_name)
    for i in range(50):
        await r.addresses(f"host{i}.test")
    assert len(r._cache) <= 10
    assert "host49.test" in r._cache  # the newest answers stay


async def test_ip_literals_are_answered_without_a_lookup():
    hook = Counting({})
    r = Resolver(60, lookup=hook)
    assert await r.addresses("127.0.0.1") == [(socket.AF_INET, "127.0.0.1")]
    assert await r.addresses("[::1]") == [(socket.AF_INET6, "::1")]
    assert await r.address("::1") == "::1"
    assert hook.calls == []


async def test_failures_raise_dns_error_and_are_not_cached():
    hook = Counting({})
    r = Resolver(60, lookup=hook)
    for _ in range(2):
        with pytest.raises(DNSError) as e:
            await r.addresses("nowhere.test")
        assert isinstance(e.value, OSError)  # what tunnel.connect and the FTP pool expect
    assert len(hook.calls) == 2


async def test_resolve_keeps_the_aiohttp_answer_shape():
    r = Resolver(60, lookup=Counting(TABLE))
    found = await r.resolve("origin.test", 8080)
    assert found[0] == {"hostname": "origin.test", "host": "127.0.0.1", "port": 8080,
                        "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}
    assert [a["host"] for a in found] == ["127.0.0.1", "::1"]
    v6 = await r.resolve("origin.test", 80, family=socket.AF_INET6)
    assert [a["host"] for a in v6] == ["::1"]


async def test_real_lookup_of_localhost_through_aiodns():
    r = Resolver(60)
    assert "127.0.0.1" in [ip for _, ip in await r.addresses("localhost", 80)]
    with pytest.raises(DNSError):
        await r.addresses("no-such-host.invalid", 80)


async def test_getaddrinfo_is_used_when_aiodns_cannot_start(monkeypatch):
    monkeypatch.setattr(dns, "_aiodns_lookup", lambda: None)
    r = Resolver(60)
    assert "127.0.0.1" in [ip for _, ip in await r.addresses("localhost", 80)]
    with pytest.raises(DNSError):
        await r.addresses("no-such-host.invalid", 80)
