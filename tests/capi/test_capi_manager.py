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

from tests.capi.capi import (
    CAPI_GROUP,
    CONTROL_PLANE_GROUP,
    PROVISIONING_ANNOTATION,
    STANDIN_VERSION,
)
from tests.capi.support import INFRA_GROUP, INFRA_VERSION, CAPITestCase


class CAPIManagerTests(CAPITestCase):
    """Cluster, MetalCluster, MachineDeployment and MetalMachineTemplate under the real manager."""

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
