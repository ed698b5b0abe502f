"""The proxy auto-config file served at /proxy.pac and /wpad.dat: a pure function of the [pac]
config (and, when `pac.proxy` is empty, the Host the browser fetched the file from).

The script never makes the browser resolve names: networks are matched only against IP literals
(isInNet on a name would do a DNS lookup per request, the classic PAC slowdown), with its own
IPv4/IPv6 prefix matcher so it does not depend on the browser's isInNetEx.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

CONTENT_TYPE = "application/x-ns-proxy-autoconfig"

# Always direct: the browser's own machine.
_LOOPBACK = ["127.0.0.0/8", "::1/128"]

_TEMPLATE = """\
// Proxy auto-config from webproxy ([pac] in its config file).
var PROXY = %(proxy)s;
var DIRECT_DOMAINS = %(domains)s;
var DIRECT_NETWORKS = %(networks)s;

function webproxyParseIp(s) {
  // An IP literal as an array of 16-bit groups (IPv4: 2 groups), or null for a name.
  if (/^\\d{1,3}(\\.\\d{1,3}){3}$/.test(s)) {
    var o = s.split(".");
    for (var k = 0; k < 4; k++) { if (+o[k] > 255) return null; }
    return [(+o[0]) * 256 + (+o[1]), (+o[2]) * 256 + (+o[3])];
  }
  if (s.indexOf(":") < 0 || !/^[0-9a-fA-F:]+$/.test(s)) return null;
  var halves = s.split("::");
  if (halves.length > 2) return null;
  var head = halves[0] ? halves[0].split(":") : [];
  var tail = halves.length === 2 && halves[1] ? halves[1].split(":") : [];
  var fill = 8 - head.length - tail.length;
  if (fill < 0 || (halves.length === 1 && fill !== 0)) return null;
  var parts = head.concat(new Array(fill + 1).join("0").split(""), tail);
  var out = [];
  for (var i = 0; i < parts.length; i++) {
    if (parts[i].length > 4) return null;
    out.push(parseInt(parts[i] || "0", 16));
  }
  return out;
}

function webproxyInNet(ip, net) {
  // net: [groups, prefix length]; ip and net must be of one family (same number of groups).
  var groups = net[0], bits = net[1];
  if (ip.length !== groups.length) return false;
  for (var i = 0; i < groups.length && bits > 0; i++, bits -= 16) {
    var mask = bits >= 16 ? 0xffff : (0xffff << (16 - bits)) & 0xffff;
    if ((ip[i] & mask) !== (groups[i] & mask)) return false;
  }
  return true;
}

function FindProxyForURL(url, host) {
  host = host.toLowerCase().replace(/^\\[|\\]$/g, "");
  if (isPlainHostName(host) || host === "localhost" || dnsDomainIs(host, ".localhost")) return "DIRECT";
  for (var d = 0; d < DIRECT_DOMAINS.length; d++) {
    if (host === DIRECT_DOMAINS[d] || dnsDomainIs(host, "." + DIRECT_DOMAINS[d])) return "DIRECT";
  }
  var ip = webproxyParseIp(host);
  if (ip) {
    for (var n = 0; n < DIRECT_NETWORKS.length; n++) {
      if (webproxyInNet(ip, DIRECT_NETWORKS[n])) return "DIRECT";
    }
  }
  return PROXY;
}
"""


def _groups(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[Any]:
    """[16-bit groups of the network address, prefix length]: the form webproxyInNet compares."""
    packed = net.network_address.packed
    return [[packed[i] * 256 + packed[i + 1] for i in range(0, len(packed), 2)], net.prefixlen]


def proxy_address(pac_cfg: dict[str, Any], request_host: str | None, listen: list[tuple[str, int]]) -> str:
    """The "host:port" browsers are told to use: pac.proxy, else the Host the PAC file was
    fetched from (the name the browser already reaches us by), else the first listen address."""
    if pac_cfg["proxy"]:
        return pac_cfg["proxy"]
    if request_host:
        return request_host
    host, port = listen[0] if listen else ("127.0.0.1", 3128)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render(pac_cfg: dict[str, Any], proxy: str) -> str:
    """The PAC script: DIRECT for plain names, loopback, `direct_domains` and `direct_networks`
    (IP literals only), `PROXY <proxy>` for everything else."""
    domains = [d.strip(".").lower() for d in pac_cfg["direct_domains"] if d.strip(".")]
    networks = [ipaddress.ip_network(n) for n in _LOOPBACK] + list(pac_cfg["direct_networks"])
    return _TEMPLATE % {
        "proxy": json.dumps(f"PROXY {proxy}"),
        "domains": json.dumps(domains),
        "networks": json.dumps([_groups(n) for n in networks]),
    }
