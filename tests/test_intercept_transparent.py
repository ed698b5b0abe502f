"""TLS interception in transparent mode, for real: client, gateway and server namespaces, the shipped
REDIRECT rules for port 443, an HTTPS origin with a trustme certificate. A ClientHello naming a
listed domain is intercepted (our certificate, the second answer from the cache); any other name
reaches its origin untouched (the origin's own certificate)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import trustme

from tests.netns_support import SERVER, Topology, skip_reason
from tests.support import run_webproxy

_REASON = skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

HTTPS_ORIGIN = r"""
import ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

cert, key, hits = sys.argv[1], sys.argv[2], sys.argv[3]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open(hits, "a") as f:
            f.write(self.path + "\n")
        body = f"secure {self.path} for {self.headers.get('Host')}\n".encode()
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

srv = ThreadingHTTPServer(("0.0.0.0", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("tlsgw")
    topo = Topology(tmp)
    try:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp / "origin-ca.pem"))
        leaf = ca.issue_cert("origin.test", "plain.test")
        leaf.cert_chain_pems[0].write_to_path(str(tmp / "origin.pem"))
        leaf.private_key_pem.write_to_path(str(tmp / "origin-key.pem"))
        hits = tmp / "tls-hits.txt"
        hits.write_text("")
        topo.procs.append(subprocess.Popen(["ip", "netns", "exec", topo.server, sys.executable, "-c", HTTPS_ORIGIN,
                                            str(tmp / "origin.pem"), str(tmp / "origin-key.pem"), str(hits)]))
        topo.iptables("redirect", 3129, "443")
        r = run_webproxy("ca", "init", "--dir", str(tmp / "ca"))
        assert r.returncode == 0, r.stderr
        proxy = topo.proxy("p", {
            "server": {"listen": ["127.0.0.1:3128"]},
            "access": {"allow_clients": ["127.0.0.0/8", "10.0.0.0/8"]},
            "transparent": {"listen": ["0.0.0.0:3129"], "mode": "redirect", "sniff_timeout": 0.5},
            "tls": {"ca_dir": str(tmp / "ca"), "intercept": ["origin.test"],
                    "upstream_ca_file": str(tmp / "origin-ca.pem")},
        })
        deadline = time.monotonic() + 20
        while subprocess.run(["ip", "netns", "exec", topo.gateway, "curl", "-s", "-o", "/dev/null", "--cacert",
                              str(tmp / "origin-ca.pem"), "--resolve", f"origin.test:443:{SERVER}",
                              "https://origin.test/"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "the HTTPS origin did not start"
            time.sleep(0.1)
        hits.write_text("")
        yield {"topo": topo, "proxy": proxy, "hits": hits, "ca": str(tmp / "ca" / "ca.pem"),
               "origin_ca": str(tmp / "origin-ca.pem")}
    finally:
        topo.close()


def client_curl(gw: dict, name: str, cafile: str, path: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ip", "netns", "exec", gw["topo"].client, "curl", "-sS", "-m", "20", "--cacert", cafile,
                           "--resolve", f"{name}:443:{SERVER}", f"https://{name}{path}"], capture_output=True, timeout=30)


def test_a_redirected_tls_connection_naming_a_listed_domain_is_intercepted_and_cached(gw):
    for _ in range(2):
        r = client_curl(gw, "origin.test", gw["ca"], "/cached")  # trusts only the webproxy CA
        assert r.returncode == 0, r.stderr + gw["proxy"].err.read_bytes()[-2000:]
        assert r.stdout == b"secure /cached for origin.test\n"
    assert gw["hits"].read_text().splitlines().count("/cached") == 1
    text = gw["proxy"].access_log("https://origin.test/cached")
    lines = [ln for ln in text.splitlines() if "https://origin.test/cached" in ln]
    deadline = time.monotonic() + 5
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = [ln for ln in gw["proxy"].log.read_text().splitlines() if "https://origin.test/cached" in ln]
    assert "HIT/200" in lines[-1], lines


def test_a_redirected_tls_connection_naming_another_domain_is_relayed_untouched(gw):
    r = client_curl(gw, "plain.test", gw["origin_ca"], "/raw")  # trusts only the origin's CA
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"secure /raw for plain.test\n"
    assert "/raw" in gw["hits"].read_text().splitlines()
