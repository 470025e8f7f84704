"""/configdata from the real C{twistd sidero} process (embedded store, loopback only).

Objects go in through the management CLI as an operator would apply them; the config comes
out through curl.  The SideroLink documents must point at the tunnel address derived from
the C{default/siderolink} Secret the process created at start (spec §2.4, §3.8).

The process runs with the default C{--configdata-access owner}: the bindings carry
C{spec.addresses: [127.0.0.1]} (what the event sink records from Talos' AddressEvent), so
curl on loopback is their node; a uuid with no such address is refused 403.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from typing import Any

import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from sidero.api.registry import CAPI_MACHINE, SECRET
from sidero.siderolink.config import config_from_secret
from sidero.talos.configpatch import load_yaml
from tests.integration.lifecycle_support import SideroProcess, tail

UUID = "d9a5e6a8-1b2c-4d3e-8f90-0a1b2c3d4e5f"
LAB_UUID = "e1e2e3e4-0000-4000-8000-000000000001"
NS = "cluster-a"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class ConfigDataProcessTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if shutil.which("curl") is None:
            raise SkipTest("LOUD SKIP: curl is not installed")
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.sidero = SideroProcess(self.work)
        self.sidero.start()
        self.addCleanup(self.sidero.stop)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await deferToThread(self.sidero.ready):
                return
            await deferLater(reactor, 0.25, lambda: None)
        self.fail(f"sidero never became ready:\n{tail(self.sidero.log_path)}")

    def apply(self, *docs: dict[str, Any]) -> None:
        result = self.sidero.cli("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
        self.assertEqual(result.returncode, 0, result.stderr)

    def curl(self, uuid: str) -> tuple[int, bytes]:
        result = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", f"http://{self.sidero.endpoint}/configdata?uuid={uuid}"],
            capture_output=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        body, _, status = result.stdout.rpartition(b"\n")
        return int(status), body

    async def fetch_until(self, uuid: str, status: int) -> bytes:
        """The informers follow the store asynchronously: poll until the answer settles."""
        got: tuple[int, bytes] = (0, b"")
        for _ in range(80):
            got = await deferToThread(self.curl, uuid)
            if got[0] == status:
                return got[1]
            await deferLater(reactor, 0.25, lambda: None)
        self.fail(f"/configdata?uuid={uuid} kept answering {got}")

    async def test_configdata_from_the_real_process(self) -> None:
        """A Cluster-API-shaped binding and an annotated lab MetalMachine both get their
        patched config with the node label and this installation's SideroLink documents."""
        await self.wait_ready()
        # Not the Go answer (404 "server is not allocated"): a source that is not the
        # server's learns nothing, not even whether it exists.
        self.assertEqual(await deferToThread(self.curl, "nobody"),
                         (403, b"forbidden: configdata is served only to its server\n"))

        bootstrap = "version: v1alpha1\nmachine:\n  type: worker\n  kubelet: {}\n"
        self.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "metadata": {"name": "lab"},
             "spec": {"strategicPatches": ["machine:\n  install:\n    disk: /dev/vda\n"]}},
            {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": UUID},
             "spec": {"accepted": True,
                      "configPatches": [{"op": "add", "path": "/machine/network", "value": {"hostname": "n1"}}]}},
            {"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine",
             "metadata": {"name": "machine-0", "namespace": NS},
             "spec": {"clusterName": "a", "bootstrap": {"dataSecretName": "bootstrap-0"}}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bootstrap-0", "namespace": NS},
             "data": {"value": b64(bootstrap)}},
        )
        machine_uid = self.sidero.get(CAPI_MACHINE, "machine-0", NS)["metadata"]["uid"]
        self.apply(
            {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachine",
             "metadata": {"name": "metal-0", "namespace": NS, "ownerReferences": [
                 {"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine", "name": "machine-0",
                  "uid": machine_uid}]}, "spec": {}},
            {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "ServerBinding",
             "metadata": {"name": UUID},
             "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": NS, "name": "metal-0"},
                      "serverClassRef": {"kind": "ServerClass", "name": "lab"},
                      "addresses": ["127.0.0.1"]}},
            # The extension: no Cluster API Machine, the Secret named by an annotation.
            {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "metadata": {"name": LAB_UUID},
             "spec": {"accepted": True}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "lab-config", "namespace": NS},
             "stringData": {"value": "version: v1alpha1\nmachine:\n  type: controlplane\n"}},
            {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachine",
             "metadata": {"name": "lab-0", "namespace": NS,
                          "annotations": {"metal.sidero.dev/bootstrap-data-secret": "lab-config"}}, "spec": {}},
            {"apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "ServerBinding",
             "metadata": {"name": LAB_UUID},
             "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": NS, "name": "lab-0"},
                      "addresses": ["127.0.0.1"]}},
        )

        identity = config_from_secret(self.sidero.get(SECRET, "siderolink", "default"))
        tunnel = str(identity.server_address)
        siderolink = [
            {"apiVersion": "v1alpha1", "kind": "SideroLinkConfig", "apiUrl": f"grpc://{self.sidero.endpoint}"},
            {"apiVersion": "v1alpha1", "kind": "EventSinkConfig", "endpoint": f"[{tunnel}]:4002"},
            {"apiVersion": "v1alpha1", "kind": "KmsgLogConfig", "name": "remote-log",
             "url": f"tcp://[{tunnel}]:4001"},
        ]

        docs = load_yaml(await self.fetch_until(UUID, 200))
        self.assertEqual(docs[0], {"version": "v1alpha1", "machine": {
            "type": "worker", "install": {"disk": "/dev/vda"}, "network": {"hostname": "n1"},
            "kubelet": {"extraArgs": {"node-labels": f"metal.sidero.dev/uuid={UUID}"}}}})
        self.assertEqual(docs[1:], siderolink)

        docs = load_yaml(await self.fetch_until(LAB_UUID, 200))
        self.assertEqual(docs[0]["machine"], {"type": "controlplane", "kubelet": {"extraArgs": {
            "node-labels": f"metal.sidero.dev/uuid={LAB_UUID}"}}})
        self.assertEqual(docs[1:], siderolink)

        logged = [e for e in self.sidero.log_events() if e.get("uuid") == UUID and "status" in e]
        self.assertTrue(logged, "requests are logged with uuid and status")
        self.assertNotIn("node-labels", json.dumps(self.sidero.log_events()), "no config in the log")
