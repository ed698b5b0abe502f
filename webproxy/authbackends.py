"""Where passwords are checked (issue 10): an htpasswd file of bcrypt hashes, or an LDAP directory.

Both are blocking (bcrypt is slow on purpose, LDAP is network I/O): `webproxy.auth` calls
`verify` in a thread, never on the event loop. `verify(user, password)` returns the user's groups
when the password is right, None when it is not, and raises DirectoryDown when it cannot tell.
"""

from __future__ import annotations

import contextlib
import math
import os
import ssl
from dataclasses import dataclass
from typing import Any, Protocol

import bcrypt

from webproxy.authpolicy import BCRYPT_MAX, BCRYPT_PREFIXES
from webproxy.config import ConfigError

# Checked against when the user is unknown, so a wrong name costs what a wrong password costs
# and the timing does not tell which names exist.
# (A constant: hashing one at import would cost every `webproxy` command 60 ms.)
_DUMMY_HASH = b"$2b$10$OVrU2yzcZ3VqM3b6sIiZcuL.U32E.ZJScsxmVp5sGl9yvHbsBuija"
# RFC 4511 result code 49: the directory's "wrong password" (anything else is not an answer).
LDAP_INVALID_CREDENTIALS = 49


class DirectoryDown(Exception):
    """The backend cannot tell whether the password is right (a 503, never an open door)."""


class Backend(Protocol):
    def verify(self, user: str, password: str) -> frozenset[str] | None: ...

    def changed(self) -> bool: ...  # whether its source changed since loaded (then reload it)

    def seen(self) -> None: ...  # the change was looked at (a broken new file is reported once)


def password_bytes(password: str) -> bytes:
    return password.encode("utf-8")[:BCRYPT_MAX]


def hash_password(password: str, rounds: int = 10) -> str:
    """A bcrypt hash for an htpasswd line (what `htpasswd -B` writes, read by Apache and nginx too)."""
    return bcrypt.hashpw(password_bytes(password), bcrypt.gensalt(rounds)).decode("ascii")


