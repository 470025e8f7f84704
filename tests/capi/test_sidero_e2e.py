"""End to end with the real Cluster API: sidero as the infrastructure provider of a cluster.

The real CAPI core manager (v1.10, from Go modules) and stand-ins for the Talos bootstrap and
control-plane providers run against a real management kube-apiserver; a second kube-apiserver is
the workload cluster.  sidero runs as the real C{twistd sidero --store kubernetes} process.
Machines are simulated as in the lifecycle tests: the real agent, a disk file, and the HTTP
power API whose PXE boots follow sidero's C{/ipxe} (the agent environment runs the agent, a
Talos environment fetches its C{/configdata}).

Cluster + MetalCluster → sidero makes the infrastructure ready → a MachineDeployment's Machines
get MetalMachines → sidero binds each to a Server of the class → the servers are powered on with
PXE once and each fetches its own patched config → a Node appears in the workload cluster with
the uuid label (as the kubelet registers it) and sidero sets its providerID → CAPI matches it
(nodeRef) → scaling up binds another server, scaling down releases servers, which their agents
wipe and which return to the class → deleting the Cluster releases everything.  This mirrors
sfyra's TestServerClassPatch, TestMatchServersMetalMachines, TestScaleWorkersUp/Down,
TestMetalMachineServerRefReconcile, TestServerReset and TestWorkloadCluster (§6) without a
Talos image.
"""

from __future__ import annotations

import os
import tempfile
import uuid as uuidlib
from typing import Any

import yaml
from twisted.internet import reactor, threads

from sidero.api.registry import SERVER, SERVER_BINDING
from tests.capi.capi import CAPI_GROUP, eventually
from tests.capi.support import INFRA_GROUP, INFRA_VERSION, CAPITestCase
from tests.integration.lifecycle_support import (
    Machine,
    PowerAPI,
    boot_agent,
    serve_power_api,
    serve_talos_assets,
    talos_environment,
)
from tests.k8s.test_service_kubernetes import SideroProcess

MACHINES = 4
METAL = "metal.sidero.dev"


