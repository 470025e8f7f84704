# -*- test-case-name: tests.k8s.test_apiserver_fixture -*-
"""
A real kube-apiserver (etcd embedded) for integration tests, run as a child process.

The binary is built from C{tools/kube-apiserver} by C{scripts/build-kube-apiserver}; this module
only finds it (C{$KUBEAPISERVER_BIN} first, then the build script's cache path) and never builds.
When neither exists the tests that need it skip with the reason, unless
C{$SIDERO_REQUIRE_KUBEAPISERVER=1}, in which case they fail (CI sets it after building).

Starting takes seconds, so a trial test module shares one server per process through
L{sharedAPIServer} (stopped at interpreter exit) and isolates its tests by namespace; a test that
needs its own server makes a L{KubeAPIServer} and calls L{KubeAPIServer.start} /
L{KubeAPIServer.stop} itself.

With C{controller_manager=True} (the shared server has it) the same binary also runs
kube-controller-manager beside the API server, with only the garbage collector and the namespace
controller, so ownerReferences and namespace deletion behave as in a cluster. Both are asynchronous
there: the garbage collector rediscovers resources (new CRDs) every 30 s, so tests poll.
L{KubeAPIServer.kill} / L{KubeAPIServer.restart} simulate a crash and a restart that keeps the data,
the certificates and the port.

Nothing here blocks the reactor for long: launching is a quick C{Popen}; readiness probes, CRD
application and client calls run in the reactor's thread pool (C{deferToThread}).
"""

from __future__ import annotations

import atexit
import base64
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest

from tests.paths import REPO
from tests.ports import free_port

log = Logger()

BUILD_SCRIPT = REPO / "scripts" / "build-kube-apiserver"
WRAPPER_GO_MOD = REPO / "tools" / "kube-apiserver" / "go.mod"
CRD_DIR = REPO / "deploy" / "crds"
ENV_BIN = "KUBEAPISERVER_BIN"
ENV_REQUIRE = "SIDERO_REQUIRE_KUBEAPISERVER"
SERVICE_CIDR = "10.0.0.0/24"  # a flag value only: no packet is ever sent to it (no kube-proxy)
# The first argument that makes the wrapper binary run kube-controller-manager instead.
CONTROLLER_MANAGER_COMMAND = "kube-controller-manager"
# Only what the tests need: ownerReference garbage collection and namespace deletion. (No
# service-account controllers: the ServiceAccount admission plugin is off.)
CONTROLLERS = ("garbage-collector-controller", "namespace-controller")


class APIServerError(Exception):
    """The apiserver could not be started, or a request to it failed."""


def expected_version() -> str:
    """The Kubernetes version the wrapper module pins (the binary's gitVersion)."""
    m = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", WRAPPER_GO_MOD.read_text(), re.M)
    if m is None:
        raise APIServerError(f"no k8s.io/kubernetes requirement in {WRAPPER_GO_MOD}")
    return m.group(1)


