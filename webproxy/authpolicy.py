"""Who may use the proxy, as whom (issue 10): pure decisions over a request's Proxy-Authorization
field, the client's address class, the verdicts already remembered and the [[auth.rule]] tables.
No sockets, no files, no clocks: `webproxy.auth` holds the state and does the I/O.

    client in auth.exempt_clients                 -> PASS (no user, [access] alone)
    no Proxy-Authorization, identity on the conn. -> USER (the CONNECT's user, for intercepted requests)
    no Proxy-Authorization                        -> CHALLENGE (407)
    a remembered verdict for this exact field     -> USER
    a field that is not Basic user:password UTF-8 -> CHALLENGE (407, never 400/500)
    otherwise                                     -> VERIFY (the backend, off the event loop)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import quote

from webproxy.acl import domain_denied

# bcrypt reads at most 72 bytes of a password; Apache's htpasswd -B cuts there too, so a hash made
# by either tool verifies the same password (bcrypt 5 raises instead of cutting).
BCRYPT_MAX = 72
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")

# Repeated failures from one address (RFC 7617 section 4: Basic is open to guessing): the first few
# are answered at once (a typo), then each waits twice as long as the one before, up to MAX_DELAY;
# an address with no failure for FORGET_AFTER seconds starts again from zero.
FREE_FAILURES = 3
FIRST_DELAY = 0.1
MAX_DELAY = 2.0
FORGET_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated user: the name, its groups (for [[auth.rule]]) and how the access log
    writes it (percent-encoded, as Squid does: the log is split on spaces)."""

    name: str
    groups: frozenset[str]
    log_name: str


def identity(name: str, groups: Iterable[str] = ()) -> Identity:
    return Identity(name, frozenset(groups), quote(name, safe="") or "-")


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str


class Kind(Enum):
    PASS = "pass"
    USER = "user"
    CHALLENGE = "challenge"
    VERIFY = "verify"


@dataclass(frozen=True, slots=True)
class Step:
    kind: Kind
    user: Identity | None = None
    credentials: Credentials | None = None
    reason: str = ""  # why a CHALLENGE (for the 407 body and the error log)
    attempt: bool = False  # a CHALLENGE for credentials that were sent (counted as a failure)


def parse_basic(value: str) -> Credentials | str:
    """A Proxy-Authorization value as Basic credentials (RFC 7617 section 2), or why it is not
    one: the scheme is case-insensitive, the token is strict base64, the user-id ends at the first
    colon and may not be empty or hold control characters, and both parts are UTF-8 (section 2.1)."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return f"the {scheme[:20]!r} scheme is not supported, only Basic"
    if not token.strip():
        return "the Basic credentials are empty"
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return "the Basic credentials are not valid base64"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "the Basic credentials are not UTF-8"
    user, colon, password = text.partition(":")
    if not colon:
        return "the Basic credentials have no colon between user and password"
    if not user or any(ord(c) < 32 or ord(c) == 127 for c in user):
        return "the Basic credentials name no valid user"
    return Credentials(user, password)


def credential_key(value: str, secret: bytes) -> bytes:
    """What remembered verdicts are keyed by: a keyed hash of the whole field, so no password (not
    even its base64) is held after verification."""
    return hashlib.blake2b(value.encode("latin-1", "replace"), digest_size=16, key=secret).digest()


def admit(header: str | None, exempt: bool, inherited: Identity | None, remembered: Identity | None) -> Step:
    """The first step for one request. `remembered`: the verdict cached for this exact field."""
    if exempt:
        return Step(Kind.PASS)
    if header is None:
        if inherited is not None:
            return Step(Kind.USER, inherited)
        return Step(Kind.CHALLENGE, reason="this proxy needs a user name and password")
    if remembered is not None:
        return Step(Kind.USER, remembered)
    creds = parse_basic(header)
    if isinstance(creds, str):
        # A scheme we do not speak is an offer, not a guess (a browser may try Negotiate first).
        return Step(Kind.CHALLENGE, reason=creds, attempt=creds.startswith("the Basic"))
    return Step(Kind.VERIFY, credentials=creds)


def challenge(realm: str) -> tuple[str, str]:
    """The Proxy-Authenticate field of a 407 (RFC 9110 11.7.1; charset: RFC 7617 2.1)."""
    quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
    return ("Proxy-Authenticate", f'Basic realm="{quoted}", charset="UTF-8"')


def rule_name(index: int, rule: dict[str, Any]) -> str:
    return f'auth.rule[{index}] "{rule["name"]}"' if rule["name"] else f"auth.rule[{index}]"


def rule_for(user: Identity, rules: Sequence[dict[str, Any]]) -> tuple[int, dict[str, Any]] | None:
    """The first rule naming one of the user's groups (or no groups: every user), with its index."""
    for i, rule in enumerate(rules):
        if not rule["groups"] or not user.groups.isdisjoint(rule["groups"]):
            return i, rule
    return None


def rule_refusal(user: Identity | None, rules: Sequence[dict[str, Any]], host: str, port: int,
                 connect: bool) -> str | None:
    """Why the user's rule refuses host:port (a 403 naming the rule), or None. A rule only narrows
    [access], which the handlers still apply to everybody: no rule can open what [access] closes."""
    if user is None:
        return None
    found = rule_for(user, rules)
    if found is None:
        return None
    index, rule = found
    name = rule_name(index, rule)
    if connect and rule["connect_ports"] and port not in rule["connect_ports"]:
        allowed = ", ".join(str(p) for p in rule["connect_ports"])
        return f"access denied by {name}: user {user.name} may not CONNECT to port {port} (allowed: {allowed})"
    why = domain_denied(host, rule)
    if why:
        return f"access denied by {name} for user {user.name}: {why.replace('this proxy', 'the rule')}"
    return None


def count_failure(previous: tuple[int, float] | None, now: float) -> tuple[int, float]:
    """(failures, time of the last) for one address after one more failure."""
    if previous is None or now - previous[1] > FORGET_AFTER:
        return 1, now
    return previous[0] + 1, now


def failure_delay(failures: int) -> float:
    """Seconds the answer to an address's `failures`-th failure waits."""
    if failures <= FREE_FAILURES:
        return 0.0
    return min(MAX_DELAY, FIRST_DELAY * 2 ** (failures - FREE_FAILURES - 1))


def worth_logging(failures: int) -> bool:
    """Failures 1, 2, 4, 8, ...: a guessing run is visible in the error log without flooding it."""
    return failures & (failures - 1) == 0
