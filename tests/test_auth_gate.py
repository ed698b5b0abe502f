"""The auth gate (webproxy.auth) with a real htpasswd file, no sockets: what the Router is told for
transparent clients, for requests that inherit a CONNECT's user, and after the file changes."""

from __future__ import annotations

import asyncio
import os

from tests.auth_support import basic, write_htpasswd
from webproxy import config
from webproxy.auth import ANONYMOUS, AuthGate, Refusal
from webproxy.authpolicy import identity


def gate(tmp_path, **auth) -> tuple[AuthGate, list[str]]:
    users = write_htpasswd(tmp_path / "users", {"alice": "secret"})
    logged: list[str] = []
    section = config.from_dict({"auth": {"backend": "htpasswd", "htpasswd_file": str(users), **auth}}).auth
    return AuthGate(section, lambda message, level: logged.append(message)), logged


def test_transparent_clients_not_exempt_are_refused_with_a_reason(tmp_path):
    g, _ = gate(tmp_path, exempt_clients=["10.1.0.0/16"])
    out = asyncio.run(g.check("10.2.0.5", None, None, "example.com", 80, transparent=True))
    assert isinstance(out, Refusal) and out.status == 403 and "auth.exempt_clients" in out.message
    assert asyncio.run(g.check("10.1.0.5", None, None, "example.com", 80, transparent=True)) is ANONYMOUS


def test_requests_inside_an_authenticated_tunnel_inherit_its_user(tmp_path):
    g, _ = gate(tmp_path)
    alice = identity("alice")
    assert g.known("10.0.0.1", None, alice, "example.com", 443) is alice
    assert asyncio.run(g.check("10.0.0.1", None, alice, "example.com", 443)) is alice
    out = asyncio.run(g.check("10.0.0.1", None, None, "example.com", 443))
    assert isinstance(out, Refusal) and out.status == 407


def test_a_changed_htpasswd_file_is_read_again_and_verdicts_forgotten(tmp_path):
    g, logged = gate(tmp_path)
    header = basic("alice", "secret")
    assert asyncio.run(g.check("10.0.0.1", header, None, "example.com", 80)) == identity("alice")
    assert g.known("10.0.0.1", header, None, "example.com", 80) == identity("alice")
    write_htpasswd(tmp_path / "users", {"bob": "builder"})
    st = os.stat(tmp_path / "users")
    os.utime(tmp_path / "users", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    g.tick()
    assert any("users re-read" in line for line in logged)
    assert g.known("10.0.0.1", header, None, "example.com", 80) is None
    out = asyncio.run(g.check("10.0.0.1", header, None, "example.com", 80))
    assert isinstance(out, Refusal) and out.status == 407


def test_a_broken_new_htpasswd_file_keeps_the_users_and_is_reported_once(tmp_path):
    g, logged = gate(tmp_path)
    (tmp_path / "users").write_text("alice:{SHA}abc\n")
    st = os.stat(tmp_path / "users")
    os.utime(tmp_path / "users", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    g.tick()
    g.tick()
    assert [line for line in logged if "only bcrypt" in line and "keeping the users" in line] == [logged[0]]
    assert len(logged) == 1
    assert asyncio.run(g.check("10.0.0.1", basic("alice", "secret"), None, "example.com", 80)) == identity("alice")
