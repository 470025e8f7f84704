"""The README walkthrough "A first Talos node with no cluster": the embedded store, no Cluster API.

The real C{twistd sidero} (embedded store) and real agents behind the HTTP power API: machines
register and are accepted and wiped; then the sample manifests of C{deploy/samples/standalone}
(a bootstrap Secret and a MetalMachine naming it) are applied with the C{sidero} CLI exactly as
the README says.  sidero binds a server, powers it on with PXE once, answers its C{/ipxe} with the
Talos environment and its C{/configdata} with the Secret's config, patched and labelled.  Deleting
the MetalMachine releases the server: wiped by its agent, clean, off and available again.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Any

import yaml
from twisted.internet.threads import deferToThread

from sidero.api.registry import METAL_MACHINE, SERVER, SERVER_BINDING, SERVER_CLASS
from tests.integration.lifecycle_support import (
    Machine,
    PowerAPI,
    boot_agent,
    serve_power_api,
    serve_talos_assets,
    talos_environment,
)
from tests.integration.test_lifecycle import LifecycleTestCase, new_uuid, reactor, table
from tests.paths import REPO

SAMPLES = str(REPO / "deploy" / "samples" / "standalone")
MACHINES = 2


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class StandaloneClusterTests(LifecycleTestCase):
    timeout = 240

    async def test_first_node_without_cluster_api(self) -> None:
        # The simulated machines' "Talos" fetches /configdata from loopback, not from the
        # addresses their agents registered (recorded sysfs), as nodes behind one NAT address
        # would: the relaxation an operator would configure for that.
        sidero = self.start_sidero("--configdata-trusted-networks", "127.0.0.0/8")
        await self.wait_for("sidero to be ready", sidero.ready, 60)
        port, assets = serve_talos_assets(reactor)
        self.addCleanup(port.stopListening)
        machines = [Machine(uuid=new_uuid(), index=30 + i, work=os.path.join(self.work, f"m{i}"))
                    for i in range(MACHINES)]
        apis = []
        for machine in machines:
            await deferToThread(machine.make)
            api = PowerAPI(machine, sidero.endpoint, powered=False, follow_ipxe=True)
            port = serve_power_api(reactor, api)
            self.addCleanup(port.stopListening)
            api.endpoint = f"127.0.0.1:{port.getHost().port}"
            apis.append(api)
            await boot_agent(machine, sidero.endpoint)

        # The operator accepts the machines (with their power API and a config patch each) and
        # adds a Talos Environment from a local mirror.
        manifest = os.path.join(self.work, "accept.yaml")
        docs: list[dict[str, Any]] = [talos_environment("lab", assets)]
        for api in apis:
            docs.append({
                "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                "metadata": {"name": api.machine.uuid},
                "spec": {"accepted": True, "managementApi": {"endpoint": api.endpoint},
                         "environmentRef": {"name": "lab"},
                         "configPatches": [{"op": "add", "path": "/machine/network",
                                            "value": {"hostname": f"lab-{api.machine.index}"}}]},
            })
        with open(manifest, "w") as f:
            yaml.safe_dump_all(docs, f)
        applied = await deferToThread(sidero.cli, "apply", "-f", manifest)
        self.assertEqual(applied.returncode, 0, applied.stderr)

        def all_clean() -> bool:
            servers = {s["metadata"]["name"]: s.get("status") or {} for s in sidero.items(SERVER)}
            available = (sidero.get(SERVER_CLASS, "any").get("status") or {}).get("serversAvailable") or []
            self.pending = {"servers": servers, "any": available}
            return all(servers[m.uuid].get("isClean") for m in machines) and len(available) == MACHINES

        await self.wait_for("the machines to be wiped and available", all_clean, 60)
        await self.wait_for("every agent run to end", lambda: all(a.idle() is None for a in apis), 60)

        # The README's walkthrough: apply the two sample files as they are.
        applied = await deferToThread(sidero.cli, "apply", "-f", SAMPLES)
        self.assertEqual(applied.returncode, 0, applied.stderr)
        self.assertIn("metalmachine.infrastructure.cluster.x-k8s.io/lab-cp-0 created", applied.stdout)

        def bound() -> dict[str, Any] | None:
            mm = sidero.get(METAL_MACHINE, "lab-cp-0", "default")
            self.pending = mm.get("status")
            return mm if (mm.get("status") or {}).get("ready") else None

        mm = await self.wait_for("the MetalMachine to be bound", bound, 30)
        server_name = mm["spec"]["serverRef"]["name"]
        self.assertEqual(mm["spec"]["providerID"], f"sidero://{server_name}")
        self.assertIn(server_name, [m.uuid for m in machines])
        api = [a for a in apis if a.machine.uuid == server_name][0]
        binding = await deferToThread(sidero.get, SERVER_BINDING, server_name)
        self.assertEqual(binding["spec"]["metalMachineRef"]["name"], "lab-cp-0")
        self.assertEqual(binding["spec"]["serverClassRef"]["name"], "any")
        listed = await deferToThread(sidero.cli, "get", "metalmachines", "-o", "wide")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual([(r["NAME"], r["READY"], r["SERVER"]) for r in table(listed.stdout)],
                         [("lab-cp-0", "true", server_name)], listed.stdout)

        # The allocated server is powered on with PXE once; its firmware chains to /ipxe, which
        # boots Talos (not the agent), and Talos fetches its config.
        await self.wait_for("the server to boot Talos and fetch its config",
                            lambda: api.powered and api.talos_configs, 30)
        self.assertEqual(api.talos_configs[0][0], 200, api.talos_configs)
        status, body = await deferToThread(
            http_get, f"http://{sidero.endpoint}/ipxe?uuid={server_name}&mac=52-54-00-00-00-1e&arch=x86_64")
        self.assertEqual(status, 200, body)
        self.assertIn(b"/env/lab/vmlinuz", body)
        self.assertNotIn(b"agent", body)
        self.assertIn(f"talos.config=http://{sidero.endpoint}/configdata?uuid=".encode(), body)

        # Talos fetches its config: the Secret's, with the Server's patch, the node label and
        # the SideroLink documents.
        status, body = await deferToThread(http_get, f"http://{sidero.endpoint}/configdata?uuid={server_name}")
        self.assertEqual(status, 200, body)
        self.assertEqual(body, api.talos_configs[0][1])
        config, *others = list(yaml.safe_load_all(body))
        self.assertEqual(config["machine"]["type"], "controlplane")
        self.assertEqual(config["cluster"]["clusterName"], "lab")
        self.assertEqual(config["machine"]["network"]["hostname"], f"lab-{api.machine.index}")
        self.assertEqual(config["machine"]["kubelet"]["extraArgs"],
                         {"rotate-server-certificates": "true",
                          "node-labels": f"metal.sidero.dev/uuid={server_name}"})
        kinds = [d.get("kind") for d in others]
        self.assertEqual(kinds, ["SideroLinkConfig", "EventSinkConfig", "KmsgLogConfig"])
        self.assertEqual(others[0]["apiUrl"], f"grpc://{sidero.endpoint}")

        other = [m.uuid for m in machines if m.uuid != server_name][0]
        status, body = await deferToThread(http_get, f"http://{sidero.endpoint}/configdata?uuid={other}")
        self.assertEqual(status, 404)
        self.assertTrue(body.startswith(b"server is not allocated (missing serverbinding)"), body)

        # Releasing: delete the MetalMachine; the server is wiped by its agent and returns.
        deleted = await deferToThread(sidero.cli, "delete", "metalmachine", "lab-cp-0")
        self.assertEqual(deleted.returncode, 0, deleted.stderr)

        def released() -> bool:
            st = sidero.get(SERVER, server_name).get("status") or {}
            available = (sidero.get(SERVER_CLASS, "any").get("status") or {}).get("serversAvailable") or []
            self.pending = {"status": st, "any": available}
            return (not sidero.items(METAL_MACHINE, "default") and bool(st.get("isClean"))
                    and not st.get("inUse") and server_name in available)

        await self.wait_for("the released server to be wiped and available again", released, 90)
        self.assertTrue(any(r.wiped for r in api.machine.runs[1:]), "the released server was not wiped")
        self.assertEqual(api.errors, [])
        self.assertTrue(api.machine.disk_head_is_zero())
