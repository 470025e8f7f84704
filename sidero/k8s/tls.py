# -*- test-case-name: tests.k8s.test_webhook -*-
"""Serving certificates for the webhook server, and a TLS context that follows them on disk.

Two layouts of C{cert_dir}, as Sidero's managers run:

 - cert-manager's: C{tls.crt}, C{tls.key} (and usually C{ca.crt}) written by cert-manager into a
   mounted Secret, rotated in place.  We serve them and never write to the directory.
 - self-managed: none of them exist, so we make a throwaway CA and a serving certificate for the
   given DNS names and IPs, written atomically with mode 0600; the CA PEM is what the caller
   injects as the CRDs' and webhook configuration's C{caBundle}.

A certificate we generated ourselves (issuer C{SELF_SIGNED_CA_NAME}) is regenerated when it no
longer names every host or is close to expiry; cert-manager's are left alone.

L{CertificateReloader} re-reads the files when their stat signature changes (checked at most
every few seconds, off the reactor thread) and swaps the OpenSSL context new connections use,
so a rotation needs no restart.  Everything that touches the disk is a plain blocking function
meant for a thread pool.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
SELF_SIGNED_CA_NAME = "sidero-webhook-ca"
#: Self-generated certificates live this long, and are renewed this long before they expire.
SERVING_LIFETIME = datetime.timedelta(days=365)
CA_LIFETIME = datetime.timedelta(days=3650)
RENEW_BEFORE = datetime.timedelta(days=30)
#: Seconds between two looks at the files (cert-manager rotates rarely; a stat is cheap).
DEFAULT_RELOAD_INTERVAL = 5.0

#: Go's C{--tls-min-version} names (spec §1.6), to OpenSSL protocol versions.  TLS 1.0/1.1 are
#: refused outright: the spec's default is 1.2 and nothing that talks to a webhook needs less.
TLS_VERSIONS = {
    "VersionTLS12": SSL.TLS1_2_VERSION,
    "VersionTLS13": SSL.TLS1_3_VERSION,
}

log = Logger()


class CertificateError(Exception):
    """The certificate files are missing, unreadable, mismatched or cannot be written."""


@dataclass(frozen=True)
class ServingFiles:
    """What is being served: the PEM files' paths, the CA (None when unknown), and whether we
    generated them (True) or found them (False, cert-manager)."""

    cert_path: str
    key_path: str
    ca_pem: bytes | None
    generated: bool


# ---- generation ------------------------------------------------------------------------------

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    names: list[str] = []
    ips: list[str] = []
    for host in hosts:
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            names.append(host)
    return names, ips


def generate(hosts: Sequence[str], now: datetime.datetime | None = None) -> tuple[bytes, bytes, bytes]:
    """A fresh ECDSA P-256 CA and a serving certificate it signs, naming every host
    (DNS names and IP addresses alike).  Returns C{(ca_pem, cert_pem, key_pem)}; C{cert_pem}
    is the leaf followed by the CA, as cert-manager writes C{tls.crt}."""
    if not hosts:
        raise CertificateError("a serving certificate needs at least one DNS name or IP address")
    now = now or _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SELF_SIGNED_CA_NAME)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names, ips = _split_hosts(hosts)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVING_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    cert_pem = leaf.public_bytes(serialization.Encoding.PEM) + ca_pem
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca_pem, cert_pem, key_pem


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write C{data} to a temp file beside C{path} (created with C{mode}, so a key is never
    readable by others even briefly), fsync it, then rename it over C{path}."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _covers(cert: x509.Certificate, hosts: Sequence[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    want_names, want_ips = _split_hosts(hosts)
    return set(want_names) <= names and set(want_ips) <= ips


def _self_generated_needs_renewal(cert_pem: bytes, hosts: Sequence[str], now: datetime.datetime) -> bool:
    """True when C{cert_pem} is one of ours and no longer fits (hosts, expiry); a certificate
    we did not issue (cert-manager) is never "ours" and so never replaced."""
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, IndexError):
        return False
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not issuer or issuer[0].value != SELF_SIGNED_CA_NAME:
        return False
    return cert.not_valid_after_utc - RENEW_BEFORE < now or not _covers(cert, hosts)


def ensure_certificate(cert_dir: str, hosts: Sequence[str], now: datetime.datetime | None = None) -> ServingFiles:
    """Use C{cert_dir}'s C{tls.crt}/C{tls.key} if present, else generate them (see module doc).

    Blocking (disk and key generation): run it in a thread pool.
    @raise CertificateError: the directory cannot be created or written, or only one of the
        two files exists.
    """
    now = now or _now()
    cert_path = os.path.join(cert_dir, CERT_FILE)
    key_path = os.path.join(cert_dir, KEY_FILE)
    ca_path = os.path.join(cert_dir, CA_FILE)
    have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
    if have_cert and have_key:
        try:
            with open(cert_path, "rb") as f:
                current = f.read()
        except OSError as e:
            raise CertificateError(f"cannot read {cert_path}: {e.strerror}") from e
        if not _self_generated_needs_renewal(current, hosts, now):
            ca_pem = None
            if os.path.exists(ca_path):
                with open(ca_path, "rb") as f:
                    ca_pem = f.read()
            return ServingFiles(cert_path, key_path, ca_pem, generated=False)
        log.info("webhook certificate in {dir} is ours and stale (hosts or expiry): regenerating",
                 dir=cert_dir)
    elif have_cert or have_key:
        missing = key_path if have_cert else cert_path
        raise CertificateError(f"{missing} is missing (the other half of the pair is there)")
    try:
        os.makedirs(cert_dir, mode=0o700, exist_ok=True)
        ca_pem, cert_pem, key_pem = generate(hosts, now)
        # Key first: a reloader that sees the new certificate also finds its key.
        write_atomically(key_path, key_pem)
        write_atomically(cert_path, cert_pem)
        write_atomically(ca_path, ca_pem)
    except OSError as e:
        raise CertificateError(f"cannot write webhook certificates to {cert_dir}: {e.strerror or e}") from e
    log.info("generated a self-signed webhook CA and certificate for {hosts} in {dir}",
             hosts=list(hosts), dir=cert_dir)
    return ServingFiles(cert_path, key_path, ca_pem, generated=True)


# ---- serving ---------------------------------------------------------------------------------

def cipher_list(suites: Sequence[str]) -> bytes:
    """OpenSSL's cipher string for Go cipher suite names (TLS 1.3 names need none)."""
    from sidero.config import GO_CIPHER_SUITES

    names = [GO_CIPHER_SUITES[s] for s in suites if s in GO_CIPHER_SUITES]
    return ":".join(dict.fromkeys(n for n in names if n)).encode()


