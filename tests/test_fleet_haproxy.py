"""A fleet: HAProxy, run from the shipped conf/haproxy-fleet.cfg, in front of three webproxy nodes
(issue 14). Each URL is cached on exactly one node; a node that leaves moves only its own URLs,
and gets them back when it returns; CONNECT is hashed by its authority. What the tests read: the
X-Cache field naming the node, the nodes' access logs, the origin's request counters and HAProxy's
own view of its servers (runtime API)."""

from __future__ import annotations

import http.client
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fleet_support import (
    ADMIN_IP,
    CLIENT_IP,
    HAPROXY,
    OUTSIDER_IP,
    SHIPPED,
    EchoPorts,
    HAProxy,
    connect_through,
    fleet_request,
    log_entries,
    served_by,
)
from tests.support import Origin, ProxyProcess, wait_until

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")

NODES = ["node1", "node2", "node3"]
HAPROXY_IP = "127.0.0.1"  # HAProxy connects to the nodes from here


@dataclass
class Fleet:
    origin: Origin
    echo: EchoPorts
    nodes: dict[str, ProxyProcess]
    haproxy: HAProxy

    def get(self, url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        return fleet_request(self.haproxy.port, url, method)

    def all_up(self) -> bool:
        return self.haproxy.server_status() == dict.fromkeys(NODES, "UP")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    origin = Origin().start()
    echo = EchoPorts(12)
    nodes: dict[str, ProxyProcess] = {}
    haproxy = None
    try:
        for name in NODES:
            d = tmp / name
            d.mkdir()
            # A node's config as the README gives it: only HAProxy may connect (it is one client
            # address for every connection), each node its own cache directory.
            nodes[name] = ProxyProcess(d, {
                "server": {"name": name},
                "access": {"allow_clients": [f"{HAPROXY_IP}/32"], "admin_clients": [f"{HAPROXY_IP}/32"],
                           "max_connections_per_client": 0, "connect_ports": echo.ports},
            }).start()
        haproxy = HAProxy(tmp, [nodes[n].port for n in NODES]).start()
        f = Fleet(origin, echo, nodes, haproxy)
        assert wait_until(f.all_up, 10), haproxy.server_status()
        yield f
    finally:
        if haproxy is not None:
            haproxy.stop()
        for p in nodes.values():
            p.stop()
        echo.stop()
        origin.stop()


def test_the_shipped_file_is_valid_as_an_admin_copies_it() -> None:
    check = subprocess.run([str(HAPROXY), "-c", "-f", str(SHIPPED)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def warm(fleet: Fleet, prefix: str, n: int) -> dict[str, str]:
    """Put n cacheable objects at the origin and fetch each through the fleet: {url: node}."""
    owner = {}
    for i in range(n):
        url = fleet.origin.put(f"{prefix}{i}", f"{prefix} body {i}".encode(), Cache_Control="max-age=3600")
        status, fields, body = fleet.get(url)
        assert (status, body) == (200, f"{prefix} body {i}".encode())
        assert fields["x-cache"].startswith("MISS"), fields
        owner[url] = served_by(fields)
    return owner


def name_of(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def wait_logged(fleet: Fleet, node: str, url: str, count: int) -> list[tuple[str, str]]:
    """The (client, code) entries for `url` in `node`'s access log, once there are `count` of them."""
    entries: list[tuple[str, str]] = []

    def enough() -> bool:
        entries[:] = log_entries(fleet.nodes[node].access_lines(), url)
        return len(entries) >= count

    wait_until(enough, 5)
    return entries


def test_each_url_is_cached_on_exactly_one_node(fleet: Fleet) -> None:
    owner = warm(fleet, "one", 30)
    assert set(owner.values()) == set(NODES), Counter(owner.values())  # the URLs spread over the fleet
    for url, node in owner.items():
        status, fields, _ = fleet.get(url)
        assert status == 200 and fields["x-cache"] == f"HIT from {node}"
        assert fleet.origin.full[name_of(url)] == 1
    for url, node in owner.items():
        assert [code for _, code in wait_logged(fleet, node, url, 2)] == ["TCP_MISS", "TCP_MEM_HIT"]
        for other in set(NODES) - {node}:
            assert log_entries(fleet.nodes[other].access_lines(), url) == []


def test_connect_is_hashed_by_its_authority(fleet: Fleet) -> None:
    authorities = [f"127.0.0.1:{port}" for port in fleet.echo.ports]
    for _ in range(3):
        for a in authorities:
            reply = connect_through(fleet.haproxy.port, a)
            assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(f"{a.split(':')[1]}: ping\n".encode())
    where = {}
    for a in authorities:
        def logged(a: str = a) -> bool:
            where[a] = {n: len(log_entries(p.access_lines(), a)) for n, p in fleet.nodes.items()}
            return sum(where[a].values()) == 3
        assert wait_until(logged, 5), where[a]
        # All three tunnels to one authority went through one node (round robin would use three).
        assert sorted(where[a].values()) == [0, 0, 3], (a, where[a])
    used = {n for counts in where.values() for n, c in counts.items() if c}
    assert len(used) > 1, where  # ...and different authorities reach different nodes


def test_nodes_see_haproxy_and_origins_see_the_client(fleet: Fleet) -> None:
    url = fleet.origin.url("/echo/xff")
    status, fields, body = fleet.get(url)
    assert status == 200
    # option forwardfor (HAProxy writes field names in lower case), passed on by the node
    assert f"x-forwarded-for: {CLIENT_IP}\n" in body.decode().lower()
    node = served_by(fields)
    assert [client for client, _ in wait_logged(fleet, node, url, 1)] == [HAPROXY_IP]
    # A node lets in HAProxy only: the client itself is refused there.
    assert fleet_request(fleet.nodes[node].port, url)[0] == 403


def test_purge_through_the_fleet_is_for_admins_and_reaches_the_node_that_holds_the_url(fleet: Fleet) -> None:
    (url, node), = warm(fleet, "purge", 1).items()
    assert fleet.get(url, "PURGE")[0] == 403  # HAProxy's fleet_admins only
    assert fleet.get(url)[1]["x-cache"] == f"HIT from {node}"
    assert fleet_request(fleet.haproxy.port, url, "PURGE", source=ADMIN_IP)[0] == 200
    status, fields, _ = fleet.get(url)
    assert (status, fields["x-cache"]) == (200, f"MISS from {node}")
    assert fleet.origin.full[name_of(url)] == 2


def test_node_pages_are_for_fleet_admins_and_the_pac_file_for_every_client(fleet: Fleet) -> None:
    assert fleet.get("/status")[0] == 403
    status, _, body = fleet_request(fleet.haproxy.port, "/status", source=ADMIN_IP)
    assert status == 200 and b"<html" in body.lower()
    status, fields, _ = fleet.get("/proxy.pac")
    assert status == 200 and fields["content-type"] == "application/x-ns-proxy-autoconfig"


def test_clients_outside_fleet_clients_are_turned_away(fleet: Fleet) -> None:
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        fleet_request(fleet.haproxy.port, fleet.origin.url("/text/outsider"), source=OUTSIDER_IP)
    assert fleet.origin.hits["/text/outsider"] == 0


def test_a_node_that_leaves_moves_only_its_urls_and_gets_them_back(fleet: Fleet) -> None:
    owner = warm(fleet, "move", 24)
    leaving = owner[next(iter(owner))]
    theirs = [u for u, n in owner.items() if n == leaving]
    ours = [u for u, n in owner.items() if n != leaving]
    assert ours, Counter(owner.values())

    fleet.nodes[leaving].stop()
    assert wait_until(lambda: fleet.haproxy.server_status()[leaving] == "DOWN", 10), fleet.haproxy.server_status()
    for url in ours:  # the others keep their URLs: hits where they were
        status, fields, _ = fleet.get(url)
        assert (status, fields["x-cache"]) == (200, f"HIT from {owner[url]}")
        assert fleet.origin.full[name_of(url)] == 1
    moved_to = {}
    for url in theirs:  # the leaver's URLs are served by the others, fetched once more
        status, fields, _ = fleet.get(url)
        assert status == 200 and fields["x-cache"].startswith("MISS"), fields
        moved_to[url] = served_by(fields)
        assert moved_to[url] != leaving
        assert fleet.origin.full[name_of(url)] == 2

    fleet.nodes[leaving].start()  # same port, same cache directory
    assert wait_until(fleet.all_up, 10), fleet.haproxy.server_status()
    for url in theirs:  # its share comes back to it, still in its disk cache
        status, fields, _ = fleet.get(url)
        assert (status, fields["x-cache"]) == (200, f"HIT from {leaving}")
        assert fleet.origin.full[name_of(url)] == 2
    for url in ours:
        assert fleet.get(url)[1]["x-cache"] == f"HIT from {owner[url]}"
        assert fleet.origin.full[name_of(url)] == 1
    # Meanwhile the node that stood in never saw the others' URLs, and the leaver's log has them
    # once before it left (the miss) and once after its return (the hit).
    for url in theirs:
        assert [code for _, code in wait_logged(fleet, leaving, url, 2)] == ["TCP_MISS", "TCP_HIT"]
