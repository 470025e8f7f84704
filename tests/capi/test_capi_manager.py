"""The real CAPI core controller manager (v1.10) working with sidero's infrastructure kinds.

Nothing of sidero runs here: the tests play the infrastructure provider's part themselves
(MetalCluster C{status.ready}, MetalMachine C{providerID} and C{status.ready}), so what they
show is the contract between CAPI and our CRDs: CAPI owns and clones our objects, copies
bootstrap data references and, through a second kube-apiserver as the workload cluster, matches
a Node to its Machine by providerID.
"""

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


class CAPIManagerTests(TestCase):
    """Cluster, MetalCluster, MachineDeployment and MetalMachineTemplate under the real manager."""

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

    async def make_cluster(self, name: str, *, provisioning: bool = False) -> None:
        """Cluster + MetalCluster + TalosControlPlane (stand-in), infrastructure made ready as
        our MetalCluster controller will (it only sets status.ready)."""
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

    async def make_workers(self, cluster: str, replicas: int) -> str:
        name = f"{cluster}-workers"

        def objects() -> None:
            self.create(INFRA_GROUP, INFRA_VERSION, "metalmachinetemplates", {
                "apiVersion": f"{INFRA_GROUP}/{INFRA_VERSION}", "kind": "MetalMachineTemplate",
                "metadata": {"name": name},
                "spec": {"template": {"spec": {"serverClassRef": {
                    "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "name": "workers"}}}},
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

    async def test_cluster_infrastructure_ready_from_metal_cluster(self) -> None:
        """Cluster + MetalCluster: CAPI owns the MetalCluster and reports infrastructureReady
        (with the MetalCluster's endpoint) only after MetalCluster status.ready."""
        await self.make_cluster("c1")

    async def test_machine_deployment_clones_metal_machines_and_scales(self) -> None:
        """A MachineDeployment with a MetalMachineTemplate: each Machine owns a MetalMachine
        cloned from the template and gets the stand-in's bootstrap Secret; scaling changes the
        number of MetalMachines both ways."""
        await self.make_cluster("c2")
        name = await self.make_workers("c2", 2)
        pairs = await self.wait("2 Machines with MetalMachines", lambda: self.machines_with_metal(2))
        template = await threads.deferToThread(self.get, INFRA_GROUP, INFRA_VERSION, "metalmachinetemplates", name)
        for machine, mm in pairs:
            self.assertEqual(mm["spec"]["serverClassRef"], template["spec"]["template"]["spec"]["serverClassRef"])
            self.assertEqual(mm["metadata"]["labels"][f"{CAPI_GROUP}/cluster-name"], "c2")
            self.assertEqual(mm["metadata"]["annotations"][f"{CAPI_GROUP}/cloned-from-name"], name)
            secret_name = machine["spec"]["bootstrap"]["dataSecretName"]
            secret = await threads.deferToThread(self.core.read_namespaced_secret, secret_name, self.ns)
            self.assertEqual(secret.type, "cluster.x-k8s.io/secret")
            import base64

            import yaml

            config = yaml.safe_load(base64.b64decode(secret.data["value"]))
            self.assertEqual(config["machine"]["type"], "worker")
            self.assertEqual(config["cluster"]["controlPlane"]["endpoint"], "https://192.0.2.10:6443")
            # The bootstrap config CAPI cloned from the template is the one the stand-in served.
            cfg_name = machine["spec"]["bootstrap"]["configRef"]["name"]
            self.assertIn(f"{self.ns}/{cfg_name}", self.env.standins.handled if self.env.standins else [])

        def scale(replicas: int) -> None:
            self.custom.patch_namespaced_custom_object(
                CAPI_GROUP, "v1beta1", self.ns, "machinedeployments", name, {"spec": {"replicas": replicas}})

        await threads.deferToThread(scale, 3)
        await self.wait("3 MetalMachines after scaling up", lambda: self.machines_with_metal(3))
        await threads.deferToThread(scale, 1)
        await self.wait("1 MetalMachine after scaling down", lambda: self.machines_with_metal(1))

    async def test_workload_cluster_node_matched_by_provider_id(self) -> None:
        """With the <cluster>-kubeconfig Secret of a second kube-apiserver, CAPI connects to the
        workload cluster and sets Machine status.nodeRef to the Node with our providerID."""
        await self.make_cluster("c3")
        workload = await self.env.start_workload_cluster(self, self.ns, "c3")
        await self.make_workers("c3", 1)
        [(machine, mm)] = await self.wait("1 Machine with its MetalMachine", lambda: self.machines_with_metal(1))
        node_name = "server-0001"
        provider_id = f"sidero://{node_name}"

        # What our MetalMachine controller does once the server is allocated and installed.
        def allocate() -> None:
            self.custom.patch_namespaced_custom_object(
                INFRA_GROUP, INFRA_VERSION, self.ns, "metalmachines", mm["metadata"]["name"],
                {"spec": {"providerID": provider_id}})
            self.patch_status(INFRA_GROUP, INFRA_VERSION, "metalmachines", mm["metadata"]["name"],
                              {"ready": True, "addresses": [{"type": "InternalIP", "address": "192.0.2.21"}]})

        await threads.deferToThread(allocate)

        def provider_copied() -> bool:
            m = self.get(CAPI_GROUP, "v1beta1", "machines", machine["metadata"]["name"])
            return bool(m["spec"].get("providerID") == provider_id)

        await self.wait("the Machine to take the MetalMachine's providerID", provider_copied)

        def make_node() -> None:
            from kubernetes import client

            wl = workload.api_client()
            try:
                client.CoreV1Api(wl).create_node({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": node_name, "labels": {"metal.sidero.dev/uuid": node_name}},
                    "spec": {"providerID": provider_id},
                })
            finally:
                wl.close()

        await threads.deferToThread(make_node)

        def node_ref() -> dict[str, Any] | None:
            m = self.get(CAPI_GROUP, "v1beta1", "machines", machine["metadata"]["name"])
            ref: dict[str, Any] | None = (m.get("status") or {}).get("nodeRef")
            return ref

        ref = await self.wait("Machine status.nodeRef from the workload cluster", node_ref, timeout=180)
        self.assertEqual(ref["kind"], "Node")
        self.assertEqual(ref["name"], node_name)

        # CAPI wrote back to the workload cluster: the Node carries the Machine's annotations.
        def annotated() -> bool:
            result = workload.kubectl("get", "node", node_name, "-o",
                                      "jsonpath={.metadata.annotations.cluster\\.x-k8s\\.io/machine}")
            return result.returncode == 0 and result.stdout == machine["metadata"]["name"]

        await self.wait("CAPI's annotations on the workload Node", annotated)

    async def test_preflight_checks_hold_workers_until_the_control_plane_has_a_version(self) -> None:
        """CAPI v1.10's MachineSet preflight checks are on: no worker Machine while the control
        plane has no status.version (provisioning); once the stand-in publishes it, they come."""
        await self.make_cluster("c4", provisioning=True)
        await self.make_workers("c4", 1)

        def held() -> str | None:
            for ms in self.list(CAPI_GROUP, "v1beta1", "machinesets"):
                for c in (ms.get("status") or {}).get("conditions", []):
                    if c["type"] == "MachinesCreated" and c.get("reason") == "PreflightCheckFailed":
                        return str(c.get("message", ""))
            return None

        message = await self.wait("the MachineSet to report a failed preflight check", held)
        self.assertIn("ControlPlaneIsStable", message)
        self.assertEqual(await threads.deferToThread(self.list, CAPI_GROUP, "v1beta1", "machines"), [])

        def provisioned() -> None:
            self.custom.patch_namespaced_custom_object(
                CONTROL_PLANE_GROUP, STANDIN_VERSION, self.ns, "taloscontrolplanes", "c4-cp",
                {"metadata": {"annotations": {PROVISIONING_ANNOTATION: None}}})

        await threads.deferToThread(provisioned)
        # The MachineSet retries held scale-ups every 15 s (preflightFailedRequeueAfter).
        await self.wait("the worker Machine once the control plane is stable", lambda: self.machines_with_metal(1))

    async def test_control_plane_standin_makes_machines_from_its_template(self) -> None:
        """The TalosControlPlane stand-in does what CACPPT does with replicas: a control-plane
        Machine whose MetalMachine is cloned from infrastructureTemplate (CAPI makes the Machine
        its owner) and whose bootstrap data is a control-plane config; scaling to 0 removes it."""
        await self.make_cluster("c5")

        def template_and_scale() -> None:
            self.create(INFRA_GROUP, INFRA_VERSION, "metalmachinetemplates", {
                "apiVersion": f"{INFRA_GROUP}/{INFRA_VERSION}", "kind": "MetalMachineTemplate",
                "metadata": {"name": "c5-cp"},
                "spec": {"template": {"spec": {"serverClassRef": {
                    "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "name": "masters"}}}},
            })
            self.custom.patch_namespaced_custom_object(
                CONTROL_PLANE_GROUP, STANDIN_VERSION, self.ns, "taloscontrolplanes", "c5-cp", {"spec": {"replicas": 1}})

        await threads.deferToThread(template_and_scale)
        [(machine, mm)] = await self.wait("1 control-plane Machine with its MetalMachine",
                                          lambda: self.machines_with_metal(1))
        self.assertIn(f"{CAPI_GROUP}/control-plane", machine["metadata"]["labels"])
        self.assertEqual([o["kind"] for o in machine["metadata"]["ownerReferences"]], ["TalosControlPlane"])
        self.assertEqual(mm["spec"]["serverClassRef"]["name"], "masters")
        import base64

        import yaml

        secret = await threads.deferToThread(self.core.read_namespaced_secret,
                                             machine["spec"]["bootstrap"]["dataSecretName"], self.ns)
        self.assertEqual(yaml.safe_load(base64.b64decode(secret.data["value"]))["machine"]["type"], "controlplane")

        def replicas_reported() -> bool:
            cp = self.get(CONTROL_PLANE_GROUP, STANDIN_VERSION, "taloscontrolplanes", "c5-cp")
            return bool((cp.get("status") or {}).get("replicas") == 1)

        await self.wait("TalosControlPlane status.replicas 1", replicas_reported)
        await threads.deferToThread(
            self.custom.patch_namespaced_custom_object, CONTROL_PLANE_GROUP, STANDIN_VERSION, self.ns,
            "taloscontrolplanes", "c5-cp", {"spec": {"replicas": 0}})
        await self.wait("no control-plane Machine after scaling to 0", lambda: self.machines_with_metal(0) == [])
