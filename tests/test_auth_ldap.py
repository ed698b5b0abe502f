"""Proxy authentication against a real OpenLDAP slapd (issue 10): the user's DN found by a search
with a service account, a simple bind as the user over StartTLS (certificate verified), groups from
groupOfNames and posixGroup entries for [[auth.rule]], and a directory that is down or untrusted
answered with 503, never with an open door."""

from __future__ import annotations

import pytest
import trustme

from tests.auth_support import SERVICE_DN, SERVICE_PASSWORD, SUFFIX, Slapd, slapd_skip_reason
from tests.support import ProxyProcess, curl, free_port, wait_until

pytestmark = pytest.mark.skipif(slapd_skip_reason() is not None, reason=slapd_skip_reason() or "")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def slapd(tmp_path_factory, ca):
    d = tmp_path_factory.mktemp("slapd")
    server = Slapd(d, ca.issue_cert("127.0.0.1", "localhost")).start()
    yield server
    server.stop()


def ldap_proxy(tmp, url: str, ca_file: str = "", **extra) -> ProxyProcess:
    p = ProxyProcess(tmp, {
        "auth": {"backend": "ldap", "ldap_url": url, "ldap_base": f"ou=people,{SUFFIX}",
                 "ldap_group_base": f"ou=groups,{SUFFIX}", "ldap_bind_dn": SERVICE_DN,
                 "ldap_bind_password": SERVICE_PASSWORD, "ldap_starttls": True, "ldap_ca_file": ca_file,
                 "ldap_timeout": 3.0, **extra},
        "cache": {"enabled": False},
    })
    with open(p.config_path, "a") as f:
        f.write('\n[[auth.rule]]\nname = "students"\ngroups = ["students"]\ndeny_domains = ["localhost"]\n')
    return p.start()


@pytest.fixture(scope="module")
def ldapproxy(tmp_path_factory, slapd, ca):
    tmp = tmp_path_factory.mktemp("ldapproxy")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    p = ldap_proxy(tmp, slapd.url, str(tmp / "ca.pem"))
    yield p
    p.stop()


def code(p: ProxyProcess, url: str, user: str | None = None) -> tuple[str, str]:
    args = ["-s", "-w", "\n%{http_code}", "-x", p.url, url]
    if user is not None:
        args += ["--proxy-user", user]
    body, _, status = curl(*args).stdout.decode().rpartition("\n")
    return status, body


def test_directory_user_gets_through_and_is_logged(ldapproxy, origin):
    assert code(ldapproxy, origin.url("/text/ldap"), "alice:wonderland") == ("200", "hello ldap\n")
    assert wait_until(lambda: any("/text/ldap" in x and " alice " in x for x in ldapproxy.access_lines()))


def test_wrong_directory_password_gets_407(ldapproxy, origin):
    for user in ("alice:wrong", "nobody:wonderland", "alice:"):
        status, _ = code(ldapproxy, origin.url("/text/ldap-wrong"), user)
        assert status == "407", user
    assert origin.hits["/text/ldap-wrong"] == 0


def test_filter_characters_in_the_user_name_are_escaped(ldapproxy, origin):
    for user in ("*:wonderland", "alice)(uid=*:wonderland", "*)(|(uid=*:x"):
        assert code(ldapproxy, origin.url("/text/ldap-inject"), user)[0] == "407", user
    assert origin.hits["/text/ldap-inject"] == 0


def test_directory_groups_drive_the_rules(ldapproxy, origin):
    url = f"http://localhost:{origin.port}/text/ldap-rule"
    status, body = code(ldapproxy, url, "bob:canwefixit")  # students, a posixGroup memberUid
    assert status == "403" and '"students"' in body
    assert code(ldapproxy, url, "alice:wonderland") == ("200", "hello ldap-rule\n")  # staff: no rule applies


def test_ldaps_with_the_directory_ca(tmp_path, slapd, ca, origin):
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    p = ldap_proxy(tmp_path, slapd.ldaps_url, str(tmp_path / "ca.pem"), ldap_starttls=False)
    try:
        assert code(p, origin.url("/text/ldaps"), "alice:wonderland") == ("200", "hello ldaps\n")
        assert code(p, origin.url("/text/ldaps"), "alice:wrong")[0] == "407"
    finally:
        p.stop()


def test_unreachable_directory_is_503_not_an_open_door(tmp_path, origin):
    p = ldap_proxy(tmp_path, f"ldap://127.0.0.1:{free_port()}")
    try:
        status, body = code(p, origin.url("/text/ldap-down"), "alice:wonderland")
        assert status == "503" and "directory" in body
        assert code(p, origin.url("/text/ldap-down"))[0] == "407"
        assert origin.hits["/text/ldap-down"] == 0
        assert "cannot check the password of 'alice'" in p.stderr() and "wonderland" not in p.stderr()
    finally:
        p.stop()


def test_an_untrusted_directory_certificate_is_503(tmp_path, slapd, origin):
    p = ldap_proxy(tmp_path, slapd.url)  # StartTLS without the test CA: the system CAs do not know it
    try:
        status, _ = code(p, origin.url("/text/ldap-untrusted"), "alice:wonderland")
        assert status == "503"
        assert origin.hits["/text/ldap-untrusted"] == 0
    finally:
        p.stop()
