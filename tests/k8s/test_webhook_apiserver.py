"""
The webhook server through a real kube-apiserver (its own instance, so the shared server's CRDs
keep their conversion settings): the CRDs are patched to call our C{/convert} over TLS with the
generated CA as caBundle, a ValidatingWebhookConfiguration is registered, and C{kubectl} (a real
client) writes one version and reads the other.

Skips loudly without the kube-apiserver binary (see L{tests.k8s.apiserver.require_binary}).
"""

from __future__ import annotations

import atexit
import json
import uuid
from typing import Any

import yaml
from twisted.internet import defer, task, threads
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from sidero.api.conversion import CONVERSION_DATA_ANNOTATION
from sidero.k8s.webhook.registration import (
    CONVERSION_KINDS,
    WebhookEndpoint,
    crd_name,
    install_webhooks,
)
from sidero.k8s.webhook.service import WebhookService, make_webhook_service
from tests.k8s.apiserver import KubeAPIServer, crd_manifests, require_binary

_server: KubeAPIServer | None = None
_starting: defer.Deferred[KubeAPIServer] | None = None


async def _start_own_server() -> KubeAPIServer:
    binary = require_binary()
    server = KubeAPIServer(binary)
    atexit.register(server.stop)
    await server.start()
    await threads.deferToThread(server.apply_crds, crd_manifests())
    return server


async def own_server() -> KubeAPIServer:
    """This module's kube-apiserver with sidero's CRDs, started once (stopped at exit)."""
    global _server, _starting
    if _server is not None:
        return _server
    if _starting is None:
        _starting = defer.Deferred.fromCoroutine(_start_own_server())
    waiter: defer.Deferred[KubeAPIServer] = defer.Deferred()

    def forward(result: Any) -> Any:
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)
        return result

    _starting.addBoth(forward)
    server = await waiter
    _server = server
    return server


def kubectl(server: KubeAPIServer, *args: str, stdin: str | None = None) -> defer.Deferred[Any]:
    """Run kubectl in a thread; the CompletedProcess."""
    import subprocess

    def run() -> Any:
        return subprocess.run([*server.kubectl_command(), *args], input=stdin, capture_output=True,
                              text=True, timeout=60)
    return threads.deferToThread(run)


