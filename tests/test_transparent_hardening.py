"""Transparent mode under attack, for real: `webproxy run` in a gateway namespace behind the shipped
REDIRECT and TPROXY rules (tests/netns_support.py), a client namespace that knows nothing of the
proxy, and a server namespace with an HTTP origin and an SSH-like banner service that record who
connected. Each test asserts what the client and the servers observe.

    REDIRECT: ports 80 (HTTP), 22 (banner) -> proxy "redirect" on 3129
    TPROXY:   ports 8080 (HTTP), 2222 (banner) -> proxy "tproxy" on 3130, spoof_client_address = true
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.netns_support import (
    CLIENT,
    GW_C,
    GW_S,
    SERVER,
    Topology,
    ns_socket,
    read_line,
    read_until_closed,
    skip_reason,
)

_REASON = skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

MODES = {"redirect": (80, 22), "tproxy": (8080, 2222)}
PER_CLIENT = 20


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    t = Topology(tmp_path_factory.mktemp("hardening"))
    try:
        t.iptables("redirect", 3129, "80,22")
        t.iptables("tproxy", 3130, "8080,2222")
        t.start_origin([80, 8080], [22, 2222])
        common = {
            "access": {"allow_clients": ["127.0.0.0/8", "10.202.0.0/16"], "deny_domains": ["blocked.test"],
                       "max_connections_per_client": PER_CLIENT},
        }
        t.modes = {
            "redirect": t.proxy("redirect", {**common, "server": {"listen": ["127.0.0.1:3128"]},
                                             "transparent": {"listen": ["0.0.0.0:3129"], "mode": "redirect",
                                                             "sniff_timeout": 0.3}}),
            "tproxy": t.proxy("tproxy", {**common, "server": {"listen": ["127.0.0.1:3138"]},
                                         "transparent": {"listen": ["0.0.0.0:3130"], "mode": "tproxy",
                                                         "sniff_timeout": 0.3, "spoof_client_address": True}}),
        }
        yield t
    finally:
        t.close()


@pytest.fixture(params=sorted(MODES))
def mode(request, topo):
    proxy = topo.modes[request.param]
    http_port, raw_port = MODES[request.param]
    yield request.param, proxy, http_port, raw_port
    assert proxy.proc.poll() is None, "the proxy died"


def exchange(topo, port: int, data: bytes, half_close: bool = False) -> bytes:
    with topo.connect(SERVER, port) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_until_closed(s)


def get(topo, port: int, target: str, host: str, extra: str = "") -> bytes:
    return exchange(topo, port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode())


def named(host: str, port: int) -> str:
    """The authority a request names: a Host without a port on a non-80 connection gets the port dialled."""
    return host if ":" in host or port == 80 else f"{host}:{port}"


def hits_for(topo, path: str) -> list[list[str]]:
    return [h for h in topo.origin_hits() if h[0] == path]


# ---- item 1: raw relays pass the same client check and limits as HTTP ---------------------------------

def test_raw_relay_is_refused_once_sighup_removes_the_client_network(topo, mode):
    name, proxy, http_port, raw_port = mode
    before = len(topo.banner.peers)
    proxy.reconfigure("access", allow_clients=["127.0.0.0/8"])
    try:
        with topo.connect(SERVER, raw_port) as s:
            assert read_line(s) == b""  # closed (reset) without a banner
        assert b"403 Forbidden" in get(topo, http_port, "/denied", SERVER)
        proxy.wait_stderr(f"client={CLIENT}:", "a log line for the refused relay")
        proxy.wait_stderr("end=denied")
        assert len(topo.banner.peers) == before  # nothing reached the server
    finally:
        proxy.reconfigure("access", allow_clients=["127.0.0.0/8", "10.202.0.0/16"])
    with topo.connect(SERVER, raw_port) as s:
        assert read_line(s).startswith(b"SSH-2.0-test")


def test_raw_relays_count_against_the_per_client_connection_limit(topo, mode):
    name, proxy, http_port, raw_port = mode
    before = len(topo.banner.peers)
    socks = [topo.connect(SERVER, raw_port) for _ in range(PER_CLIENT + 10)]
    try:
        lines = [read_line(s) for s in socks]
        relayed = [line for line in lines if line.startswith(b"SSH-2.0-test")]
        assert len(relayed) == PER_CLIENT and lines.count(b"") == 10, lines
        assert len(topo.banner.peers) - before == PER_CLIENT
        proxy.wait_stderr("end=refused (your address")
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10  # the slots come back when the relays end
    while True:
        with topo.connect(SERVER, raw_port) as s:
            if read_line(s).startswith(b"SSH-2.0-test"):
                break
        assert time.monotonic() < deadline, "slots were not released"
        time.sleep(0.2)


# ---- item 2: whatever starts like HTTP is read as HTTP ---------------------------------------------

def _slow(s: socket.socket, data: bytes, delay: float) -> None:
    for i in range(len(data)):
        s.sendall(data[i:i + 1])
        time.sleep(delay)


@pytest.mark.parametrize("shape", ["long-query", "slow-first-line", "leading-blank-line"])
def test_request_the_sniffer_cannot_classify_in_time_is_still_served_as_http(topo, mode, shape):
    name, proxy, http_port, raw_port = mode
    path = f"/sniff-{shape}-{name}"
    with topo.connect(SERVER, http_port) as s:
        if shape == "long-query":
            s.sendall(f"GET {path}?q={'a' * 5000} HTTP/1.1\r\nHost: blocked.test\r\nConnection: close\r\n\r\n".encode())
        elif shape == "slow-first-line":
            first = f"GET {path} HTTP/1.1\r\n".encode()
            _slow(s, first[:12], 0.12)  # well past sniff_timeout (0.3 s) before the line is whole
            s.sendall(first[12:] + b"Host: blocked.test\r\nConnection: close\r\n\r\n")
        else:
            s.sendall(f"\r\nGET {path} HTTP/1.1\r\nHost: blocked.test\r\nConnection: close\r\n\r\n".encode())
        answer = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"blocked.test" in answer
    assert hits_for(topo, path) == [] and not any(h[0].startswith(path) for h in topo.origin_hits())
    log = proxy.access_log(f"http://{named('blocked.test', http_port)}{path}")
    assert f"{CLIENT} TCP_DENIED/403" in next(line for line in log.splitlines() if path in line)


# ---- item 3: a FIN after a complete request on an intercepted connection --------------------------------

def test_request_then_half_close_on_an_intercepted_connection_is_answered(topo, mode):
    name, proxy, http_port, raw_port = mode
    path = f"/half-close-{name}"
    answer = exchange(topo, http_port, f"GET {path} HTTP/1.1\r\nHost: {SERVER}\r\n\r\n".encode(), half_close=True)
    expected = f"page {path} for {named(SERVER, http_port)}\n".encode()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(expected), answer


# ---- items 4 and 5: the original destination is the authority ---------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1:3128", f"{GW_C}:3129", f"{GW_C}:3130", "localhost:3138", GW_C])
def test_host_naming_the_proxy_itself_is_fetched_from_the_original_destination(topo, mode, host):
    name, proxy, http_port, raw_port = mode
    path = f"/self-{name}-{host.replace(':', '_')}"
    answer = get(topo, http_port, path, host)
    expected = named(host, http_port)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(f"page {path} for {expected}\n".encode()), answer
    assert [h[1] for h in hits_for(topo, path)] == [expected]
    assert b"RecursionError" not in proxy.err.read_bytes()


@pytest.fixture(scope="module")
def gateway_service(topo):
    """A service on the gateway's loopback that the proxy must never be made to reach."""
    ls = ns_socket(topo.gateway)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 8999))
    ls.listen(8)
    accepted: list[object] = []

    def accept() -> None:
        while True:
            try:
                c, addr = ls.accept()
            except OSError:
                return
            accepted.append(addr)
            c.close()

    threading.Thread(target=accept, daemon=True).start()
    yield accepted
    ls.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8999/abs1", "http://other.test/abs2", "http://127.0.0.1:3128/abs3"])
