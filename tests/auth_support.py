"""Test support for proxy authentication (issue 10): htpasswd files, Basic credentials, a raw
client that can speak from another loopback address, and a real OpenLDAP slapd with a small
directory of users and groups."""

from __future__ import annotations

import base64
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import bcrypt

from tests.support import ROOT, free_port

SLAPD = "/usr/sbin/slapd"
SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "directory-admin"
SERVICE_DN = f"uid=proxy,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-secret"


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """bcrypt entries at the lowest cost (4): the tests check the format, not the hashing speed."""
    path.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n" for u, p in users.items()))
    return path


def user_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`webproxy user ARGS...` from this checkout, with `stdin` (for --password-stdin)."""
    return subprocess.run([sys.executable, "-m", "webproxy", "user", *args], input=stdin, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})


def user_cli_on_tty(args: list[str], answers: list[str], timeout: float = 30) -> tuple[int, str]:
    """`webproxy user ARGS...` on a pseudo-terminal, as an admin types: each of `answers` is typed
    after the next password prompt appears (getpass flushes what was typed before its prompt).
    Returns (exit code, what the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader with the pty as its terminal
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "webproxy", "user", *args])
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        for n, answer in enumerate(answers, 1):
            while shown.count(b"assword") < n and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.5)[0]:
                    shown += os.read(fd, 1024)
            os.write(fd, answer.encode() + b"\n")
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    data = os.read(fd, 1024)
                except OSError:  # EIO: the child has exited and closed the terminal
                    break
                if not data:
                    break
                shown += data
    finally:
        os.close(fd)
    if time.monotonic() >= deadline:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def raw_exchange(port: int, data: bytes, source: str = "127.0.0.1", timeout: float = 15) -> bytes:
    """Send `data` from `source` (any 127/8 address works on Linux loopback) and read until the
    proxy has answered one response head and its Content-Length body, or closed."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return buf
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


DIRECTORY = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=services,{SUFFIX}
objectClass: organizationalUnit
ou: services

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: {SERVICE_DN}
objectClass: account
objectClass: simpleSecurityObject
uid: proxy
userPassword: {SERVICE_PASSWORD}

dn: uid=alice,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: Liddell
userPassword: wonderland

dn: uid=bob,ou=people,{SUFFIX}
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: Builder
userPassword: canwefixit

dn: cn=staff,ou=groups,{SUFFIX}
objectClass: groupOfNames
cn: staff
member: uid=alice,ou=people,{SUFFIX}

dn: cn=students,ou=groups,{SUFFIX}
objectClass: posixGroup
cn: students
gidNumber: 5000
memberUid: bob
"""


def slapd_skip_reason() -> str | None:
    if not Path(SLAPD).exists():
        return f"OpenLDAP slapd is not installed ({SLAPD}; Debian package slapd)"
    if shutil.which("ldapadd") is None:
        return "ldapadd is not installed (Debian package ldap-utils)"
    return None


class Slapd:
    """A real slapd on a free loopback port, its own slapd.conf and mdb database in `directory`,
    loaded with DIRECTORY. With `cert` (a trustme LeafCert) it also offers StartTLS on `url`, and
    LDAP over TLS on `ldaps_url`."""

    def __init__(self, directory: Path, cert: object | None = None) -> None:
        self.dir = directory
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{free_port()}" if cert is not None else ""
        self.proc: subprocess.Popen[bytes] | None = None
        (directory / "db").mkdir(parents=True)
        tls = ""
        if cert is not None:
            cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))  # type: ignore[attr-defined]
            tls = (f"TLSCertificateFile {directory / 'server.pem'}\n"
                   f"TLSCertificateKeyFile {directory / 'server.pem'}\n")
        schema = "/etc/ldap/schema"
        (directory / "slapd.conf").write_text(
            "".join(f"include {schema}/{s}.schema\n" for s in ("core", "cosine", "inetorgperson", "nis"))
            + f"modulepath /usr/lib/ldap\nmoduleload back_mdb\npidfile {directory / 'slapd.pid'}\n{tls}"
            + f'database mdb\nmaxsize 10485760\nsuffix "{SUFFIX}"\nrootdn "{ADMIN_DN}"\nrootpw {ADMIN_PASSWORD}\n'
            + f"directory {directory / 'db'}\n"
            + "access to attrs=userPassword by anonymous auth by * none\naccess to * by * read\n")

    def start(self) -> Slapd:
        self.log = open(self.dir / "slapd.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([SLAPD, "-f", str(self.dir / "slapd.conf"), "-h", " ".join(f"{u}/" for u in (self.url, self.ldaps_url) if u), "-d", "0"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("slapd did not start: " + (self.dir / "slapd.log").read_text()) from None
                time.sleep(0.05)
        r = subprocess.run(["ldapadd", "-x", "-H", self.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD],
                           input=DIRECTORY, capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"ldapadd failed: {r.stderr}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