@dataclass
class HtpasswdFile:
    """The users of an htpasswd file, in order, and the lines around them (kept when rewritten)."""

    path: str
    lines: list[str]
    users: dict[str, str]  # name -> bcrypt hash

    def set(self, user: str, hashed: str) -> None:
        line = f"{user}:{hashed}"
        for i, text in enumerate(self.lines):
            if text.split(":", 1)[0] == user:
                self.lines[i] = line
                break
        else:
            self.lines.append(line)
        self.users[user] = hashed

    def remove(self, user: str) -> bool:
        if user not in self.users:
            return False
        self.lines = [t for t in self.lines if t.split(":", 1)[0] != user]
        del self.users[user]
        return True

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def read_htpasswd(path: str, missing_ok: bool = False) -> HtpasswdFile:
    """Raises ConfigError (one line naming the file and line) for an unreadable file or a line that
    is not NAME:BCRYPT-HASH."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        if missing_ok:
            return HtpasswdFile(path, [], {})
        raise ConfigError(f"auth.htpasswd_file {path} does not exist; create it with "
                          f"`webproxy user add NAME -f {path}`") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"auth.htpasswd_file: cannot read {path}: {why}") from None
    users: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        user, colon, hashed = text.partition(":")
        if not colon or not user:
            raise ConfigError(f"auth.htpasswd_file {path} line {n}: expected NAME:HASH")
        if not hashed.startswith(BCRYPT_PREFIXES):
            raise ConfigError(f"auth.htpasswd_file {path} line {n}: the hash of {user!r} is not bcrypt; only bcrypt "
                              f"is accepted (set it again with `webproxy user add {user}` or `htpasswd -B`)")
        users[user] = hashed
    return HtpasswdFile(path, lines, users)


def read_groups(path: str) -> dict[str, frozenset[str]]:
    """user -> groups, from lines "group: user1 user2" (Apache's AuthGroupFile format)."""
    members: dict[str, set[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"auth.groups_file: cannot read {path}: {why}") from None
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        group, colon, users = text.partition(":")
        if not colon or not group.strip():
            raise ConfigError(f"auth.groups_file {path} line {n}: expected \"GROUP: USER USER...\"")
        for user in users.split():
            members.setdefault(user, set()).add(group.strip())
    return {user: frozenset(groups) for user, groups in members.items()}


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class Htpasswd:
    """bcrypt hashes from auth.htpasswd_file, groups from auth.groups_file; `changed()` says when
    either file's modification time moved (then the caller builds a new one)."""

    def __init__(self, section: dict[str, Any]) -> None:
        self.path = section["htpasswd_file"]
        self.groups_path = section["groups_file"]
        self.stamp = self._stamp()
        self.users = read_htpasswd(self.path).users
        self.groups = read_groups(self.groups_path) if self.groups_path else {}

    def _stamp(self) -> tuple[int | None, int | None]:
        return _mtime(self.path), _mtime(self.groups_path) if self.groups_path else None

    def changed(self) -> bool:
        return self._stamp() != self.stamp

    def seen(self) -> None:
        self.stamp = self._stamp()

    def verify(self, user: str, password: str) -> frozenset[str] | None:
        hashed = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password_bytes(password), hashed.encode("ascii") if hashed else _DUMMY_HASH)
        except ValueError:  # a damaged hash: that user cannot log in
            ok = False
        return self.groups.get(user, frozenset()) if ok and hashed is not None else None


class Ldap:
    """Simple bind as the user (RFC 4513 5.1.3), after a search for the user's DN, then a search
    for the groups naming that DN. TLS (ldaps:// or StartTLS) always verifies the certificate."""

    def __init__(self, section: dict[str, Any]) -> None:
        # Imported here: ldap3 takes 0.1-0.2 s to import, which every `webproxy` command and every
        # proxy without LDAP would pay.
        import ldap3
        from ldap3.core.exceptions import LDAPException
        from ldap3.utils.conv import escape_filter_chars

        self.ldap3, self.escape = ldap3, escape_filter_chars
        self.failures = (LDAPException, OSError)
        self.s = section
        url = section["ldap_url"]
        if not url.startswith(("ldap://", "ldaps://")):
            raise ConfigError(f"auth.ldap_url {url!r} must start with ldap:// or ldaps://")
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=section["ldap_ca_file"] or None)
        # ldap3 packs the receive timeout into SO_RCVTIMEO as whole seconds.
        self.receive_timeout = max(1, math.ceil(section["ldap_timeout"])) if section["ldap_timeout"] else None
        self.server = ldap3.Server(url, use_ssl=url.startswith("ldaps://"), tls=tls,
                                   connect_timeout=section["ldap_timeout"] or None, get_info=ldap3.NONE)

    def changed(self) -> bool:
        return False

    def seen(self) -> None:
        pass

    def _connect(self, dn: str | None, password: str | None) -> Any:
        conn = self.ldap3.Connection(self.server, user=dn, password=password, read_only=True,
                                receive_timeout=self.receive_timeout, auto_referrals=False)
        conn.open()
        if self.s["ldap_starttls"] and not self.server.ssl and not conn.start_tls():
            raise DirectoryDown(f"StartTLS with {self.s['ldap_url']} failed: {conn.result.get('description')}")
        return conn

    def verify(self, user: str, password: str) -> frozenset[str] | None:
        # An empty password would be an "unauthenticated bind" (RFC 4513 5.1.2), which directories
        # answer with success: never ask.
        if not password:
            return None
        s = self.s
        service = None
        try:
            service = self._connect(s["ldap_bind_dn"] or None, s["ldap_bind_password"] or None)
            if s["ldap_bind_dn"] and not service.bind():
                raise DirectoryDown(f"the directory refused the service bind as {s['ldap_bind_dn']} "
                                    "(check auth.ldap_bind_dn and auth.ldap_bind_password)")
            service.search(s["ldap_base"], s["ldap_user_filter"].format(user=self.escape(user)),
                           search_scope=self.ldap3.SUBTREE, attributes=[], size_limit=2)
            found = [e["dn"] for e in service.response or [] if e.get("type") == "searchResEntry"]
            if len(found) != 1:
                return None
            dn = found[0]
            as_user = self._connect(dn, password)
            try:
                if not as_user.bind():
                    if as_user.result.get("result") == LDAP_INVALID_CREDENTIALS:
                        return None
                    raise DirectoryDown(f"bind failed: {as_user.result.get('description')}")
            finally:
                with contextlib.suppress(Exception):
                    as_user.unbind()
            service.search(s["ldap_group_base"] or s["ldap_base"],
                           s["ldap_group_filter"].format(dn=self.escape(dn), user=self.escape(user)),
                           search_scope=self.ldap3.SUBTREE, attributes=[s["ldap_group_attribute"]])
            groups: set[str] = set()
            for e in service.response or []:
                if e.get("type") == "searchResEntry":
                    value = e["attributes"].get(s["ldap_group_attribute"])
                    groups.update(value if isinstance(value, list) else [value] if value else [])
            return frozenset(str(g) for g in groups)
        except self.failures as e:
            raise DirectoryDown(f"{type(e).__name__}: {e}") from None
        finally:
            if service is not None:
                with contextlib.suppress(Exception):
                    service.unbind()


def build(section: dict[str, Any]) -> Backend | None:
    """The backend auth.backend names (None: auth off). Raises ConfigError (one line)."""
    if section["backend"] == "htpasswd":
        return Htpasswd(section)
    if section["backend"] == "ldap":
        return Ldap(section)
    return None