class SideroWithClusterAPITests(CAPITestCase):
    timeout = 600
    maxDiff = None

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.run_id = uuidlib.uuid4().hex[:6]
        self.label = f"e2e-{self.run_id}"
        self.workdir = tempfile.mkdtemp(prefix="sidero-capi-e2e-")
        self.sidero = SideroProcess(
            str(self.env.management.kubeconfig), self.workdir,
            "--no-webhook-register", "--disable-webhook", "--leader-election-namespace", self.ns,
            "--server-reboot-timeout", "6s",
            # Every simulated machine fetches /configdata from loopback, as nodes behind one
            # NAT address would: the relaxation an operator would configure for that.
            "--configdata-trusted-networks", "127.0.0.0/8", name="sidero")
        self.addCleanup(self.cleanup)
        self.sidero.start()
        self.pending: Any = None

    async def cleanup(self) -> None:
        await threads.deferToThread(self.sidero.stop)

        def remove() -> None:
            for kind in (SERVER_BINDING, SERVER):
                for obj in self.list_cluster(kind, f"e2e={self.run_id}"):
                    name = obj["metadata"]["name"]
                    self.custom.patch_cluster_custom_object(
                        kind.group, kind.storage_version, kind.plural, name, {"metadata": {"finalizers": None}})
                    self.custom.delete_cluster_custom_object(
                        kind.group, kind.storage_version, kind.plural, name)
            for plural in ("serverclasses", "environments"):
                try:
                    self.custom.delete_cluster_custom_object(METAL, "v1alpha2", plural, self.label)
                except Exception:  # never created: the test failed before
                    pass

        await threads.deferToThread(remove)

    def wait(self, what: str, check: Any, timeout: float = 120.0) -> Any:
        """Poll as the base class does; a timeout also shows what was still pending and
        sidero's log."""
        return eventually(what, check, timeout, lambda: (
            f"pending: {self.pending!r}\n{self.env.diagnostics()}\n--- sidero log:\n"
            + self.sidero.log()[-4000:]))

    # --- cluster-scoped objects -----------------------------------------------------------

    def list_cluster(self, kind: Any, selector: str | None = None) -> list[dict[str, Any]]:
        kw = {"label_selector": selector} if selector else {}
        items: list[dict[str, Any]] = self.custom.list_cluster_custom_object(
            kind.group, kind.storage_version, kind.plural, **kw)["items"]
        return items

    def servers(self) -> dict[str, dict[str, Any]]:
        return {s["metadata"]["name"]: s for s in self.list_cluster(SERVER, f"e2e={self.run_id}")}

    def bindings(self) -> dict[str, dict[str, Any]]:
        return {b["metadata"]["name"]: b for b in self.list_cluster(SERVER_BINDING)
                if b["metadata"]["name"] in self.machines_by_uuid}

    def server_class(self) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_cluster_custom_object(
            METAL, "v1alpha2", "serverclasses", self.label)
        return result

    def live_metal_machines(self) -> list[dict[str, Any]]:
        return [m for m in self.list(INFRA_GROUP, INFRA_VERSION, "metalmachines")
                if not m["metadata"].get("deletionTimestamp")]

    # --- the fleet ------------------------------------------------------------------------

    async def register_fleet(self) -> list[PowerAPI]:
        """Machines PXE-boot the agent and register; the operator accepts them with their power
        API, a label for the class and a per-server config patch; the agents wipe them."""
        endpoint = f"127.0.0.1:{self.sidero.api_port}"
        await self.wait("sidero to serve HTTP", lambda: self.sidero.get("/boot.ipxe")[0] == 200)
        apis = []
        for i in range(MACHINES):
            machine = Machine(uuid=str(uuidlib.uuid4()), index=40 + i, work=os.path.join(self.workdir, f"m{i}"))
            await threads.deferToThread(machine.make)
            api = PowerAPI(machine, endpoint, powered=False, follow_ipxe=True)
            port = serve_power_api(reactor, api)
            self.addCleanup(port.stopListening)
            api.endpoint = f"127.0.0.1:{port.getHost().port}"
            apis.append(api)
            await boot_agent(machine, endpoint)
        self.machines_by_uuid = {a.machine.uuid: a for a in apis}

        port, assets = serve_talos_assets(reactor)
        self.addCleanup(port.stopListening)

        def accept() -> None:
            self.custom.create_cluster_custom_object(METAL, "v1alpha2", "environments",
                                                     talos_environment(self.label, assets))
            self.custom.create_cluster_custom_object(METAL, "v1alpha2", "serverclasses", {
                "apiVersion": f"{METAL}/v1alpha2", "kind": "ServerClass", "metadata": {"name": self.label},
                "spec": {"selector": {"matchLabels": {"e2e": self.run_id}},
                         "environmentRef": {"name": self.label},
                         "configPatches": [{"op": "add", "path": "/machine/install",
                                            "value": {"extraKernelArgs": ["woot"]}}]},
            })
            for api in apis:
                self.custom.patch_cluster_custom_object(METAL, "v1alpha2", "servers", api.machine.uuid, {
                    "metadata": {"labels": {"e2e": self.run_id}},
                    "spec": {"accepted": True, "managementApi": {"endpoint": api.endpoint},
                             "configPatches": [{"op": "add", "path": "/machine/network",
                                                "value": {"hostname": f"node-{api.machine.index}"}}]},
                })

        await threads.deferToThread(accept)

        def all_available() -> bool:
            available = (self.server_class().get("status") or {}).get("serversAvailable") or []
            return sorted(available) == sorted(self.machines_by_uuid) and all(
                (s.get("status") or {}).get("isClean") for s in self.servers().values())

        await self.wait("every server wiped and available in the class", all_available, timeout=120)
        return apis

    def bound_machines(self, count: int) -> list[dict[str, Any]] | None:
        """The live MetalMachines once exactly C{count} exist and each is bound and ready."""
        mms = self.live_metal_machines()
        if len(mms) != count:
            return None
        bindings = self.bindings()
        for mm in mms:
            server = ((mm.get("spec") or {}).get("serverRef") or {}).get("name")
            if not server or not (mm.get("status") or {}).get("ready") or server not in bindings:
                return None
            if bindings[server]["spec"]["metalMachineRef"]["name"] != mm["metadata"]["name"]:
                return None
        if len(bindings) != count:
            return None
        return mms

    def join_nodes(self, workload: Any, mms: list[dict[str, Any]]) -> None:
        """What each booted Talos node's kubelet does: register a Node with the uuid label the
        metadata server put into its config (no providerID: sidero sets it)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = workload.api_client()
        try:
            core = client.CoreV1Api(api)
            for mm in mms:
                server = mm["spec"]["serverRef"]["name"]
                try:
                    core.create_node({"apiVersion": "v1", "kind": "Node",
                                      "metadata": {"name": f"node-{self.machines_by_uuid[server].machine.index}",
                                                   "labels": {"metal.sidero.dev/uuid": server}}})
                except ApiException as e:
                    if e.status != 409:
                        raise
        finally:
            api.close()

    def released_and_clean(self, apis: list[PowerAPI], in_use: int) -> bool:
        servers = self.servers()
        available = (self.server_class().get("status") or {}).get("serversAvailable") or []
        used = [n for n, s in servers.items() if (s.get("status") or {}).get("inUse")]
        clean = [n for n, s in servers.items() if (s.get("status") or {}).get("isClean")]
        self.pending = {"in use": used, "clean": clean, "available": available}
        return len(used) == in_use and len(clean) == len(servers) - in_use and len(available) == len(servers) - in_use

    # --- the test -------------------------------------------------------------------------

    async def test_cluster_lifecycle(self) -> None:
        apis = await self.register_fleet()
        workload = await self.env.start_workload_cluster(self, self.ns, "c1")

        # Cluster + MetalCluster: sidero's MetalCluster controller makes the infrastructure ready.
        await self.make_cluster("c1", play_provider=False)
        mc = await threads.deferToThread(self.get, INFRA_GROUP, INFRA_VERSION, "metalclusters", "c1")
        self.assertIn("metalcluster.infrastructure.cluster.x-k8s.io", mc["metadata"]["finalizers"])

        # Two workers: each Machine's MetalMachine is bound to its own server of the class.
        md = await self.make_workers("c1", 2, server_class=self.label)
        mms = await self.wait("2 bound MetalMachines", lambda: self.bound_machines(2), timeout=120)
        servers = sorted(m["spec"]["serverRef"]["name"] for m in mms)
        self.assertEqual(len(set(servers)), 2)
        for mm in mms:
            server = mm["spec"]["serverRef"]["name"]
            self.assertEqual(mm["spec"]["providerID"], f"sidero://{server}")
            binding = (await threads.deferToThread(self.bindings))[server]
            self.assertEqual(binding["spec"]["serverClassRef"]["name"], self.label)
            self.assertEqual(binding["metadata"]["labels"][f"{CAPI_GROUP}/cluster-name"], "c1")

        # Each server is powered on with PXE once, boots Talos and fetches its own config: the
        # Machine's bootstrap data, the class and server patches, the node label.
        def configs_fetched() -> bool:
            return all(self.machines_by_uuid[s].talos_configs for s in servers)

        await self.wait("each allocated server to fetch its config", configs_fetched, timeout=60)
        self.assertEqual([a.errors for a in apis], [[]] * MACHINES)
        machines = {m["metadata"]["name"]: m for m in await threads.deferToThread(
            self.list, CAPI_GROUP, "v1beta1", "machines")}
        for mm in mms:
            server = mm["spec"]["serverRef"]["name"]
            status, body = self.machines_by_uuid[server].talos_configs[-1]
            self.assertEqual(status, 200, body)
            config = next(yaml.safe_load_all(body))
            self.assertEqual(config["machine"]["type"], "worker")
            self.assertEqual(config["machine"]["install"]["extraKernelArgs"], ["woot"])
            self.assertEqual(config["machine"]["network"]["hostname"],
                             f"node-{self.machines_by_uuid[server].machine.index}")
            self.assertEqual(config["machine"]["kubelet"]["extraArgs"]["node-labels"],
                             f"metal.sidero.dev/uuid={server}")
            owner = [o["name"] for o in mm["metadata"]["ownerReferences"] if o["kind"] == "Machine"][0]
            self.assertIn(owner, machines)

        # The nodes join the workload cluster; sidero sets their providerID; CAPI matches them.
        await threads.deferToThread(self.join_nodes, workload, mms)

        def provider_ids() -> dict[str, str] | None:
            from kubernetes import client

            api = workload.api_client()
            try:
                nodes = client.CoreV1Api(api).list_node().items
            finally:
                api.close()
            ids = {n.metadata.labels.get("metal.sidero.dev/uuid"): n.spec.provider_id for n in nodes}
            return ids if all(ids.get(s) == f"sidero://{s}" for s in servers) else None

        await self.wait("sidero to set the providerID on the workload Nodes", provider_ids, timeout=90)

        def node_refs() -> bool:
            ms = self.list(CAPI_GROUP, "v1beta1", "machines")
            return len(ms) == 2 and all((m.get("status") or {}).get("nodeRef") for m in ms)

        await self.wait("CAPI to match every Machine to its Node", node_refs, timeout=120)

        def provider_set() -> list[dict[str, Any]] | None:
            # sidero sets the Node's providerID, then writes the condition (a status write,
            # behind the client's rate limit), while CAPI matches the Node through the
            # MetalMachine's spec.providerID, written earlier: the condition may follow the
            # nodeRef by a moment (a run at QPS 20 saw it still False from an earlier
            # attempt, when the workload API server did not answer yet).
            mms = self.live_metal_machines()
            states = [[c["status"] for c in (m.get("status") or {}).get("conditions", [])
                       if c["type"] == "ProviderSet"] for m in mms]
            self.pending = states
            return mms if len(mms) == 2 and all(st == ["True"] for st in states) else None

        mms = await self.wait("ProviderSet True on every MetalMachine", provider_set, timeout=60)

        # sfyra TestMetalMachineServerRefReconcile: a cleared serverRef comes back the same.
        victim = mms[0]
        server_before = victim["spec"]["serverRef"]["name"]
        await threads.deferToThread(
            self.custom.patch_namespaced_custom_object, INFRA_GROUP, INFRA_VERSION, self.ns, "metalmachines",
            victim["metadata"]["name"], {"spec": {"serverRef": None}})

        def readopted() -> bool:
            mm = self.get(INFRA_GROUP, INFRA_VERSION, "metalmachines", victim["metadata"]["name"])
            return ((mm["spec"].get("serverRef") or {}).get("name")) == server_before

        await self.wait("the cleared serverRef to be re-adopted", readopted, timeout=60)
        self.assertEqual(len(await threads.deferToThread(self.bindings)), 2)

        # Scale up: a third server; scale down to one: two released, wiped, available again.
        def scale(replicas: int) -> None:
            self.custom.patch_namespaced_custom_object(
                CAPI_GROUP, "v1beta1", self.ns, "machinedeployments", md, {"spec": {"replicas": replicas}})

        await threads.deferToThread(scale, 3)
        await self.wait("3 bound MetalMachines", lambda: self.bound_machines(3), timeout=120)
        await threads.deferToThread(scale, 1)
        await self.wait("1 bound MetalMachine after scaling down", lambda: self.bound_machines(1), timeout=180)
        await self.wait("released servers wiped and back in the class",
                        lambda: self.released_and_clean(apis, in_use=1), timeout=120)
        # The agent marks the server wiped before it exits: let every boot in flight finish.
        await self.wait("every agent run to end", lambda: all(a.idle() is None for a in apis), timeout=60)
        wiped_again = [a for a in apis if sum(1 for r in a.machine.runs if r.wiped) >= 2]
        self.assertGreaterEqual(len(wiped_again), 2, "released servers were not wiped by their agents")

        # Deleting the Cluster releases everything.
        await threads.deferToThread(self.custom.delete_namespaced_custom_object,
                                    CAPI_GROUP, "v1beta1", self.ns, "clusters", "c1")

        def all_gone() -> bool:
            left = (self.list(INFRA_GROUP, INFRA_VERSION, "metalmachines")
                    + self.list(INFRA_GROUP, INFRA_VERSION, "metalclusters")
                    + self.list(CAPI_GROUP, "v1beta1", "clusters"))
            self.pending = [f'{o["kind"]}/{o["metadata"]["name"]}' for o in left]
            return not left and not self.bindings()

        await self.wait("the Cluster and every MetalMachine and binding to go", all_gone, timeout=180)
        await self.wait("every server wiped and available again",
                        lambda: self.released_and_clean(apis, in_use=0), timeout=120)
        self.assertNotIn("Traceback", self.sidero.log())
