"""Helpers for tests that drive the real CAPI manager: objects in a namespace of the shared
environment, a Cluster with its MetalCluster and control-plane stand-in, a MachineDeployment
with a MetalMachineTemplate, and waiting for Machines with their MetalMachines."""

from __future__ import annotations

from typing import Any

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from tests.capi.capi import (
    BOOTSTRAP_GROUP,
    CAPI_GROUP,
    CONTROL_PLANE_GROUP,
    PROVISIONING_ANNOTATION,
    STANDIN_VERSION,
    CAPIEnvironment,
    eventually,
    sharedCAPI,
)

INFRA_GROUP = "infrastructure.cluster.x-k8s.io"
INFRA_VERSION = "v1alpha3"
K8S_VERSION = "v1.33.0"


class CAPITestCase(TestCase):
    """A namespace of the shared CAPI environment and the objects a cluster is made of."""

    timeout = 400

    async def setUp(self) -> None:  # type: ignore[override]
        self.env: CAPIEnvironment = await sharedCAPI()
        self.ns = await threads.deferToThread(self.env.create_namespace, self)
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(self.env.api_client())
        self.core: Any = client.CoreV1Api(self.env.api_client())

    # --- small helpers (blocking; run through deferToThread) ---------------------------------

    def create(self, group: str, version: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        body.setdefault("metadata", {})["namespace"] = self.ns
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(group, version, self.ns, plural, body)
        return result

    def get(self, group: str, version: str, plural: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(group, version, self.ns, plural, name)
        return result

    def list(self, group: str, version: str, plural: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(group, version, self.ns, plural)["items"]
        return items

    def patch_status(self, group: str, version: str, plural: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(group, version, self.ns, plural, name, {"status": status})

    def wait(self, what: str, check: Any, timeout: float = 120.0) -> Any:
        return eventually(what, check, timeout, self.env.diagnostics)

    async def make_cluster(self, name: str, *, provisioning: bool = False, play_provider: bool = True) -> None:
        """Cluster + MetalCluster + TalosControlPlane (stand-in).  With C{play_provider} the test
        makes the infrastructure ready as our MetalCluster controller would (it only sets
        status.ready); without, sidero's controller must."""
        endpoint = {"host": "192.0.2.10", "port": 6443}
        annotations = {PROVISIONING_ANNOTATION: "true"} if provisioning else {}

        def objects() -> None:
            self.create(CONTROL_PLANE_GROUP, STANDIN_VERSION, "taloscontrolplanes", {
                "apiVersion": f"{CONTROL_PLANE_GROUP}/{STANDIN_VERSION}", "kind": "TalosControlPlane",
                "metadata": {"name": f"{name}-cp", "annotations": annotations},
                "spec": {"version": K8S_VERSION, "replicas": 0,
                         "infrastructureTemplate": {"apiVersion": f"{INFRA_GROUP}/{INFRA_VERSION}",
                                                    "kind": "MetalMachineTemplate", "name": f"{name}-cp"}},
            })
            self.create(INFRA_GROUP, INFRA_VERSION, "metalclusters", {
                "apiVersion": f"{INFRA_GROUP}/{INFRA_VERSION}", "kind": "MetalCluster",
                "metadata": {"name": name}, "spec": {"controlPlaneEndpoint": endpoint},
            })
            self.create(CAPI_GROUP, "v1beta1", "clusters", {
                "apiVersion": f"{CAPI_GROUP}/v1beta1", "kind": "Cluster", "metadata": {"name": name},
                "spec": {
                    "clusterNetwork": {"pods": {"cidrBlocks": ["10.244.0.0/16"]},
                                       "services": {"cidrBlocks": ["10.96.0.0/12"]}},
                    "infrastructureRef": {"apiVersion": f"{INFRA_GROUP}/{INFRA_VERSION}", "kind": "MetalCluster",
                                          "name": name, "namespace": self.ns},
                    "controlPlaneRef": {"apiVersion": f"{CONTROL_PLANE_GROUP}/{STANDIN_VERSION}",
                                        "kind": "TalosControlPlane", "name": f"{name}-cp", "namespace": self.ns},
                },
            })

        await threads.deferToThread(objects)

        def owned_by_cluster() -> bool:
            mc = self.get(INFRA_GROUP, INFRA_VERSION, "metalclusters", name)
            return any(o["kind"] == "Cluster" and o["name"] == name
                       for o in mc["metadata"].get("ownerReferences", []))

        await self.wait("CAPI to own the MetalCluster", owned_by_cluster)
        if play_provider:
            cluster = await threads.deferToThread(self.get, CAPI_GROUP, "v1beta1", "clusters", name)
            self.assertFalse((cluster.get("status") or {}).get("infrastructureReady"),
                             "infrastructure ready before the MetalCluster said so")
            await threads.deferToThread(self.patch_status, INFRA_GROUP, INFRA_VERSION, "metalclusters", name,
                                        {"ready": True})

        def ready() -> dict[str, Any] | None:
            c = self.get(CAPI_GROUP, "v1beta1", "clusters", name)
            return c if (c.get("status") or {}).get("infrastructureReady") else None

        cluster = await self.wait("Cluster infrastructureReady", ready)
        # CAPI copies the endpoint from the infrastructure cluster (the v1beta1 contract).
        self.assertEqual(cluster["spec"]["controlPlaneEndpoint"], endpoint)
        conditions = {c["type"]: c["status"] for c in cluster["status"].get("conditions", [])}
        self.assertEqual(conditions.get("InfrastructureReady"), "True", cluster["status"])

    async def make_workers(self, cluster: str, replicas: int, server_class: str = "workers") -> str:
        name = f"{cluster}-workers"

        def objects() -> None:
            self.create(INFRA_GROUP, INFRA_VERSION, "metalmachinetemplates", {
                "apiVersion": f"{INFRA_GROUP}/{INFRA_VERSION}", "kind": "MetalMachineTemplate",
                "metadata": {"name": name},
                "spec": {"template": {"spec": {"serverClassRef": {
                    "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "name": server_class}}}},
            })
            self.create(BOOTSTRAP_GROUP, STANDIN_VERSION, "talosconfigtemplates", {
                "apiVersion": f"{BOOTSTRAP_GROUP}/{STANDIN_VERSION}", "kind": "TalosConfigTemplate",
                "metadata": {"name": name},
                "spec": {"template": {"spec": {"generateType": "join", "talosVersion": "v1.13"}}},
            })
            self.create(CAPI_GROUP, "v1beta1", "machinedeployments", {
                "apiVersion": f"{CAPI_GROUP}/v1beta1", "kind": "MachineDeployment",
                "metadata": {"name": name},
                "spec": {
                    "clusterName": cluster, "replicas": replicas,
                    # As the cluster template has it: the defaulting webhook fills the selector.
                    "selector": {"matchLabels": None},
                    "template": {"spec": {
                        "clusterName": cluster, "version": K8S_VERSION,
                        "bootstrap": {"configRef": {"apiVersion": f"{BOOTSTRAP_GROUP}/{STANDIN_VERSION}",
                                                    "kind": "TalosConfigTemplate", "name": name}},
                        "infrastructureRef": {"apiVersion": f"{INFRA_GROUP}/{INFRA_VERSION}",
                                              "kind": "MetalMachineTemplate", "name": name},
                    }},
                },
            })

        await threads.deferToThread(objects)
        return name

    def machines_with_metal(self, count: int) -> list[tuple[dict[str, Any], dict[str, Any]]] | None:
        """(Machine, MetalMachine) pairs once exactly C{count} of each exist, each MetalMachine
        owned by its Machine and each Machine with its bootstrap data secret, else None."""
        machines = [m for m in self.list(CAPI_GROUP, "v1beta1", "machines")
                    if not m["metadata"].get("deletionTimestamp")]
        metal = {m["metadata"]["name"]: m for m in self.list(INFRA_GROUP, INFRA_VERSION, "metalmachines")
                 if not m["metadata"].get("deletionTimestamp")}
        if len(machines) != count or len(metal) != count:
            return None
        pairs = []
        for machine in machines:
            ref = machine["spec"]["infrastructureRef"]
            mm = metal.get(ref["name"])
            if mm is None or not machine["spec"]["bootstrap"].get("dataSecretName"):
                return None
            owners = [o for o in mm["metadata"].get("ownerReferences", []) if o["kind"] == "Machine"]
            if [o["name"] for o in owners] != [machine["metadata"]["name"]]:
                return None
            pairs.append((machine, mm))
        return pairs

    # --- the tests ----------------------------------------------------------------------------

