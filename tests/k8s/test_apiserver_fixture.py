"""
Tests for the real-kube-apiserver fixture (L{tests.k8s.apiserver}).

The first classes check the pure parts (certificates, kubeconfig, command line, binary lookup)
and always run. L{SharedAPIServerTests} runs against the real server and skips loudly without
the binary (see L{tests.k8s.apiserver.require_binary}).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import subprocess
import textwrap
import uuid
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.k8s import apiserver
from tests.k8s.apiserver import (
    CONTROLLER_MANAGER_COMMAND,
    CONTROLLERS,
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

    def test_controller_manager_args_are_loopback_only(self) -> None:
        """kube-controller-manager runs from the same binary with the admin kubeconfig, no leader
        election, only the needed controllers, and serves only on loopback with the fixture's CA."""
        server = KubeAPIServer(Path("/nonexistent/kube-apiserver"), controller_manager=True,
                               controller_manager_extra_args=["--v=2"])
        server._prepare()
        self.addCleanup(server.stop)
        server.port = 12345
        server.cm_port = 23456
        args = server.controller_manager_args()
        self.assertEqual(args[:2], ["/nonexistent/kube-apiserver", CONTROLLER_MANAGER_COMMAND])
        self.assertEqual(CONTROLLERS, ("garbage-collector-controller", "namespace-controller"))
        self.assertIn("--controllers=garbage-collector-controller,namespace-controller", args)
        self.assertIn("--leader-elect=false", args)
        self.assertIn("--bind-address=127.0.0.1", args)
        self.assertIn("--secure-port=23456", args)
        self.assertEqual(args[-1], "--v=2")
        for flag in ("--kubeconfig", "--authentication-kubeconfig", "--authorization-kubeconfig"):
            self.assertIn(f"{flag}={server.kubeconfig}", args)
        for flag in ("--tls-cert-file", "--tls-private-key-file"):
            value = next(a for a in args if a.startswith(flag + "=")).split("=", 1)[1]
            self.assertTrue(Path(value).is_file(), value)
        # Its serving certificate chains to the CA the probes trust and names 127.0.0.1.
        chain = server._path("certs", "controller-manager.crt").read_bytes()
        leaf = x509.load_pem_x509_certificate(chain)
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(server.ca_file.read_bytes()))
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual([str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1"])
        self.assertEqual(server.cm_url, "https://127.0.0.1:23456")

    def test_no_address_but_loopback_in_any_command_line(self) -> None:
        """Every IP address in either command line is loopback (the service CIDR is only a flag)."""
        server = KubeAPIServer(Path("/nonexistent/kube-apiserver"), controller_manager=True)
        server._prepare()
        self.addCleanup(server.stop)
        server.port, server.cm_port = 12345, 23456
        found = []
        for arg in server.args() + server.controller_manager_args():
            if arg.startswith("--service-cluster-ip-range="):
                continue
            for text in re.findall(r"\d+\.\d+\.\d+\.\d+", arg):
                found.append(text)
                self.assertTrue(ipaddress.ip_address(text).is_loopback, arg)
        self.assertIn("127.0.0.1", found)

    def test_restart_needs_a_started_server(self) -> None:
        """restart() of a server that never started fails at once and changes nothing."""
        server = KubeAPIServer(Path("/nonexistent/kube-apiserver"))
        failure = self.failureResultOf(server.restart())
        failure.trap(APIServerError)
        self.assertIn("needs a server that was started", str(failure.value))
        self.assertIsNone(server.workdir)
        self.assertIsNone(server.process)

    def test_kill_keeps_files(self) -> None:
        """kill() (the crash half of a restart) leaves the certificates and data in place."""
        server = KubeAPIServer(Path("/nonexistent/kube-apiserver"))
        server._prepare()
        self.addCleanup(server.stop)
        server.kill()
        assert server.workdir is not None
        self.assertTrue((server.workdir / "certs" / "apiserver.crt").is_file())
        self.assertIsNone(server.process)
        self.assertIsNone(server.cm_process)

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


class ControllerManagerTests(TestCase):
    """kube-controller-manager beside the shared server: healthy, and really collecting garbage."""

    timeout = 180

    async def setUp(self) -> None:  # type: ignore[override]
        self.server = await sharedAPIServer()

    async def test_healthy(self) -> None:
        """The controller manager answers /healthz with ok over TLS signed by the fixture's CA."""
        self.assertTrue(self.server.controller_manager)
        proc = self.server.cm_process
        assert proc is not None
        self.assertIsNone(proc.poll())
        status, body = await _in_thread(self.server.probe_controller_manager, "/healthz")
        self.assertEqual((status, body), (200, b"ok"))
        rss = self.server.controller_manager_rss_bytes()
        self.assertGreater(rss, 20 * 2**20)
        assert self.server.cm_ready_after is not None
        print(f"\nkube-controller-manager RSS {rss / 2**20:.0f} MiB, healthy after "
              f"{self.server.cm_ready_after:.1f}s; kube-apiserver RSS "
              f"{self.server.rss_bytes() / 2**20:.0f} MiB")

    async def test_gc_deletes_dependent_configmap(self) -> None:
        """Deleting a ConfigMap makes the garbage collector delete the ConfigMap it owns."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        run = uuid.uuid4().hex[:8]
        api_client = self.server.api_client()
        self.addCleanup(api_client.close)
        core: Any = client.CoreV1Api(api_client)

        def create() -> None:
            owner = core.create_namespaced_config_map("default", {"metadata": {"name": f"owner-{run}"}})
            core.create_namespaced_config_map("default", {"metadata": {
                "name": f"dep-{run}",
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap",
                                     "name": owner.metadata.name, "uid": owner.metadata.uid}]}})
            bystander = {"metadata": {"name": f"other-{run}"}}
            core.create_namespaced_config_map("default", bystander)
            core.delete_namespaced_config_map(owner.metadata.name, "default")

        def exists(name: str) -> bool:
            try:
                core.read_namespaced_config_map(name, "default")
                return True
            except ApiException as e:
                if e.status == 404:
                    return False
                raise

        await _in_thread(create)
        self.addCleanup(_in_thread, core.delete_namespaced_config_map, f"other-{run}", "default")
        for _ in range(600):
            if not await _in_thread(exists, f"dep-{run}"):
                break
            await deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the dependent ConfigMap was not collected within 60 s; controller-manager "
                      f"log:\n{self.server.cm_log_tail()}")
        self.assertTrue(await _in_thread(exists, f"other-{run}"))

    async def test_namespace_deletion_finishes(self) -> None:
        """A deleted namespace with content goes away (the namespace controller empties it)."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        ns = f"gone-{uuid.uuid4().hex[:8]}"
        api_client = self.server.api_client()
        self.addCleanup(api_client.close)
        core: Any = client.CoreV1Api(api_client)

        def create_and_delete() -> None:
            core.create_namespace({"metadata": {"name": ns}})
            core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}})
            core.delete_namespace(ns)

        def phase() -> str | None:
            try:
                return str(core.read_namespace(ns).status.phase)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise

        await _in_thread(create_and_delete)
        for _ in range(600):
            if await _in_thread(phase) is None:
                break
            await deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail(f"namespace {ns} still exists after 60 s: {await _in_thread(phase)}")


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

    async def test_restart_keeps_data_port_and_controller_manager(self) -> None:
        """restart() kills both processes like a crash and brings them back on the same API port
        with the same data; the old kubeconfig still works."""
        server = KubeAPIServer(apiserver.require_binary(), controller_manager=True)
        self.addCleanup(server.stop)
        await server.start()
        port, workdir = server.port, server.workdir
        old_api, old_cm = server.process, server.cm_process
        assert old_api is not None and old_cm is not None
        kubeconfig_before = server.kubeconfig.read_text()
        made = await _in_thread(server.kubectl, "create", "configmap", "survivor", "--from-literal=k=v")
        self.assertEqual(made.returncode, 0, made.stderr)

        await server.restart()
        self.assertEqual((server.port, server.workdir), (port, workdir))
        self.assertEqual(server.kubeconfig.read_text(), kubeconfig_before)
        self.assertIsNotNone(old_api.poll())
        self.assertIsNotNone(old_cm.poll())
        assert server.process is not None and server.cm_process is not None
        self.assertNotEqual(server.process.pid, old_api.pid)
        self.assertNotEqual(server.cm_process.pid, old_cm.pid)
        got = await _in_thread(server.kubectl, "get", "configmap", "survivor",
                               "-o", "jsonpath={.data.k}")
        self.assertEqual((got.returncode, got.stdout), (0, "v"), got.stderr)
        status, _ = await _in_thread(server.probe_controller_manager, "/healthz")
        self.assertEqual(status, 200)