def cached_binary_path() -> Path | None:
    """Where the build script puts (or would put) the binary for the current sources."""
    try:
        out = subprocess.run(
            [str(BUILD_SCRIPT), "--path"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return Path(lines[-1]) if lines else None


def find_binary() -> tuple[Path | None, str]:
    """Return C{(path, "")} for a usable binary, else C{(None, reason)}."""
    env = os.environ.get(ENV_BIN)
    if env:
        p = Path(env)
        if p.is_file() and os.access(p, os.X_OK):
            return p, ""
        return None, f"${ENV_BIN}={env} is not an executable file"
    cached = cached_binary_path()
    if cached is not None and cached.is_file() and os.access(cached, os.X_OK):
        return cached, ""
    return None, (
        f"no kube-apiserver binary: ${ENV_BIN} is unset and {cached or BUILD_SCRIPT} does not exist;"
        f" run scripts/build-kube-apiserver (needs Go; the cold build takes minutes)"
    )


def require_binary() -> Path:
    """The binary, or a loud skip (or failure under C{$SIDERO_REQUIRE_KUBEAPISERVER=1})."""
    path, reason = find_binary()
    if path is not None:
        return path
    if os.environ.get(ENV_REQUIRE) == "1":
        raise APIServerError(f"{ENV_REQUIRE}=1 but {reason}")
    log.warn("SKIPPING real-apiserver tests: {reason}", reason=reason)
    raise SkipTest(f"SKIPPED, real kube-apiserver unavailable: {reason}")


# --- certificates -----------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes


class TinyCA:
    """A throwaway ECDSA P-256 certificate authority, valid for a day."""

    def __init__(self, name: str) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._name = subject
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return _pem_cert(self.cert)

    def issue(
        self,
        common_name: str,
        organizations: Sequence[str] = (),
        *,
        server_names: Sequence[str] = (),
        server_ips: Sequence[str] = (),
        client: bool = False,
    ) -> KeyPair:
        """Issue a leaf certificate: serving if names/IPs are given, client if C{client}."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = datetime.datetime.now(datetime.UTC)
        usages = []
        if server_names or server_ips:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return KeyPair(_pem_cert(cert), _pem_key(key))


def write_kubeconfig(path: Path, server: str, ca: bytes, client: KeyPair) -> None:
    """Write a kubeconfig with everything inline (envtest style), so it is self-contained."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sidero-test", "cluster": {
            "server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": "admin", "user": {
            "client-certificate-data": b64(client.cert), "client-key-data": b64(client.key)}}],
        "contexts": [{"name": "sidero-test", "context": {"cluster": "sidero-test", "user": "admin"}}],
        "current-context": "sidero-test",
        "preferences": {},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --- the server -------------------------------------------------------------------------------


class KubeAPIServer:
    """
    One kube-apiserver child process with its own etcd, certificates and temp dir.

    @ivar workdir: the temp dir holding C{pki/}, C{certs/}, C{etcd/}, C{kubeconfig} and
        C{apiserver.log}; removed by L{stop}.
    """

    def __init__(
        self,
        binary: Path,
        *,
        extra_args: Sequence[str] = (),
        controller_manager: bool = False,
        controller_manager_extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = Path(binary)
        self.extra_args = list(extra_args)
        self.controller_manager = controller_manager
        self.controller_manager_extra_args = list(controller_manager_extra_args)
        self.workdir: Path | None = None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.cm_port = 0
        self.cm_process: subprocess.Popen[bytes] | None = None
        self.cm_ready_after: float | None = None
        self._cm_log_file: Any = None
        self.started_at = 0.0
        self.ready_after: float | None = None
        self._ca: TinyCA | None = None
        self._client_ca: TinyCA | None = None
        self._admin: KeyPair | None = None
        self._log_file: Any = None

    # paths
    def _path(self, *parts: str) -> Path:
        if self.workdir is None:
            raise APIServerError("not started")
        return self.workdir.joinpath(*parts)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self._path("kubeconfig")

    @property
    def ca_file(self) -> Path:
        return self._path("pki", "ca.crt")

    @property
    def log_path(self) -> Path:
        return self._path("apiserver.log")

    @property
    def cm_log_path(self) -> Path:
        return self._path("controller-manager.log")

    @property
    def cm_url(self) -> str:
        return f"https://127.0.0.1:{self.cm_port}"

    def _prepare(self) -> None:
        """Make the temp dir, the CAs and keys, and the kubeconfig (before the port is known)."""
        self.workdir = Path(tempfile.mkdtemp(prefix="sidero-kube-apiserver-"))
        for d in ("pki", "certs", "etcd"):
            self._path(d).mkdir(mode=0o700)
        self._ca = TinyCA("sidero-test-serving-ca")
        self._client_ca = TinyCA("sidero-test-client-ca")
        serving = self._ca.issue(
            "localhost", server_names=["localhost"], server_ips=["127.0.0.1", "::1"]
        )
        # kube-apiserver loads apiserver.crt/.key from --cert-dir rather than self-signing.
        self._path("certs", "apiserver.crt").write_bytes(serving.cert + self._ca.cert_pem)
        self._path("certs", "apiserver.key").write_bytes(serving.key)
        # kube-controller-manager's own serving certificate (for its /healthz), same CA.
        cm_serving = self._ca.issue("kube-controller-manager", server_ips=["127.0.0.1"])
        self._path("certs", "controller-manager.crt").write_bytes(cm_serving.cert + self._ca.cert_pem)
        self._path("certs", "controller-manager.key").write_bytes(cm_serving.key)
        self._admin = self._client_ca.issue("admin", ["system:masters"], client=True)
        self._path("pki", "ca.crt").write_bytes(self._ca.cert_pem)
        self._path("pki", "client-ca.crt").write_bytes(self._client_ca.cert_pem)
        self._path("pki", "admin.crt").write_bytes(self._admin.cert)
        self._path("pki", "admin.key").write_bytes(self._admin.key)
        sa = ec.generate_private_key(ec.SECP256R1())
        self._path("pki", "sa.key").write_bytes(_pem_key(sa))
        self._path("pki", "sa.pub").write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def args(self) -> list[str]:
        """The command line, as envtest runs kube-apiserver plus what a loopback-only test needs."""
        pki = self._path("pki")
        return [
            str(self.binary),
            f"--embedded-etcd-data-dir={self._path('etcd')}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self._path('certs')}",
            f"--client-ca-file={pki / 'client-ca.crt'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.url}/",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            *self.extra_args,
        ]

    def controller_manager_args(self) -> list[str]:
        """
        kube-controller-manager's command line: the admin kubeconfig for everything (so no
        service-account credentials are needed), no leader election, and its secure port (only
        for /healthz) on loopback with a certificate from the fixture's CA.
        """
        kubeconfig = self.kubeconfig
        return [
            str(self.binary),
            CONTROLLER_MANAGER_COMMAND,
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.cm_port}",
            f"--tls-cert-file={self._path('certs', 'controller-manager.crt')}",
            f"--tls-private-key-file={self._path('certs', 'controller-manager.key')}",
            "--profiling=false",
            *self.controller_manager_extra_args,
        ]

    def launch(self, port: int | None = None) -> None:
        """Create the files and spawn the process (quick; does not wait for readiness).

        C{port} reuses a given port (a restart); by default a free one is picked.
        """
        if self.workdir is None:
            self._prepare()
        assert self._ca is not None and self._admin is not None
        self.port = free_port() if port is None else port
        write_kubeconfig(self.kubeconfig, self.url, self._ca.cert_pem, self._admin)
        self._log_file = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.ready_after = None
        self.process = subprocess.Popen(
            self.args(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            start_new_session=True,  # own process group: stop() kills the whole group
            preexec_fn=_die_with_parent,
        )
        log.info("kube-apiserver pid {pid} on {url}", pid=self.process.pid, url=self.url)

    def launch_controller_manager(self) -> None:
        """Spawn kube-controller-manager on a free loopback port (quick; does not wait)."""
        self.cm_port = free_port()
        self._close_cm_log()
        self._cm_log_file = open(self.cm_log_path, "ab")
        self.cm_ready_after = None
        self.cm_process = subprocess.Popen(
            self.controller_manager_args(),
            stdin=subprocess.DEVNULL,
            stdout=self._cm_log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.info("kube-controller-manager pid {pid} on {url}", pid=self.cm_process.pid,
                 url=self.cm_url)

    def probe(self, path: str = "/readyz", timeout: float = 2.0) -> tuple[int, bytes]:
        """One authenticated GET (blocking, short timeout): C{(status, body)}; status 0 if down."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self._path("pki", "admin.crt")), str(self._path("pki", "admin.key")))
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout, context=ctx) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())
        except (OSError, ssl.SSLError):
            return 0, b""

    def probe_controller_manager(self, path: str = "/healthz", timeout: float = 2.0) -> tuple[int, bytes]:
        """One GET to kube-controller-manager's secure port (blocking): C{(status, body)}."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(self.cm_url + path, timeout=timeout, context=ctx) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())
        except (OSError, ssl.SSLError):
            return 0, b""

    def get_json(self, path: str) -> Any:
        """GET a path as the admin and decode the JSON body (blocking)."""
        status, body = self.probe(path, timeout=10.0)
        if status != 200:
            raise APIServerError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def cm_log_tail(self, lines: int = 40) -> str:
        """The end of kube-controller-manager's log."""
        return _tail(self.cm_log_path, lines)

    async def _start(self, reactor: IReactorTime, timeout: float, port: int | None = None) -> KubeAPIServer:
        await self._start_apiserver(reactor, timeout, port)
        if self.controller_manager:
            await self._start_controller_manager(reactor, timeout)
        return self

    async def _start_apiserver(self, reactor: IReactorTime, timeout: float, port: int | None) -> None:
        for attempt in range(3):
            self.launch(port)
            proc = self.process
            assert proc is not None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                code = proc.poll()
                if code is not None:
                    break
                status, _ = await threads.deferToThread(self.probe, "/readyz", 2.0)
                if status == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    log.info("kube-apiserver ready after {s:.1f}s", s=self.ready_after)
                    return
                await task.deferLater(reactor, 0.2, lambda: None)
            else:
                raise APIServerError(
                    f"kube-apiserver not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}"
                )
            self._reap()
            if "address already in use" in self.log_tail() and attempt < 2 and port is None:
                log.warn("port {port} was taken; retrying", port=self.port)
                continue
            raise APIServerError(
                f"kube-apiserver exited with {code} while starting; log tail:\n{self.log_tail()}"
            )
        raise APIServerError("unreachable")

    async def _start_controller_manager(self, reactor: IReactorTime, timeout: float) -> None:
        """Launch kube-controller-manager and wait for its C{/healthz}."""
        for attempt in range(3):
            started = time.monotonic()
            self.launch_controller_manager()
            proc = self.cm_process
            assert proc is not None
            deadline = started + timeout
            while time.monotonic() < deadline:
                code = proc.poll()
                if code is not None:
                    break
                status, _ = await threads.deferToThread(self.probe_controller_manager, "/healthz", 2.0)
                if status == 200:
                    self.cm_ready_after = time.monotonic() - started
                    log.info("kube-controller-manager healthy after {s:.1f}s", s=self.cm_ready_after)
                    return
                await task.deferLater(reactor, 0.2, lambda: None)
            else:
                raise APIServerError(
                    f"kube-controller-manager not healthy after {timeout:.0f}s; log tail:\n"
                    f"{self.cm_log_tail()}"
                )
            self.cm_process = None
            self._close_cm_log()
            if "address already in use" in self.cm_log_tail() and attempt < 2:
                log.warn("port {port} was taken; retrying", port=self.cm_port)
                continue
            raise APIServerError(
                f"kube-controller-manager exited with {code} while starting; log tail:\n"
                f"{self.cm_log_tail()}"
            )
        raise APIServerError("unreachable")

    def start(self, reactor: IReactorTime | None = None, timeout: float = 90.0) -> defer.Deferred[
        KubeAPIServer
    ]:
        """Start and wait for C{/readyz} (and the controller manager's C{/healthz} if it runs
        one); on any failure everything is torn down first."""
        return self._run_start(lambda r: self._start(r, timeout), reactor)

    def _run_start(
        self,
        start: Callable[[IReactorTime], Coroutine[Any, Any, KubeAPIServer]],
        reactor: IReactorTime | None,
    ) -> defer.Deferred[KubeAPIServer]:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        assert reactor is not None

        d = defer.Deferred.fromCoroutine(start(reactor))

        def cleanup(f: Any) -> Any:
            self.stop()
            return f

        d.addErrback(cleanup)
        return d

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _close_cm_log(self) -> None:
        if self._cm_log_file is not None:
            self._cm_log_file.close()
            self._cm_log_file = None

    def kill(self) -> None:
        """
        Kill kube-controller-manager and kube-apiserver (with its in-process etcd) with SIGKILL,
        like a crash, keeping the temp dir (data, certificates) and the port for L{restart}.
        (A SIGTERM would keep open watches alive for the server's 60 s ShutdownTimeout while
        refusing new connections.) Blocking for a moment: call it from a thread.
        """
        for attr in ("cm_process", "process"):
            proc = getattr(self, attr)
            setattr(self, attr, None)
            if proc is not None:
                _kill_group(proc, signal.SIGKILL)
                proc.wait(30)
        self._close_cm_log()
        self._reap()

    def restart(self, reactor: IReactorTime | None = None, timeout: float = 90.0) -> defer.Deferred[
        KubeAPIServer
    ]:
        """
        Kill the server like a crash (if it still runs; see L{kill}) and start it again with the
        same data, certificates and port, so existing clients and kubeconfigs keep working; the
        controller manager comes back too if this server runs one. On failure everything is torn
        down, as with L{start}.
        """
        if self.workdir is None or not self.port:
            return defer.fail(APIServerError("restart() needs a server that was started"))
        port = self.port

        async def again(reactor: IReactorTime) -> KubeAPIServer:
            await threads.deferToThread(self.kill)
            return await self._start(reactor, timeout, port)

        return self._run_start(again, reactor)

    def rss_bytes(self) -> int:
        """Resident memory of the apiserver process now (0 if not running)."""
        return _rss(self.process)

    def controller_manager_rss_bytes(self) -> int:
        """Resident memory of the controller manager process now (0 if not running)."""
        return _rss(self.cm_process)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the controller manager and then the server (process groups), SIGKILL after
        C{grace}, then remove the temp dir."""
        for attr in ("cm_process", "process"):
            proc = getattr(self, attr)
            setattr(self, attr, None)
            if proc is not None:
                _terminate(proc, grace)
        self._close_cm_log()
        self._reap()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # --- clients ------------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A C{kubernetes.client.ApiClient} authenticated as the admin (system:masters)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl_command(self) -> list[str]:
        """kubectl matching the server's minor when the SDK's versioned binaries are there."""
        base = shutil.which("kubectl")
        if base is None:
            raise APIServerError("kubectl is not on PATH")
        minor = expected_version().split(".")[1]
        versioned = Path(os.path.realpath(base)).with_name(f"kubectl.1.{minor}")
        exe = str(versioned) if versioned.is_file() else base
        return [exe, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self._path('kubectl-cache')}"]

    def kubectl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this server (blocking; call from a thread)."""
        return subprocess.run(
            [*self.kubectl_command(), *args], capture_output=True, text=True, timeout=timeout
        )

    def apply_crds(self, paths: Iterable[Path | str], timeout: float = 60.0) -> list[str]:
        """
        Create (or replace) every CRD in the YAML files and wait until each is Established and
        served by discovery. Blocking: call it through C{deferToThread}. Returns the CRD names.
        """
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api_client = self.api_client()
        ext: Any = client.ApiextensionsV1Api(api_client)  # dicts in, models out
        crds: list[dict[str, Any]] = []
        for p in paths:
            with open(p) as f:
                for doc in yaml.safe_load_all(f):
                    if not doc:
                        continue
                    if doc.get("kind") != "CustomResourceDefinition":
                        raise APIServerError(f"{p}: not a CustomResourceDefinition: {doc.get('kind')}")
                    crds.append(doc)
        for crd in crds:
            name = crd["metadata"]["name"]
            try:
                ext.create_custom_resource_definition(crd)
            except ApiException as e:
                if e.status != 409:
                    raise APIServerError(f"creating CRD {name}: {e.status} {e.body}") from e
                current = ext.read_custom_resource_definition(name)
                body = dict(crd)
                body["metadata"] = {**crd["metadata"],
                                    "resourceVersion": current.metadata.resource_version}
                ext.replace_custom_resource_definition(name, body)
        deadline = time.monotonic() + timeout
        for crd in crds:
            self._wait_established(ext, crd, deadline)
        api_client.close()
        return [c["metadata"]["name"] for c in crds]

    def _wait_established(self, ext: Any, crd: dict[str, Any], deadline: float) -> None:
        """Poll until the CRD is Established and discovery lists its plural in every version."""
        name = crd["metadata"]["name"]
        group = crd["spec"]["group"]
        plural = crd["spec"]["names"]["plural"]
        versions = [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]
        conds: dict[str, str] = {}
        while time.monotonic() < deadline:
            obj = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (obj.status.conditions or [])} if obj.status else {}
            if conds.get("Established") == "True" and all(
                self._serves(group, v, plural) for v in versions
            ):
                return
            time.sleep(0.1)
        raise APIServerError(f"CRD {name} not Established and served in time: {conds}")

    def _serves(self, group: str, version: str, plural: str) -> bool:
        status, body = self.probe(f"/apis/{group}/{version}", 5.0)
        if status != 200:
            return False
        return any(r.get("name") == plural for r in json.loads(body).get("resources", []))


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _rss(proc: subprocess.Popen[bytes] | None) -> int:
    if proc is None or proc.poll() is not None:
        return 0
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, SIGKILL after C{grace}, and reap."""
    _kill_group(proc, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait(5)
    # Stragglers in the group (none expected: etcd is in-process).
    _kill_group(proc, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the test process dies without running its cleanup."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def crd_manifests() -> list[Path]:
    """The project's CRD manifests (C{deploy/crds/*.yaml}), possibly none yet."""
    return sorted(CRD_DIR.glob("*.yaml")) if CRD_DIR.is_dir() else []


# --- one shared server per test process ---------------------------------------------------------

_shared: KubeAPIServer | None = None
_shared_failure: Exception | None = None
_shared_waiters: list[defer.Deferred[KubeAPIServer]] | None = None


def sharedAPIServer() -> defer.Deferred[KubeAPIServer]:
    """
    The process-wide server, started on first use (return this from C{setUp}), with
    kube-controller-manager's garbage collector and namespace controller beside it. Skips when no
    binary exists; a failed start is remembered so later tests fail fast with the same reason.
    Stopped at interpreter exit. Do not L{KubeAPIServer.restart} or stop it: other tests share it.
    """
    global _shared, _shared_waiters
    binary = require_binary()
    if _shared_failure is not None:
        return defer.fail(APIServerError(f"shared kube-apiserver failed to start: {_shared_failure}"))
    if _shared is not None and _shared_waiters is None:
        return defer.succeed(_shared)
    waiter: defer.Deferred[KubeAPIServer] = defer.Deferred()
    if _shared_waiters is not None:
        _shared_waiters.append(waiter)
        return waiter
    server = KubeAPIServer(binary, controller_manager=True)
    _shared = server
    _shared_waiters = [waiter]
    atexit.register(server.stop)

    def done(result: Any) -> None:
        global _shared_waiters, _shared_failure
        waiters, _shared_waiters = _shared_waiters or [], None
        if isinstance(result, KubeAPIServer):
            for w in waiters:
                w.callback(result)
            return
        _shared_failure = result.value
        for w in waiters:
            w.errback(result)

    server.start().addBoth(done)
    return waiter
