#!/usr/bin/env bash
# The one test command (README.md): installs what the tests need on a fresh Debian machine, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=""
  # socat + gophernicus: the gopher tests' server; ip: network namespaces (transparent, SOCKS reply codes);
  # node: the PAC tests; chromium: the status page screenshot; squid + openssl: a real parent proxy;
  # haproxy: the fleet tests; slapd + ldapadd: the LDAP auth tests
  for pair in curl:curl ip:iproute2 iptables:iptables sysctl:procps ps:procps socat:socat gophernicus:gophernicus node:nodejs chromium:chromium squid:squid-openssl openssl:openssl haproxy:haproxy slapd:slapd ldapadd:ldap-utils; do
    command -v "${pair%%:*}" >/dev/null || need="$need ${pair#*:}"
  done
  if [ -n "$need" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  fi
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check --quiet .
exec python3 -m pytest -q -p no:cacheprovider "$@"
