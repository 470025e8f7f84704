"""
Tests for the real-kube-apiserver fixture (L{tests.k8s.apiserver}).

The first classes check the pure parts (certificates, kubeconfig, command line, binary lookup)
and always run. L{SharedAPIServerTests} runs against the real server and skips loudly without
the binary (see L{tests.k8s.apiserver.require_binary}).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import textwrap
import uuid
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.k8s import apiserver
from tests.k8s.apiserver import (
    ENV_BIN,
    APIServerError,
    KubeAPIServer,
    TinyCA,
    crd_manifests,
    expected_version,
    find_binary,
    sharedAPIServer,
    write_kubeconfig,
)


class CertificateTests(SynchronousTestCase):
    """The throwaway PKI the fixture hands kube-apiserver."""

    def test_admin_client_cert_is_system_masters(self) -> None:
        """The admin certificate is a client certificate in group system:masters, signed by the CA."""
        ca = TinyCA("client-ca")
        pair = ca.issue("admin", ["system:masters"], client=True)
        cert = x509.load_pem_x509_certificate(pair.cert)
        orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        self.assertEqual(orgs, ["system:masters"])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        cert.verify_directly_issued_by(ca.cert)

    def test_serving_cert_names_loopback(self) -> None:
        """The serving certificate covers localhost, 127.0.0.1 and ::1 for server auth."""
        ca = TinyCA("serving-ca")
        pair = ca.issue("localhost", server_names=["localhost"], server_ips=["127.0.0.1", "::1"])
        cert = x509.load_pem_x509_certificate(pair.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
                         ["127.0.0.1", "::1"])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_kubeconfig_is_self_contained(self) -> None:
        """The kubeconfig carries the server URL, CA and client pair inline, with one context."""
        ca = TinyCA("ca")
        client = ca.issue("admin", ["system:masters"], client=True)
        path = Path(self.mktemp())
        write_kubeconfig(path, "https://127.0.0.1:6443", ca.cert_pem, client)
        cfg = yaml.safe_load(path.read_text())
        self.assertEqual(cfg["current-context"], "sidero-test")
        self.assertEqual(cfg["clusters"][0]["cluster"]["server"], "https://127.0.0.1:6443")
        self.assertEqual(
            base64.b64decode(cfg["clusters"][0]["cluster"]["certificate-authority-data"]),
            ca.cert_pem,
        )
        self.assertEqual(base64.b64decode(cfg["users"][0]["user"]["client-key-data"]), client.key)
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)


class CommandLineTests(SynchronousTestCase):
    """The flags the fixture passes, and how it finds the binary."""

    def test_args_are_loopback_only(self) -> None:
        """Every address in the command line is loopback, and etcd is embedded with a data dir."""
        server = KubeAPIServer(Path("/nonexistent/kube-apiserver"))
        server._prepare()
        self.addCleanup(server.stop)
        server.port = 12345
        args = server.args()
        self.assertIn("--bind-address=127.0.0.1", args)
        self.assertIn("--advertise-address=127.0.0.1", args)
        self.assertIn("--endpoint-reconciler-type=none", args)
        self.assertIn("--authorization-mode=RBAC", args)
        self.assertIn("--secure-port=12345", args)
        self.assertIn("--service-account-issuer=https://127.0.0.1:12345/", args)
        self.assertTrue(any(a.startswith("--embedded-etcd-data-dir=") for a in args))
        self.assertFalse(any(a.startswith("--etcd-servers") for a in args))
        for flag in ("--client-ca-file", "--service-account-key-file",
                     "--service-account-signing-key-file"):
            value = next(a for a in args if a.startswith(flag + "=")).split("=", 1)[1]
            self.assertTrue(Path(value).is_file(), value)
        self.assertTrue((server._path("certs") / "apiserver.crt").is_file())

    def test_stop_removes_workdir(self) -> None:
        """stop() removes the temp dir even when no process was ever started."""
        server = KubeAPIServer(Path("/nonexistent/kube-apiserver"))
        server._prepare()
        workdir = server.workdir
        assert workdir is not None
        server.stop()
        self.assertFalse(workdir.exists())
        self.assertIsNone(server.workdir)

    def test_env_var_wins_and_is_checked(self) -> None:
        """$KUBEAPISERVER_BIN is used when executable and named in the reason when it is not."""
        self.patch(os, "environ", {**os.environ, ENV_BIN: "/nonexistent/kube-apiserver"})
        path, reason = find_binary()
        self.assertIsNone(path)
        self.assertIn("/nonexistent/kube-apiserver", reason)
        exe = Path(self.mktemp())
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        self.patch(os, "environ", {**os.environ, ENV_BIN: str(exe)})
        self.assertEqual(find_binary(), (exe, ""))

    def test_build_script_path_is_keyed_by_version(self) -> None:
        """The build script's cache path names the pinned Kubernetes version and a source hash."""
        path = apiserver.cached_binary_path()
        assert path is not None
        self.assertEqual(path.name, "kube-apiserver")
        self.assertRegex(path.parent.name, rf"^kube-apiserver-{expected_version()}-[0-9a-f]{{16}}$")

    def test_expected_version_is_133(self) -> None:
        """The wrapper pins a Kubernetes 1.33 patch release (CAPI v1.10's newest supported)."""
        self.assertRegex(expected_version(), r"^v1\.33\.\d+$")


