"""Proxy authentication at the edge (issue 10): the state around the pure rules of
`webproxy.authpolicy` (remembered verdicts, failures per address) and the calls into the backend
of `webproxy.authbackends`, in a thread of its own, never on the event loop.

The Router asks twice: `known()` in the parser callback (a cache hit may only be answered there when
the credentials are already remembered) and `check()` in the serve task (which may verify).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from webproxy.acl import client_allowed
from webproxy.authbackends import Backend, DirectoryDown, build
from webproxy.authpolicy import (
    FORGET_AFTER,
    Identity,
    Kind,
    admit,
    challenge,
    count_failure,
    credential_key,
    failure_delay,
    identity,
    rule_refusal,
    worth_logging,
)
from webproxy.config import ConfigError

# An exempt client (auth.exempt_clients), or auth off: no user, [access] alone.
ANONYMOUS = Identity("-", frozenset(), "-")
MAX_REMEMBERED = 10000  # verdicts and failing addresses held at most (then the oldest go)
VERIFY_THREADS = 2  # bcrypt and LDAP calls at once; more would only queue on 2 cores
TRANSPARENT_REFUSAL = ("this proxy requires authentication, which a transparently redirected client "
                       "cannot give; the proxy admin can list your network in auth.exempt_clients")


class Memo(Protocol):
    auth_seen: Any  # (header value, key) or None: the client connection's last Proxy-Authorization


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 407 (credentials), 403 (a rule), 503 (the directory is down)
    message: str
    headers: list[tuple[str, str]]
    user: Identity | None = None  # a known user refused by a rule (the access log names it)


class AuthGate:
    def __init__(self, section: dict[str, Any], log_error: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Raises ConfigError (one line) when the backend cannot be built (a bad htpasswd file)."""
        self.log_error = log_error
        self.clock = clock
        self._secret = os.urandom(16)  # keys the verdict hashes: nothing derived from a password is guessable
        self._verdicts: dict[bytes, tuple[float, Identity]] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        self._exempt: dict[str, bool] = {}
        self._inflight: dict[bytes, asyncio.Future[frozenset[str] | None]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self.backend: Backend | None = None
        self.configure(section)

    @property
    def on(self) -> bool:
        return self.backend is not None

    def configure(self, section: dict[str, Any]) -> None:
        """Start (or, on SIGHUP, restart) from `section`: the backend re-read, every remembered
        verdict forgotten, so a revoked user is refused at once. Raises ConfigError before
        anything changes."""
        backend = build(section)
        self.section = section
        self.backend = backend
        self.rules: Sequence[dict[str, Any]] = section["rule"]
        self.ttl = section["cache_ttl"]
        self.challenge = [challenge(section["realm"])]
        self.forget()

    def forget(self) -> None:
        self._verdicts.clear()
        self._exempt.clear()
        self._inflight.clear()  # answers of the users read before are not shared with new requests

    def tick(self) -> None:
        """Once a second: when the htpasswd (or groups) file changed on disk, use the new one."""
        backend = self.backend
        if backend is None or not backend.changed():
            return
        backend.seen()
        try:
            self.backend = build(self.section)
        except ConfigError as e:
            self.log_error(f"auth: {e}; keeping the users read before", "error")
            return
        self.forget()
        self.log_error(f"auth: {self.section['htpasswd_file']} changed, users re-read", "info")

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def exempt(self, ip: str) -> bool:
        known = self._exempt.get(ip)
        if known is None:
            known = client_allowed(ip, self.section["exempt_clients"])
            if len(self._exempt) >= MAX_REMEMBERED:
                self._exempt.clear()
            self._exempt[ip] = known
        return known

    def _remembered(self, key: bytes) -> Identity | None:
        entry = self._verdicts.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._verdicts[key]
            return None
        return entry[1]

    def key(self, header: str, memo: Memo | None) -> bytes:
        """The verdict-cache key of a Proxy-Authorization value; `memo` (the client connection)
        keeps the last one, which saves the hash (5% of a 1 KiB hit's time under py-spy)."""
        if memo is not None:
            seen = memo.auth_seen
            if seen is not None and seen[0] == header:
                return seen[1]  # type: ignore[no-any-return]
        key = credential_key(header, self._secret)
        if memo is not None:
            memo.auth_seen = (header, key)
        return key

    def known(self, ip: str, header: str | None, inherited: Identity | None, host: str, port: int,
              connect: bool = False, memo: Memo | None = None) -> Identity | None:
        """Who this is when that can be told without verifying (exempt, inherited, remembered) and
        the user's rule lets it through; None: ask `check` (which may verify, refuse, or delay).
        The parser-callback path asks only this; the serve task asks it first too."""
        if self.exempt(ip):
            return ANONYMOUS
        if header is None:
            who = inherited
        else:
            who = self._remembered(self.key(header, memo))
        if who is None or (self.rules and rule_refusal(who, self.rules, host, port, connect)):
            return None
        return who

    async def check(self, ip: str, header: str | None, inherited: Identity | None, host: str, port: int,
                    connect: bool = False, transparent: bool = False, memo: Memo | None = None) -> Identity | Refusal:
        """Who sends this request, or the refusal to answer (407, 403 naming the rule, 503)."""
        exempt = self.exempt(ip)
        if transparent and not exempt:
            return Refusal(403, TRANSPARENT_REFUSAL, [])
        key = self.key(header, memo) if header is not None and not exempt else b""
        step = admit(header, exempt, inherited, self._remembered(key) if key else None)
        if step.kind is Kind.PASS:
            return ANONYMOUS
        if step.kind is Kind.CHALLENGE:
            if step.attempt:
                await self._failed(ip, "-", step.reason)
            return Refusal(407, f"proxy authentication required: {step.reason}", self.challenge)
        if step.kind is Kind.VERIFY:
            assert step.credentials is not None
            user = step.credentials.user
            backend = self.backend
            try:
                groups = await self._verify_once(key, user, step.credentials.password)
            except Exception as e:  # DirectoryDown, or a backend bug: closed either way, never a 500
                self.log_error(f"auth: cannot check the password of {user[:64]!r}: {e}", "error")
                return Refusal(503, "the proxy cannot check passwords right now (its user directory is not "
                               "answering); try again later", [])
            if groups is None:
                await self._failed(ip, user, "wrong user name or password")
                return Refusal(407, "proxy authentication required: wrong user name or password", self.challenge)
            who = identity(user, groups)
            if self.backend is backend:  # not when the users were re-read meanwhile (a revocation)
                self._remember(key, who)
        else:
            who = step.user
        assert who is not None
        why = rule_refusal(who, self.rules, host, port, connect)
        if why:
            return Refusal(403, why, [], who)
        return who

    def _verify_once(self, key: bytes, user: str, password: str) -> Awaitable[frozenset[str] | None]:
        """One verification per credentials at a time: a browser opening six connections at once
        (or a load generator fifty) with the same field waits for one bcrypt or LDAP answer."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._inflight[key] = asyncio.ensure_future(self.verify_in_thread(user, password))
            pending.add_done_callback(lambda done: self._inflight.get(key) is done and self._inflight.pop(key))
        return asyncio.shield(pending)  # one waiter that goes away does not cancel the others' answer

    async def verify_in_thread(self, user: str, password: str) -> frozenset[str] | None:
        """The backend's verdict, computed in the auth threads. Raises DirectoryDown."""
        backend = self.backend
        if backend is None:
            raise DirectoryDown("authentication is off")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="webproxy-auth")
        return await asyncio.get_running_loop().run_in_executor(self._executor, backend.verify, user, password)

    async def verify_socks(self, user: str, password: str, ip: str) -> bool:
        """SOCKS5 username/password (RFC 1929) against the same backend and verdict cache; wrong
        ones are slowed and logged per client address, as for HTTP."""
        key = credential_key(f"\0socks {user}:{password}", self._secret)
        if self._remembered(key) is not None:
            return True
        groups = await self.verify_in_thread(user, password)
        if groups is None:
            await self._failed(ip, user, "wrong user name or password (SOCKS5)")
            return False
        self._remember(key, identity(user, groups))
        return True

    def _remember(self, key: bytes, who: Identity) -> None:
        now = self.clock()
        if len(self._verdicts) >= MAX_REMEMBERED:
            for k in [k for k, (until, _) in self._verdicts.items() if until <= now] or list(self._verdicts):
                del self._verdicts[k]
        self._verdicts[key] = (now + self.ttl, who)

    async def _failed(self, ip: str, user: str, reason: str) -> None:
        """One more failure from `ip`: logged (1st, 2nd, 4th, 8th...; never the password), and the
        answer held back by a delay that grows with the failures of this address only."""
        now = self.clock()
        if len(self._failures) >= MAX_REMEMBERED:
            for k in [k for k, (_, last) in self._failures.items() if now - last > FORGET_AFTER] or list(self._failures):
                del self._failures[k]
        count, _ = self._failures[ip] = count_failure(self._failures.get(ip), now)
        delay = failure_delay(count)
        if worth_logging(count):
            self.log_error(f"auth: failed attempt {count} from {ip} as user {user[:64]!r}: {reason}"
                           + (f"; answers to {ip} now wait {delay:g} s" if delay else ""), "warning")
        if delay:
            await asyncio.sleep(delay)