def build_context(cert_pem: bytes, key_pem: bytes, min_version: str = "VersionTLS12",
                  cipher_suites: Sequence[str] = ()) -> SSL.Context:
    """An OpenSSL server context serving the chain in C{cert_pem} with C{key_pem}.

    @raise CertificateError: unparsable PEM, or a key that does not match the certificate.
    """
    if min_version not in TLS_VERSIONS:
        raise CertificateError(
            f"unsupported TLS minimum version {min_version!r}; use one of {sorted(TLS_VERSIONS)}")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"unreadable certificate or key: {e}") from e
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(TLS_VERSIONS[min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ciphers = cipher_list(cipher_suites)
    if ciphers:
        try:
            ctx.set_cipher_list(ciphers)
        except SSL.Error as e:
            raise CertificateError(
                f"none of --tls-cipher-suites {','.join(cipher_suites)} is available here") from e
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except SSL.Error as e:
        raise CertificateError(f"certificate and key do not match: {e}") from e
    return ctx


Signature = tuple[tuple[int, int, int], ...]


def file_signature(*paths: str) -> Signature:
    """What changes when a file is replaced: (mtime_ns, inode, size) of each, following
    symlinks (a mounted Secret swaps a C{..data} symlink)."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(out)


def load_if_changed(cert_path: str, key_path: str, previous: Signature | None,
                    min_version: str = "VersionTLS12", cipher_suites: Sequence[str] = (),
                    ) -> tuple[Signature, SSL.Context] | None:
    """Blocking: a new context if the files' signature differs from C{previous}, else None.

    @raise CertificateError: the files are unreadable or do not make a valid pair (e.g. caught
        half-way through a rotation; the caller keeps serving the old context).
    """
    try:
        sig = file_signature(cert_path, key_path)
    except OSError as e:
        raise CertificateError(f"cannot stat {cert_path} / {key_path}: {e.strerror}") from e
    if sig == previous:
        return None
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {cert_path} / {key_path}: {e.strerror}") from e
    return sig, build_context(cert_pem, key_pem, min_version, cipher_suites)


Runner = Callable[..., "Deferred[Any]"]


@implementer(IOpenSSLServerConnectionCreator)
class CertificateReloader:
    """Serves the current context and swaps in a new one when the files change.

    @ivar reloads: how many times a changed pair was loaded (the first load counts).
    @ivar failures: how many checks failed (the old context stayed in use).
    """

    def __init__(self, clock: IReactorTime, run: Runner, cert_path: str, key_path: str, *,
                 min_version: str = "VersionTLS12", interval: float = DEFAULT_RELOAD_INTERVAL,
                 cipher_suites: Sequence[str] = ()) -> None:
        self.clock = clock
        self.cipher_suites = tuple(cipher_suites)
        self.run = run
        self.cert_path = cert_path
        self.key_path = key_path
        self.min_version = min_version
        self.interval = interval
        self.context: SSL.Context | None = None
        self.signature: Signature | None = None
        self.reloads = 0
        self.failures = 0
        self._loop: LoopingCall | None = None

    async def load(self) -> None:
        """First load (in the pool); a failure here is fatal to the caller's start."""
        result = await self.run(load_if_changed, self.cert_path, self.key_path, None, self.min_version,
                                self.cipher_suites)
        assert result is not None
        self.signature, self.context = result
        self.reloads += 1

    def start(self) -> None:
        """Look at the files every C{interval} seconds (after L{load})."""
        loop = self._loop = LoopingCall(self._check)
        loop.clock = self.clock
        loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _check(self) -> Deferred[None]:
        d = self.run(load_if_changed, self.cert_path, self.key_path, self.signature, self.min_version,
                     self.cipher_suites)

        def loaded(result: tuple[Signature, SSL.Context] | None) -> None:
            if result is not None:
                self.signature, self.context = result
                self.reloads += 1
                log.info("webhook certificate {path} changed: reloaded", path=self.cert_path)

        def failed(f: Any) -> None:
            # Never let the loop die: a half-rotated pair settles by the next check.
            self.failures += 1
            log.warn("webhook certificate reload failed, still serving the previous one: {error}",
                     error=f.getErrorMessage())

        d.addCallbacks(loaded, failed)
        return d

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self.context is None:
            raise CertificateError("no webhook certificate loaded yet")
        return SSL.Connection(self.context, None)
