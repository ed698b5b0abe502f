"""`webproxy ca init|show [--dir DIR]`: the local CA used for TLS interception (tls.intercept).

`init` creates it (the key readable by its owner only); `show` prints the certificate and how to
make each common client trust it. The directory: --dir, else tls.ca_dir of the config (-c), else
beside the cache directory.
"""

from __future__ import annotations

import argparse
import os
import sys

from webproxy.certs import CA_CERT, CAError, init_ca, read_ca_cert
from webproxy.config import load


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["init", "show"], help="init: create the CA; show: print it and how to trust it")
    p.add_argument("--dir", help="the CA directory (default: tls.ca_dir of the config)")
    p.add_argument("-c", "--config", help="config file (default: built-in defaults)")


def trust_instructions(cert_path: str) -> str:
    """How to make each common client trust the CA at `cert_path`."""
    p = cert_path
    return f"""\
# Trust this CA (file {p}) in the clients that use the proxy:
#   curl:    curl --cacert {p} -x http://PROXY:3128 https://...   (or: export CURL_CA_BUNDLE={p})
#   pip:     export PIP_CERT={p}   (or pip --cert {p}; requests-based tools: REQUESTS_CA_BUNDLE={p})
#   npm:     npm config set cafile {p}
#   Node:    export NODE_EXTRA_CA_CERTS={p}
#   Debian:  sudo cp {p} /usr/local/share/ca-certificates/webproxy-ca.crt && sudo update-ca-certificates
#   browsers (NSS: Firefox, Chromium on Linux):
#            certutil -d sql:$HOME/.pki/nssdb -A -t "C,," -n "webproxy local CA" -i {p}
# Domains are intercepted only when listed in [tls] intercept = [...]; a client that pins its
# certificates cannot be intercepted: remove its domain from tls.intercept.
"""


def main(args: argparse.Namespace) -> int:
    ca_dir = os.path.abspath(args.dir) if args.dir else load(args.config).tls["ca_dir"]
    try:
        if args.action == "init":
            path = init_ca(ca_dir)
            print(f"created the CA in {ca_dir} (key readable by its owner only)")
            print(f"next: list domains in [tls] intercept = [...] and trust {path} in your clients "
                  f"(webproxy ca show{' --dir ' + ca_dir if args.dir else ''} says how)")
            return 0
        pem = read_ca_cert(ca_dir)
    except CAError as e:
        print(f"webproxy: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(pem.decode("ascii", "replace"))
    sys.stdout.write(trust_instructions(os.path.join(ca_dir, CA_CERT)))
    return 0
