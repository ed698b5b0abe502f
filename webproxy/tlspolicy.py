"""TLS interception rules, as pure functions (no sockets, no files, no clock of their own):
which hosts are intercepted, which name a minted certificate carries, when a kept certificate must
be re-minted, what an intercepted request's URL is, and how a TLS failure is worded for people.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from webproxy.httpmsg import BadTarget, check_host, parse_absolute, parse_authority

# A minted leaf is valid this long (well under the 398 days browsers accept, CA/B Forum BR 6.3.2),
# and re-minted once less than RENEW_BEFORE of it is left, so no client ever sees it expire.
LEAF_LIFETIME = 90 * 86400.0
RENEW_BEFORE = 7 * 86400.0
HTTPS_PORT = 443


def intercepted(host: str, suffixes: Iterable[str]) -> bool:
    """Whether `host` is in tls.intercept: an entry names the domain and all its subdomains
    ("pypi.org" matches pypi.org and files.pypi.org, not evilpypi.org); a leading dot
    (".debian.org") matches the subdomains only, as in Squid's dstdomain."""
    host = host.lower().rstrip(".")
    for entry in suffixes:
        e = entry.lower().rstrip(".")
        if not e:
            continue
        if e.startswith("."):
            if host.endswith(e):
                return True
        elif host == e or host.endswith("." + e):
            return True
    return False


def cert_name(sni: str | None, connect_host: str) -> str:
    """The name the minted certificate is for: what the client's TLS stack will check it against,
    i.e. the SNI it sent, else (no SNI, or one that is not a valid host name) the CONNECT host."""
    if sni:
        try:
            return check_host(sni.lower().rstrip("."))
        except BadTarget:
            pass
    return connect_host


def leaf_fresh(not_after: float, now: float, renew_before: float = RENEW_BEFORE) -> bool:
    """Whether a kept leaf (valid until `not_after`, epoch seconds) may still be handed out."""
    return now + renew_before < not_after


def https_authority(host: str, port: int) -> str:
    """host[:port] as it goes into an https:// URL (the default port left out, so the cache key
    is the one a browser would name)."""
    h = f"[{host}]" if ":" in host else host
    return h if port == HTTPS_PORT else f"{h}:{port}"


def inner_url(method: str, target: str, host_header: str | None, host: str, port: int) -> str:
    """The absolute https:// URL of a request read inside an intercepted tunnel to host:port.

    The tunnel's CONNECT authority decides where the request goes (and what the cache key is):
    that is the name the access rules were checked against and the one our certificate and the
    origin's certificate are verified for. A Host field (or absolute-form URL, RFC 9112 3.2.2) naming
    another host is refused with a 400 rather than ignored: silently answering with another host's
    content than the client named would be wrong either way (and is how domain fronting works).
    Raises BadTarget with the reason."""
    if method == "CONNECT":
        raise BadTarget("CONNECT is not accepted inside an intercepted tunnel")
    base = https_authority(host, port)
    if target.startswith("/"):
        if host_header is not None and host_header.strip():
            try:
                h, p = parse_authority(host_header, port)
            except BadTarget:
                raise BadTarget(f"bad Host header {host_header[:200]!r}") from None
            if (h, p) != (host, port):
                raise BadTarget(f"the Host header names {host_header[:200]!r} but this tunnel was opened "
                                f"to {base} (CONNECT); send each host's requests through its own tunnel")
        return f"https://{base}{target}"
    if target == "*":
        raise BadTarget("OPTIONS * is not forwarded inside an intercepted tunnel")
    t = parse_absolute(target)
    if t.scheme != "https" or (t.host, t.port) != (host, port):
        raise BadTarget(f"this tunnel carries requests for https://{base}/, not {target[:200]!r}")
    return f"https://{base}{t.path}"


def handshake_rejected(e: BaseException) -> bool:
    """Whether a failed handshake with a client means it refused our certificate (certificate
    pinning, or our CA not trusted): an alert about the certificate (RFC 8446 6.2), or the client
    hanging up in the middle of the handshake (what most pinning clients do)."""
    if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True  # it hung up mid-handshake
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or "").upper()
        return any(word in reason for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                                                "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED"))
    return isinstance(e, (ConnectionResetError, BrokenPipeError, EOFError))


def verify_reason(e: ssl.SSLCertVerificationError) -> str:
    """Why an origin's certificate was not accepted, in the words an admin searches for."""
    code = getattr(e, "verify_code", 0)
    message = getattr(e, "verify_message", "") or str(e)
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return "certificate expired"
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        return "certificate not yet valid"
    if code in (2, 18, 19, 20, 21):  # issuer unknown, self-signed, self-signed in chain, unable to verify
        return f"unknown issuer ({message}); add its CA to tls.upstream_ca_file if you trust it"
    if code == 62 or "hostname mismatch" in message.lower() or "ip address mismatch" in message.lower():
        return f"name mismatch ({message})"
    return message
