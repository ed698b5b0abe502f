"""The local certificate authority for TLS interception (`webproxy ca init`, tls.ca_dir) and the
leaf certificates it mints, kept in memory and on disk until near their expiry.

Files in ca_dir:
    ca.pem        the CA certificate (what clients are told to trust)
    ca-key.pem    its private key: created with mode 0600 (never readable by anyone else at any
                  moment: O_EXCL with the mode, then renamed into place), never logged or copied
    leaf-key.pem  one key shared by every minted leaf (0600): minting is then one ECDSA signature
                  (~0.1 ms) instead of a key generation, as Squid's certificate generator does
    leaves/<CA fingerprint>/<name>.pem   minted leaves; a new CA never serves an old one's leaves

Keys are ECDSA P-256: every TLS client this proxy serves (curl, pip, npm, apt, browsers) accepts
them, and signing and handshakes cost a fraction of RSA-2048's.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections import OrderedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webproxy.tlspolicy import LEAF_LIFETIME, leaf_fresh

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
LEAF_KEY = "leaf-key.pem"
CA_LIFETIME = 10 * 365 * 86400
MEMORY_LEAVES = 4096  # server contexts kept in memory (one per intercepted name)
ALPN = ["http/1.1"]  # the inner requests are parsed as HTTP/1.1 only


class CAError(Exception):
    """A problem with the CA files, worded for the admin (one line)."""


def key_mode_problem(mode: int, path: str) -> str | None:
    """Pure: why a key file with this st_mode must not be used, or None."""
    if mode & 0o077:
        return (f"the CA key {path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {path}")
    return None


def startup_problem(ca_dir: str, intercept: list[str]) -> str | None:
    """What stops the proxy from starting, as one line naming the fix, or None."""
    key = os.path.join(ca_dir, CA_KEY)
    for path in (key, os.path.join(ca_dir, LEAF_KEY)):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            return f"cannot read {path}: {e.strerror}"
        why = key_mode_problem(st.st_mode, path)
        if why:
            return why
    if intercept and not ca_exists(ca_dir):
        return f"tls.intercept is set but there is no CA in {ca_dir}; run: webproxy ca init --dir {ca_dir}"
    return None


def _write_private(path: str, data: bytes) -> None:
    """Create `path` holding `data` with mode 0600 from the first byte: a temporary file created
    exclusively with that mode, then linked into place (atomic: never half-written, and never
    replacing a file another process created first: FileExistsError then)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case the umask or an ACL made it different
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _write_public(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(ca_dir: str, now: float | None = None) -> str:
    """Create the CA in `ca_dir` (made 0700 if new). Returns the certificate's path; CAError when
    a CA is already there (it is never overwritten: clients trust it)."""
    cert_path, key_path = os.path.join(ca_dir, CA_CERT), os.path.join(ca_dir, CA_KEY)
    if os.path.exists(key_path) or os.path.exists(cert_path):
        raise CAError(f"a CA already exists in {ca_dir} (webproxy ca show prints it); "
                      "remove its files first to make a new one")
    try:
        os.makedirs(ca_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CAError(f"cannot create {ca_dir}: {e.strerror}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    t = datetime.datetime.fromtimestamp(now if now is not None else time.time(), datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "webproxy"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"webproxy local CA ({socket.gethostname()[:40]})")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - datetime.timedelta(hours=1))
            .not_valid_after(t + datetime.timedelta(seconds=CA_LIFETIME))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    try:
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise CAError(f"cannot write the CA into {ca_dir}: {e.strerror}") from None
    return cert_path


def ca_exists(ca_dir: str) -> bool:
    return os.path.exists(os.path.join(ca_dir, CA_KEY)) and os.path.exists(os.path.join(ca_dir, CA_CERT))


def read_ca_cert(ca_dir: str) -> bytes:
    path = os.path.join(ca_dir, CA_CERT)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CAError(f"no CA in {ca_dir}; run: webproxy ca init --dir {ca_dir}") from None
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from None


def _safe_name(name: str) -> str:
    return name.replace(":", "_")  # IPv6 literals; names are already checked (httpmsg.check_host)


class Authority:
    """The loaded CA: mints leaf certificates and hands out a server SSLContext per name."""

    def __init__(self, ca_dir: str) -> None:
        """Raises CAError (one line) when the CA cannot be read."""
        self.ca_dir = ca_dir
        pem = read_ca_cert(ca_dir)
        key_path = os.path.join(ca_dir, CA_KEY)
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            self.cert = x509.load_pem_x509_certificate(pem)
        except OSError as e:
            raise CAError(f"cannot read {key_path}: {e.strerror}") from None
        except (ValueError, TypeError):
            raise CAError(f"the CA in {ca_dir} cannot be loaded (damaged files?); "
                          "remove them and run: webproxy ca init") from None
        self._key = key
        fingerprint = hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
        self.leaf_dir = os.path.join(ca_dir, "leaves", fingerprint)
        self.leaf_key_path = os.path.join(ca_dir, LEAF_KEY)
        self._leaf_key = self._load_leaf_key()
        self._contexts: OrderedDict[str, tuple[ssl.SSLContext, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.minted = 0  # leaves signed by this process (tests, stats)
        self._scratch: str | None = None

    def _load_leaf_key(self) -> ec.EllipticCurvePrivateKey:
        """The shared leaf key, created on first use; several workers starting at once all end up
        with the one that was linked into place first (the file is what TLS contexts load)."""
        if not os.path.exists(self.leaf_key_path):
            with contextlib.suppress(FileExistsError):
                _write_private(self.leaf_key_path, _key_pem(ec.generate_private_key(ec.SECP256R1())))
        try:
            with open(self.leaf_key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
        except OSError as e:
            raise CAError(f"cannot read {self.leaf_key_path}: {e.strerror}") from None
        except (ValueError, TypeError):
            raise CAError(f"{self.leaf_key_path} is damaged; remove it (a new one is made)") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{self.leaf_key_path} is not an EC key; remove it (a new one is made)")
        return key

    def cached(self, name: str, now: float) -> ssl.SSLContext | None:
        """The server context for `name` if one is in memory and fresh (called on the event loop)."""
        with self._lock:  # minting threads add entries (and evict the oldest) concurrently
            entry = self._contexts.get(name)
            if entry is not None and leaf_fresh(entry[1], now):
                self._contexts.move_to_end(name)
                return entry[0]
        return None

    def context_for(self, name: str, now: float | None = None) -> ssl.SSLContext:
        """The server context for `name`: from memory, else from disk, else freshly minted (file I/O
        and signing: call it in a thread, not on the event loop)."""
        now = time.time() if now is None else now
        ctx = self.cached(name, now)
        if ctx is not None:
            return ctx
        path = os.path.join(self.leaf_dir, _safe_name(name) + ".pem")
        not_after = self._on_disk(path, now)
        if not_after is None:
            pem, not_after = self.mint(name, now)
            try:
                os.makedirs(self.leaf_dir, mode=0o700, exist_ok=True)
                _write_public(path, pem)
            except OSError:
                # ca_dir not writable (e.g. after dropping privileges): keep it in a private
                # scratch directory instead; it is only re-minted after a restart.
                if self._scratch is None:
                    self._scratch = tempfile.mkdtemp(prefix="webproxy-leaves-")
                path = os.path.join(self._scratch, _safe_name(name) + ".pem")
                _write_public(path, pem)
        ctx = server_context(path, self.leaf_key_path)
        with self._lock:
            self._contexts[name] = (ctx, not_after)
            while len(self._contexts) > MEMORY_LEAVES:
                self._contexts.popitem(last=False)
        return ctx

    @staticmethod
    def _on_disk(path: str, now: float) -> float | None:
        try:
            with open(path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError):
            return None
        not_after = cert.not_valid_after_utc.timestamp()
        return not_after if leaf_fresh(not_after, now) else None

    def mint(self, name: str, now: float) -> tuple[bytes, float]:
        """A leaf for `name` signed by the CA: (PEM, not_after epoch seconds)."""
        t = datetime.datetime.fromtimestamp(now, datetime.UTC)
        not_after = t + datetime.timedelta(seconds=LEAF_LIFETIME)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
                .issuer_name(self.cert.subject).public_key(self._leaf_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(t - datetime.timedelta(hours=1)).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(self._key, hashes.SHA256()))  # type: ignore[arg-type]
        self.minted += 1
        return cert.public_bytes(serialization.Encoding.PEM), not_after.timestamp()


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """The TLS server side towards a client: our leaf, TLS 1.2+, ALPN http/1.1 only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def origin_context(cafile: str = "") -> ssl.SSLContext:
    """The TLS client side towards origins: always verified (chain and host name) against the
    system trust store, plus `cafile` (tls.upstream_ca_file) when given. There is no way to turn
    verification off. Raises CAError when `cafile` cannot be loaded."""
    ctx = ssl.create_default_context()  # CERT_REQUIRED, check_hostname, system store
    if cafile:
        try:
            ctx.load_verify_locations(cafile)
        except (OSError, ssl.SSLError) as e:
            raise CAError(f"tls.upstream_ca_file {cafile}: cannot load it "
                          f"({getattr(e, 'strerror', None) or e})") from None
    ctx.set_alpn_protocols(ALPN)
    return ctx