class WebhookThroughAPIServerTests(TestCase):
    """kubectl -> kube-apiserver -> our webhook over TLS -> kube-apiserver -> kubectl."""

    timeout = 240

    async def _setUp(self) -> None:
        from twisted.internet import reactor

        self.server = await own_server()
        self.ns = "wh-" + uuid.uuid4().hex[:8]
        result = await kubectl(self.server, "create", "namespace", self.ns)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.service: WebhookService = make_webhook_service(
            reactor, port=0, interface="127.0.0.1", cert_dir=self.mktemp(), hosts=["127.0.0.1", "localhost"])
        await self.service.startService()
        self.addCleanup(self._stop_service)
        assert self.service.port is not None and self.service.ca_bundle is not None
        port = self.service.bound_port
        self.endpoint = WebhookEndpoint(url=f"https://127.0.0.1:{port}")
        api_client = self.server.api_client()
        try:
            self.patched = await threads.deferToThread(
                install_webhooks, api_client, self.endpoint, self.service.ca_bundle)
        finally:
            api_client.close()
        await self._wait_validation_active()

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._setUp())

    def _stop_service(self) -> Any:
        if self.service.running:
            return self.service.stopService()
        return None

    async def _wait_validation_active(self) -> None:
        """The API server picks up a new webhook configuration asynchronously: wait until an
        invalid Server is refused by it (server-side dry run, nothing is stored)."""
        probe = self._server_v1alpha2("probe-" + uuid.uuid4().hex[:6], op="bogus")
        from twisted.internet import reactor
        for _ in range(100):
            result = await kubectl(self.server, "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(probe))
            if result.returncode != 0 and 'Invalid value: "bogus"' in result.stderr:
                return
            await task.deferLater(reactor, 0.1, lambda: None)
        self.fail(f"validating webhook never became active: {result.stderr}")

    # --- helpers -----------------------------------------------------------------------------

    async def apply(self, obj: dict[str, Any]) -> Any:
        return await kubectl(self.server, "apply", "-f", "-", stdin=yaml.safe_dump(obj))

    async def get(self, resource: str, name: str, namespaced: bool = False) -> dict[str, Any]:
        args = ["get", f"{resource}/{name}", "-o", "json"]
        if namespaced:
            args += ["-n", self.ns]
        result = await kubectl(self.server, *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    async def raw_status(self, call: str, *args: Any) -> dict[str, Any]:
        """The Status body of a CustomObjectsApi call that must fail."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api_client = self.server.api_client()
        try:
            method = getattr(client.CustomObjectsApi(api_client), call)
            with self.assertRaises(ApiException) as caught:
                await threads.deferToThread(method, *args)
        finally:
            api_client.close()
        status: dict[str, Any] = json.loads(caught.exception.body)
        return status

    @staticmethod
    def _server_v1alpha2(name: str, op: str = "add") -> dict[str, Any]:
        return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": name},
                "spec": {"accepted": False, "configPatches": [{"op": op, "path": "/machine/install/disk",
                                                               "value": "/dev/sda"}]}}

    # --- conversion --------------------------------------------------------------------------

    async def test_crds_patched(self) -> None:
        """Every CRD serving two versions is switched to our /convert with the generated CA."""
        self.assertEqual(sorted(self.patched), sorted(crd_name(k) for k in CONVERSION_KINDS))
        self.assertNotIn("serverbindings.infrastructure.cluster.x-k8s.io", self.patched)
        crd = await self.get("crd", "servers.metal.sidero.dev")
        webhook = crd["spec"]["conversion"]["webhook"]
        self.assertEqual(crd["spec"]["conversion"]["strategy"], "Webhook")
        self.assertEqual(webhook["clientConfig"]["url"], self.endpoint.url + "/convert")
        self.assertNotIn("service", webhook["clientConfig"])
        self.assertEqual(webhook["conversionReviewVersions"], ["v1", "v1beta1"])

    async def test_server_v1alpha1_read_as_v1alpha2_and_back(self) -> None:
        """A v1alpha1 Server's system and cpu come back as v1alpha2 hardware, and v1alpha1 again intact."""
        name = str(uuid.uuid4())
        obj = {"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Server", "metadata": {"name": name},
               "spec": {"accepted": True, "hostname": "node-1", "bootFromDiskMethod": "ipxe-exit",
                        "system": {"manufacturer": "QEMU", "productName": "Standard PC", "version": "pc-q35",
                                   "serialNumber": "S123", "skuNumber": "SKU", "family": "F"},
                        "cpu": {"manufacturer": "Intel", "version": "Xeon 8280"},
                        "configPatches": [{"op": "replace", "path": "/cluster/network", "value": {"cni": "none"}}]}}
        result = await self.apply(obj)
        self.assertEqual(result.returncode, 0, result.stderr)
        hub = await self.get("servers.v1alpha2.metal.sidero.dev", name)
        self.assertEqual(hub["apiVersion"], "metal.sidero.dev/v1alpha2")
        self.assertEqual(hub["spec"]["hardware"]["system"], obj["spec"]["system"])  # type: ignore[index]
        self.assertEqual(hub["spec"]["hardware"]["compute"]["processors"],
                         [{"manufacturer": "Intel", "productName": "Xeon 8280"}])
        self.assertNotIn("system", hub["spec"])
        self.assertNotIn("cpu", hub["spec"])
        self.assertEqual(hub["spec"]["hostname"], "node-1")
        self.assertEqual(hub["spec"]["bootFromDiskMethod"], "ipxe-exit")
        self.assertEqual(hub["spec"]["configPatches"][0]["value"], {"cni": "none"})
        self.assertNotIn(CONVERSION_DATA_ANNOTATION, hub["metadata"].get("annotations", {}))
        old = await self.get("servers.v1alpha1.metal.sidero.dev", name)
        self.assertEqual(old["apiVersion"], "metal.sidero.dev/v1alpha1")
        self.assertEqual(old["spec"]["system"], obj["spec"]["system"])  # type: ignore[index]
        self.assertEqual(old["spec"]["cpu"], obj["spec"]["cpu"])  # type: ignore[index]
        self.assertNotIn("hardware", old["spec"])
        self.assertEqual(old["metadata"]["uid"], hub["metadata"]["uid"])

    async def test_server_v1alpha2_read_as_v1alpha1(self) -> None:
        """A v1alpha2 Server reads as v1alpha1 with the uuid dropped, processors[0] as cpu, and the hub kept in the annotation."""
        name = str(uuid.uuid4())
        hardware = {"system": {"uuid": name, "manufacturer": "Dell", "family": "R640"},
                    "compute": {"processorCount": 2, "processors": [
                        {"manufacturer": "AMD", "productName": "EPYC", "coreCount": 32},
                        {"manufacturer": "AMD", "productName": "EPYC 2"}]}}
        obj = {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": name},
               "spec": {"accepted": False, "hardware": hardware, "strategicPatches": ["machine: {}"]}}
        result = await self.apply(obj)
        self.assertEqual(result.returncode, 0, result.stderr)
        old = await self.get("servers.v1alpha1.metal.sidero.dev", name)
        self.assertEqual(old["spec"]["system"], {"manufacturer": "Dell", "family": "R640"})
        self.assertEqual(old["spec"]["cpu"], {"manufacturer": "AMD", "version": "EPYC"})
        self.assertNotIn("strategicPatches", old["spec"])
        kept = json.loads(old["metadata"]["annotations"][CONVERSION_DATA_ANNOTATION])
        self.assertEqual(kept["spec"]["hardware"], hardware)
        self.assertEqual(kept["spec"]["strategicPatches"], ["machine: {}"])

    async def test_serverclass_v1alpha1_qualifiers_become_hardware(self) -> None:
        """ServerClass systemInformation and cpu qualifiers become separate hardware entries (OR semantics)."""
        name = "sc-" + uuid.uuid4().hex[:8]
        obj = {"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "ServerClass", "metadata": {"name": name},
               "spec": {"qualifiers": {"systemInformation": [{"manufacturer": "Dell"}],
                                       "cpu": [{"manufacturer": "Intel", "version": "Xeon"}],
                                       "labelSelectors": [{"rack": "a"}]},
                        "bootFromDiskMethod": "http-404"}}
        result = await self.apply(obj)
        self.assertEqual(result.returncode, 0, result.stderr)
        hub = await self.get("serverclasses.v1alpha2.metal.sidero.dev", name)
        self.assertEqual(hub["spec"]["qualifiers"]["hardware"], [
            {"system": {"manufacturer": "Dell"}},
            {"compute": {"processors": [{"manufacturer": "Intel", "productName": "Xeon"}]}}])
        self.assertEqual(hub["spec"]["qualifiers"]["labelSelectors"], [{"rack": "a"}])
        self.assertEqual(hub["spec"]["bootFromDiskMethod"], "http-404")
        old = await self.get("serverclasses.v1alpha1.metal.sidero.dev", name)
        self.assertEqual(old["spec"]["qualifiers"]["systemInformation"], [{"manufacturer": "Dell"}])
        self.assertEqual(old["spec"]["qualifiers"]["cpu"], [{"manufacturer": "Intel", "version": "Xeon"}])

    async def test_environment_identical_in_both_versions(self) -> None:
        """An Environment written as v1alpha1 reads as v1alpha2 with the same spec."""
        name = "env-" + uuid.uuid4().hex[:8]
        spec = {"kernel": {"url": "http://127.0.0.1/vmlinuz", "sha512": "", "args": ["console=ttyS0", "a=b"]},
                "initrd": {"url": "http://127.0.0.1/initramfs.xz", "sha512": ""}}
        obj = {"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Environment", "metadata": {"name": name},
               "spec": spec}
        result = await self.apply(obj)
        self.assertEqual(result.returncode, 0, result.stderr)
        hub = await self.get("environments.v1alpha2.metal.sidero.dev", name)
        self.assertEqual(hub["spec"]["kernel"]["args"], ["console=ttyS0", "a=b"])
        self.assertEqual(hub["spec"]["kernel"]["url"], spec["kernel"]["url"])
        self.assertEqual(hub["spec"]["initrd"]["url"], spec["initrd"]["url"])

    async def test_metalmachine_both_directions(self) -> None:
        """MetalMachine v1alpha2 spec reads as v1alpha3, and v1alpha3's serverClassRef survives a v1alpha2 read only in the annotation."""
        old_name, new_name = "mm-old", "mm-new"
        ref = {"kind": "Server", "name": "abc", "apiVersion": "metal.sidero.dev/v1alpha2"}
        result = await self.apply({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha2", "kind": "MetalMachine",
            "metadata": {"name": old_name, "namespace": self.ns},
            "spec": {"providerID": "sidero://abc", "serverRef": ref}})
        self.assertEqual(result.returncode, 0, result.stderr)
        hub = await self.get("metalmachines.v1alpha3.infrastructure.cluster.x-k8s.io", old_name, True)
        self.assertEqual(hub["spec"], {"providerID": "sidero://abc", "serverRef": ref})
        result = await self.apply({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachine",
            "metadata": {"name": new_name, "namespace": self.ns},
            "spec": {"serverClassRef": {"kind": "ServerClass", "name": "any"}, "serverRef": ref}})
        self.assertEqual(result.returncode, 0, result.stderr)
        old = await self.get("metalmachines.v1alpha2.infrastructure.cluster.x-k8s.io", new_name, True)
        self.assertEqual(old["spec"], {"serverRef": ref})
        kept = json.loads(old["metadata"]["annotations"][CONVERSION_DATA_ANNOTATION])
        self.assertEqual(kept["spec"]["serverClassRef"], {"kind": "ServerClass", "name": "any"})

    async def test_metalcluster_api_endpoints_become_control_plane_endpoint(self) -> None:
        """MetalCluster v1alpha2 spec.apiEndpoints[0] reads as v1alpha3 controlPlaneEndpoint, and back."""
        result = await self.apply({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha2", "kind": "MetalCluster",
            "metadata": {"name": "mc", "namespace": self.ns},
            "spec": {"apiEndpoints": [{"host": "10.5.0.2", "port": 6443}]}})
        self.assertEqual(result.returncode, 0, result.stderr)
        hub = await self.get("metalclusters.v1alpha3.infrastructure.cluster.x-k8s.io", "mc", True)
        self.assertEqual(hub["spec"]["controlPlaneEndpoint"], {"host": "10.5.0.2", "port": 6443})
        old = await self.get("metalclusters.v1alpha2.infrastructure.cluster.x-k8s.io", "mc", True)
        self.assertEqual(old["spec"]["apiEndpoints"], [{"host": "10.5.0.2", "port": 6443}])

    async def test_metalmachinetemplate_v1alpha2_reads_as_v1alpha3(self) -> None:
        """A MetalMachineTemplate written as v1alpha2 reads as v1alpha3 with the same template spec."""
        result = await self.apply({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha2", "kind": "MetalMachineTemplate",
            "metadata": {"name": "mmt", "namespace": self.ns},
            "spec": {"template": {"spec": {"serverRef": {"kind": "Server", "name": "x"}}}}})
        self.assertEqual(result.returncode, 0, result.stderr)
        hub = await self.get("metalmachinetemplates.v1alpha3.infrastructure.cluster.x-k8s.io", "mmt", True)
        self.assertEqual(hub["spec"]["template"]["spec"], {"serverRef": {"kind": "Server", "name": "x"}})

    # --- validation --------------------------------------------------------------------------

    async def test_invalid_server_refused(self) -> None:
        """kubectl apply of a Server with configPatches op "error" is refused with the field error, and nothing is stored."""
        name = str(uuid.uuid4())
        result = await self.apply(self._server_v1alpha2(name, op="error"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn('spec.configPatches.0.op: Invalid value: "error"', result.stderr)
        self.assertIn('valid values are: ["add" "copy" "move" "remove" "replace" "test"]', result.stderr)
        missing = await kubectl(self.server, "get", f"servers.v1alpha2.metal.sidero.dev/{name}")
        self.assertIn("NotFound", missing.stderr)
        status = await self.raw_status("create_cluster_custom_object", "metal.sidero.dev", "v1alpha2", "servers",
                                       self._server_v1alpha2(name, op="error"))
        self.assertEqual((status["code"], status["reason"]), (422, "Invalid"))
        self.assertTrue(status["message"].startswith(
            'admission webhook "vservers.metal.sidero.dev" denied the request: '
            f'Server.metal.sidero.dev "{name}" is invalid: spec.configPatches.0.op: Invalid value: "error"'),
            status["message"])
        self.assertEqual([c["field"] for c in status["details"]["causes"]], ["spec.configPatches.0.op"])

    async def test_invalid_v1alpha1_server_refused(self) -> None:
        """A v1alpha1 write is converted and validated too (matchPolicy Equivalent): bad bootFromDiskMethod refused."""
        name = str(uuid.uuid4())
        result = await self.apply({"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Server",
                                   "metadata": {"name": name},
                                   "spec": {"accepted": True, "bootFromDiskMethod": "floppy"}})
        self.assertNotEqual(result.returncode, 0)
        self.assertIn('spec.bootFromDiskMethod: Invalid value: "floppy"', result.stderr)

    async def test_valid_server_update_and_delete_allowed(self) -> None:
        """A valid Server is created, updated and deleted with the webhook in the path."""
        name = str(uuid.uuid4())
        self.assertEqual((await self.apply(self._server_v1alpha2(name))).returncode, 0)
        obj = self._server_v1alpha2(name, op="remove")
        result = await self.apply(obj)
        self.assertEqual(result.returncode, 0, result.stderr)
        got = await self.get("servers.v1alpha2.metal.sidero.dev", name)
        self.assertEqual(got["spec"]["configPatches"][0]["op"], "remove")
        result = await kubectl(self.server, "delete", f"servers.metal.sidero.dev/{name}", "--wait=false")
        self.assertEqual(result.returncode, 0, result.stderr)

    async def test_metalmachinetemplate_spec_immutable(self) -> None:
        """Changing a MetalMachineTemplate's spec is refused; changing its labels is not."""
        base = {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachineTemplate",
                "metadata": {"name": "tmpl", "namespace": self.ns},
                "spec": {"template": {"spec": {"serverClassRef": {"kind": "ServerClass", "name": "a"}}}}}
        self.assertEqual((await self.apply(base)).returncode, 0)
        changed = json.loads(json.dumps(base))
        changed["spec"]["template"]["spec"]["serverClassRef"]["name"] = "b"
        result = await self.apply(changed)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("MetalMachineTemplate.Spec is immutable", result.stderr)
        got = await self.get("metalmachinetemplates.infrastructure.cluster.x-k8s.io", "tmpl", True)
        self.assertEqual(got["spec"]["template"]["spec"]["serverClassRef"]["name"], "a")
        status = await self.raw_status(
            "patch_namespaced_custom_object", "infrastructure.cluster.x-k8s.io", "v1alpha3", self.ns,
            "metalmachinetemplates", "tmpl", {"spec": {"template": {"spec": {"providerID": "sidero://x"}}}})
        self.assertEqual((status["code"], status["reason"]), (400, "BadRequest"))
        self.assertEqual(status["message"], 'admission webhook "vmetalmachinetemplates.infrastructure.cluster.x-k8s.io"'
                                            " denied the request: MetalMachineTemplate.Spec is immutable")
        relabelled = json.loads(json.dumps(base))
        relabelled["metadata"]["labels"] = {"tier": "gold"}
        result = await self.apply(relabelled)
        self.assertEqual(result.returncode, 0, result.stderr)

    # --- the factory registers itself ------------------------------------------------------

    async def test_service_registers_itself_at_start(self) -> None:
        """make_webhook_service given an API client and endpoint patches the CRDs and the
        validating configuration at start, and then serves the conversions on its own."""
        import base64

        from twisted.internet import reactor

        from sidero.k8s.client import load_api_client
        from tests.ports import free_port

        port = free_port()
        api_client = load_api_client(str(self.server.kubeconfig))
        self.addCleanup(api_client.close)
        service = make_webhook_service(
            reactor, port=port, interface="127.0.0.1", cert_dir=self.mktemp(), hosts=["127.0.0.1"],
            api_client=api_client, endpoint=WebhookEndpoint(url=f"https://127.0.0.1:{port}"))
        await service.startService()
        self.addCleanup(service.stopService)
        assert service.ca_bundle is not None
        crd = await self.get("crd", "metalclusters.infrastructure.cluster.x-k8s.io")
        config = crd["spec"]["conversion"]["webhook"]["clientConfig"]
        self.assertEqual(config["url"], f"https://127.0.0.1:{port}/convert")
        self.assertEqual(base64.b64decode(config["caBundle"]), service.ca_bundle)
        vwc = await self.get("validatingwebhookconfiguration", "sidero-validating-webhook-configuration")
        self.assertEqual({w["clientConfig"]["url"] for w in vwc["webhooks"]}, {
            f"https://127.0.0.1:{port}/validate-metal-sidero-dev-v1alpha2-server",
            f"https://127.0.0.1:{port}/validate-infrastructure-cluster-x-k8s-io-v1alpha3-metalmachinetemplate"})
        await self.service.stopService()  # the one setUp registered is gone: only the new one serves
        result = await self.apply({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha2", "kind": "MetalCluster",
            "metadata": {"name": "self", "namespace": self.ns},
            "spec": {"apiEndpoints": [{"host": "10.5.0.9", "port": 6443}]}})
        self.assertEqual(result.returncode, 0, result.stderr)
        hub = await self.get("metalclusters.v1alpha3.infrastructure.cluster.x-k8s.io", "self", True)
        self.assertEqual(hub["spec"]["controlPlaneEndpoint"], {"host": "10.5.0.9", "port": 6443})
        self.assertGreaterEqual(service.handler.counters.objects_converted, 1)

    # --- webhook down ------------------------------------------------------------------------

    async def test_webhook_down_refuses_and_stores_nothing(self) -> None:
        """With the webhook server stopped, a v1alpha1 write fails with a clear error and nothing is stored."""
        await self.service.stopService()
        name = str(uuid.uuid4())
        result = await self.apply({"apiVersion": "metal.sidero.dev/v1alpha1", "kind": "Server",
                                   "metadata": {"name": name}, "spec": {"accepted": False}})
        self.assertNotEqual(result.returncode, 0)
        self.assertRegex(result.stderr, r"conversion webhook|failed calling webhook")
        self.assertIn("connection refused", result.stderr)
        api_client = self.server.api_client()
        try:
            from kubernetes import client
            from kubernetes.client.exceptions import ApiException
            custom = client.CustomObjectsApi(api_client)
            with self.assertRaises(ApiException) as caught:
                await threads.deferToThread(custom.get_cluster_custom_object,
                                            "metal.sidero.dev", "v1alpha2", "servers", name)
            self.assertEqual(caught.exception.status, 404)
        finally:
            api_client.close()