def _in_thread(f: Any, *args: Any) -> Any:
    return threads.deferToThread(f, *args)


class SharedAPIServerTests(TestCase):
    """Behaviour of a real kube-apiserver started by the shared fixture."""

    timeout = 180

    def setUp(self) -> Any:
        d = sharedAPIServer()

        def got(server: KubeAPIServer) -> None:
            self.server = server

        return d.addCallback(got)

    async def test_version(self) -> None:
        """/version reports the pinned gitVersion, so the ldflags and the module agree."""
        info = await _in_thread(self.server.get_json, "/version")
        self.assertEqual(info["gitVersion"], expected_version())
        self.assertEqual(info["major"], "1")
        self.assertEqual(info["minor"], expected_version().split(".")[1])

    async def test_kubectl_get_namespaces(self) -> None:
        """kubectl with the written kubeconfig lists the built-in namespaces."""
        result = await _in_thread(self.server.kubectl, "get", "namespaces", "-o", "name")
        self.assertEqual(result.returncode, 0, result.stderr)
        names = set(result.stdout.split())
        self.assertTrue({"namespace/default", "namespace/kube-system"} <= names, names)

    async def test_kubectl_version_skew(self) -> None:
        """The kubectl picked is within one minor of the server, so no skew warning applies."""
        result = await _in_thread(self.server.kubectl, "version", "-o", "json")
        self.assertEqual(result.returncode, 0, result.stderr)
        info = json.loads(result.stdout)
        self.assertEqual(info["serverVersion"]["gitVersion"], expected_version())
        client_minor = int(info["clientVersion"]["minor"].rstrip("+"))
        self.assertLessEqual(abs(client_minor - int(info["serverVersion"]["minor"])), 1)

    async def test_configmap_roundtrip_and_conflict(self) -> None:
        """The Python client creates and reads a ConfigMap, and a stale update gets a real 409."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        def work() -> tuple[Any, Any, int]:
            api_client = self.server.api_client()
            try:
                core: Any = client.CoreV1Api(api_client)
                ns = f"t-{uuid.uuid4().hex[:8]}"
                core.create_namespace({"metadata": {"name": ns}})
                created = core.create_namespaced_config_map(
                    ns, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
                read = core.read_namespaced_config_map("cm", ns)
                core.patch_namespaced_config_map("cm", ns, {"data": {"k": "v2"}})
                stale = {"metadata": {"name": "cm",
                                      "resourceVersion": created.metadata.resource_version},
                         "data": {"k": "v3"}}
                try:
                    core.replace_namespaced_config_map("cm", ns, stale)
                    status = 200
                except ApiException as e:
                    status = e.status
                return created, read, status
            finally:
                api_client.close()

        created, read, status = await _in_thread(work)
        self.assertEqual(read.data, {"k": "v"})
        self.assertEqual(read.metadata.uid, created.metadata.uid)
        self.assertEqual(status, 409)

    async def test_apply_crds_waits_until_served(self) -> None:
        """apply_crds returns only once a new CRD is Established and its kind can be listed."""
        path = Path(self.mktemp())
        path.write_text(textwrap.dedent("""\
            apiVersion: apiextensions.k8s.io/v1
            kind: CustomResourceDefinition
            metadata:
              name: widgets.fixture.sidero.dev
            spec:
              group: fixture.sidero.dev
              scope: Cluster
              names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
              versions:
                - name: v1
                  served: true
                  storage: true
                  schema:
                    openAPIV3Schema:
                      type: object
                      properties:
                        spec: {type: object, properties: {size: {type: integer}}}
            """))
        names = await _in_thread(self.server.apply_crds, [path])
        self.assertEqual(names, ["widgets.fixture.sidero.dev"])
        # Applying again (another module sharing the server) replaces rather than failing.
        self.assertEqual(await _in_thread(self.server.apply_crds, [path]), names)
        result = await _in_thread(self.server.kubectl, "get", "widgets", "-o", "name")
        self.assertEqual(result.returncode, 0, result.stderr)

        bad = Path(self.mktemp())
        bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
        with self.assertRaises(APIServerError):
            self.server.apply_crds([bad])

    async def test_project_crds(self) -> None:
        """The project's deploy/crds manifests become Established and `kubectl get servers` works."""
        paths = crd_manifests()
        if not paths:
            self.skipTest("LOUD SKIP: deploy/crds/*.yaml missing; run python -m sidero.api.crdgen")
        names = await _in_thread(self.server.apply_crds, paths)
        self.assertIn("servers.metal.sidero.dev", names)
        result = await _in_thread(self.server.kubectl, "get", "servers")
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_memory_and_startup_are_reported(self) -> None:
        """The running server reports a plausible RSS and the time it took to become ready."""
        rss = self.server.rss_bytes()
        self.assertGreater(rss, 50 * 2**20)
        assert self.server.ready_after is not None
        self.assertGreater(self.server.ready_after, 0)
        print(f"\nkube-apiserver RSS {rss / 2**20:.0f} MiB, ready after "
              f"{self.server.ready_after:.1f}s")


class OwnServerTests(TestCase):
    """Start-up failure and teardown of a server owned by one test."""

    timeout = 180

    async def test_failed_start_cleans_up(self) -> None:
        """A server that exits while starting fails with its log tail and leaves nothing behind."""
        server = KubeAPIServer(apiserver.require_binary(), extra_args=["--no-such-flag"])
        with self.assertRaises(APIServerError) as ctx:
            await server.start()
        self.assertIn("unknown flag: --no-such-flag", str(ctx.exception))
        self.assertIsNone(server.workdir)
        self.assertIsNone(server.process)

    async def test_stop_kills_group_and_removes_files(self) -> None:
        """stop() ends the process (and its etcd) and removes certificates and data."""
        server = KubeAPIServer(apiserver.require_binary())
        self.addCleanup(server.stop)
        await server.start()
        proc = server.process
        workdir = server.workdir
        assert proc is not None and workdir is not None
        self.assertTrue((workdir / "etcd" / "member").is_dir())
        await threads.deferToThread(server.stop)
        self.assertIsNotNone(proc.poll())
        self.assertFalse(workdir.exists())
        pgrep = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True)
        self.assertNotEqual(pgrep.returncode, 0, pgrep.stdout)