def test_absolute_form_request_is_fetched_from_the_original_destination(topo, mode, gateway_service, url):
    name, proxy, http_port, raw_port = mode
    target = f"{url}-{name}"
    path = target.split("/", 3)[3]
    before = len(gateway_service)
    answer = get(topo, http_port, target, "ignored.test")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert len(hits_for(topo, "/" + path)) == 1
    assert len(gateway_service) == before == 0


def test_connect_on_an_intercepted_connection_is_400(topo, mode, gateway_service):
    name, proxy, http_port, raw_port = mode
    answer = exchange(topo, http_port, b"CONNECT 127.0.0.1:8999 HTTP/1.1\r\nHost: 127.0.0.1:8999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"intercepted" in answer, answer
    assert len(gateway_service) == 0


# ---- item 13: which connections spoof the client's address ------------------------------------------

def test_tproxy_spoofs_the_client_address_on_raw_relays_and_not_on_http_fetches(topo):
    with topo.connect(SERVER, 2222) as s:
        assert read_line(s) == f"SSH-2.0-test peer={CLIENT}\r\n".encode()
    path = "/spoof-http"
    assert get(topo, 8080, path, SERVER).startswith(b"HTTP/1.1 200")
    assert [h[2] for h in hits_for(topo, path)] == [GW_S]  # documented: HTTP comes from the gateway


def test_redirect_never_spoofs(topo):
    with topo.connect(SERVER, 22) as s:
        assert read_line(s) == f"SSH-2.0-test peer={GW_S}\r\n".encode()
