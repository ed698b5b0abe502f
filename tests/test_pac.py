"""The PAC file as a browser uses it: fetched from the proxy (/proxy.pac and /wpad.dat), then its
FindProxyForURL evaluated in Node with the PAC helper functions browsers provide (as Chromium and
Firefox define them), for a table of URLs."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.support import curl

# isPlainHostName and dnsDomainIs exactly as Chromium's and Firefox's PAC runtimes define them;
# the script must need nothing else (no DNS: no isInNet / dnsResolve calls).
NODE_RUNTIME = r"""
const vm = require("vm");
const fs = require("fs");
const [pacPath, tablePath] = process.argv.slice(2);
const sandbox = {
  isPlainHostName: (host) => host.search("(\\.)|:") === -1,
  dnsDomainIs: (host, domain) => host.length >= domain.length &&
    host.substring(host.length - domain.length) === domain,
  dnsResolve: () => { throw new Error("the PAC file must not resolve names"); },
  isInNet: () => { throw new Error("the PAC file must not call isInNet (it resolves names)"); },
};
vm.createContext(sandbox);
vm.runInContext(fs.readFileSync(pacPath, "utf8"), sandbox);
const out = {};
for (const [url, host] of JSON.parse(fs.readFileSync(tablePath, "utf8"))) {
  out[url] = sandbox.FindProxyForURL(url, host);
}
console.log(JSON.stringify(out));
"""

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def find_proxy(tmp_path, pac: bytes, table: list[tuple[str, str]]) -> dict[str, str]:
    (tmp_path / "proxy.pac").write_bytes(pac)
    (tmp_path / "table.json").write_text(json.dumps(table))
    (tmp_path / "runtime.js").write_text(NODE_RUNTIME)
    r = subprocess.run(["node", str(tmp_path / "runtime.js"), str(tmp_path / "proxy.pac"),
                        str(tmp_path / "table.json")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# (url, host as the browser passes it, expected answer); PROXY is the configured pac.proxy.
TABLE = [
    ("http://www.example.com/", "www.example.com", "PROXY"),
    ("https://www.example.com/login", "www.example.com", "PROXY"),
    ("http://intranet.example/", "intranet.example", "DIRECT"),
    ("http://wiki.intranet.example/page", "wiki.intranet.example", "DIRECT"),
    ("http://WIKI.Intranet.Example/", "WIKI.Intranet.Example", "DIRECT"),
    ("http://notintranet.example/", "notintranet.example", "PROXY"),  # a suffix, not a subdomain
    ("http://intranet.example.evil.com/", "intranet.example.evil.com", "PROXY"),
    ("http://printer/", "printer", "DIRECT"),  # plain host names are local
    ("http://localhost:8080/", "localhost", "DIRECT"),
    ("http://app.localhost/", "app.localhost", "DIRECT"),
    ("http://127.0.0.1:9000/", "127.0.0.1", "DIRECT"),
    ("http://[::1]/", "::1", "DIRECT"),
    ("http://[::1]/x", "[::1]", "DIRECT"),
    ("http://10.1.2.3/", "10.1.2.3", "DIRECT"),
    ("http://10.255.255.255/", "10.255.255.255", "DIRECT"),
    ("http://11.0.0.1/", "11.0.0.1", "PROXY"),
    ("http://192.168.7.9/", "192.168.7.9", "DIRECT"),
    ("http://192.168.8.1/", "192.168.8.1", "PROXY"),  # outside 192.168.7.0/24
    ("http://[fd12:3456::1]/", "fd12:3456::1", "DIRECT"),
    ("http://[fe80::1]/", "fe80::1", "PROXY"),
    ("http://[2001:db8::5]/", "2001:db8::5", "PROXY"),
    ("http://10.0.0.1.nip.io/", "10.0.0.1.nip.io", "PROXY"),  # a name, not an address
    ("http://999.1.1.1/", "999.1.1.1", "PROXY"),
]


def test_pac_file_evaluated_in_node_for_a_table_of_urls(make_proxy, tmp_path):
    p = make_proxy({"pac": {"proxy": "proxy.lan:3128", "direct_domains": ["intranet.example", ".Local.Test"],
                            "direct_networks": ["10.0.0.0/8", "192.168.7.0/24", "fd00::/8"]}})
    r = curl("-i", p.url + "/proxy.pac")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert b"Content-Type: application/x-ns-proxy-autoconfig" in head
    assert curl(p.url + "/wpad.dat").stdout == body
    table = [*TABLE, ("http://a.local.test/", "a.local.test", "DIRECT")]
    answers = find_proxy(tmp_path, body, [(u, h) for u, h, _ in table])
    expected = {u: ("PROXY proxy.lan:3128" if e == "PROXY" else e) for u, h, e in table}
    assert answers == expected


def test_pac_without_a_configured_proxy_names_the_address_the_browser_used(make_proxy, tmp_path):
    p = make_proxy()
    body = curl("-H", "Host: gateway.lan:8080", p.url + "/wpad.dat").stdout
    answers = find_proxy(tmp_path, body, [("http://example.com/", "example.com"), ("http://printer/", "printer")])
    assert answers == {"http://example.com/": "PROXY gateway.lan:8080", "http://printer/": "DIRECT"}

