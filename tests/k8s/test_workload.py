"""The workload cluster's Nodes through a kubeconfig (spec §2.6 step 13), on a real API server.

The shared test API server plays the workload cluster: Nodes are created there with the
C{metal.sidero.dev/uuid} label and L{WorkloadNodes} finds and patches them with the bytes of
its kubeconfig, as the MetalMachine controller does with the C{<cluster>-kubeconfig} Secret.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from sidero.k8s.workload import NODE_UUID_LABEL, ProviderIDError, WorkloadNodes
from tests.k8s.apiserver import KubeAPIServer, sharedAPIServer
from tests.k8s.support import make_pool


class WorkloadNodesTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.server: KubeAPIServer = await sharedAPIServer()
        self.kubeconfig = self.server.kubeconfig.read_bytes()
        self.nodes = WorkloadNodes(reactor, make_pool(self))
        self.uuid = str(uuid.uuid4())
        from kubernetes import client

        self.core = client.CoreV1Api(self.server.api_client())
        self.created: list[str] = []
        self.addCleanup(lambda: threads.deferToThread(self._delete_nodes))

    def _delete_nodes(self) -> None:
        for name in self.created:
            self.core.delete_node(name)

    def node(self, server_uuid: str, provider_id: str | None = None) -> str:
        name = f"node-{uuid.uuid4().hex[:10]}"
        body: dict[str, Any] = {"metadata": {"name": name, "labels": {NODE_UUID_LABEL: server_uuid}}}
        if provider_id:
            body["spec"] = {"providerID": provider_id}
        self.core.create_node(body)
        self.created.append(name)
        return name

    def provider_id_of(self, name: str) -> str | None:
        return self.core.read_node(name).spec.provider_id  # type: ignore[no-any-return]

    async def test_sets_provider_id(self) -> None:
        name = await threads.deferToThread(self.node, self.uuid)
        await self.nodes.set_provider_id(self.kubeconfig, self.uuid, f"sidero://{self.uuid}")
        self.assertEqual(await threads.deferToThread(self.provider_id_of, name), f"sidero://{self.uuid}")
        # Already set: nothing to do (and no error).
        await self.nodes.set_provider_id(self.kubeconfig, self.uuid, f"sidero://{self.uuid}")

    async def test_no_matching_node(self) -> None:
        with self.assertRaises(ProviderIDError) as e:
            await self.nodes.set_provider_id(self.kubeconfig, self.uuid, f"sidero://{self.uuid}")
        self.assertEqual(str(e.exception), "no matching nodes found")

    async def test_two_nodes_with_one_uuid(self) -> None:
        await threads.deferToThread(self.node, self.uuid)
        await threads.deferToThread(self.node, self.uuid)
        with self.assertRaises(ProviderIDError) as e:
            await self.nodes.set_provider_id(self.kubeconfig, self.uuid, f"sidero://{self.uuid}")
        self.assertEqual(str(e.exception), "multiple nodes found with same uuid label")

    async def test_immutable_provider_id_is_reported(self) -> None:
        """A Node with another providerID cannot be changed (the API server refuses): the
        error names the node, for the ProviderSet condition."""
        name = await threads.deferToThread(self.node, self.uuid, "other://x")
        with self.assertRaises(ProviderIDError) as e:
            await self.nodes.set_provider_id(self.kubeconfig, self.uuid, f"sidero://{self.uuid}")
        self.assertIn(f"failed to patch node {name}", str(e.exception))

    async def test_bad_kubeconfig(self) -> None:
        with self.assertRaises(ProviderIDError) as e:
            await self.nodes.set_provider_id(b"::: not yaml", self.uuid, "sidero://x")
        self.assertIn("invalid kubeconfig", str(e.exception))

    async def test_unreachable_cluster(self) -> None:
        broken = self.kubeconfig.replace(f"127.0.0.1:{self.server.port}".encode(), b"127.0.0.1:1")
        with self.assertRaises(ProviderIDError) as e:
            await self.nodes.set_provider_id(broken, self.uuid, "sidero://x")
        self.assertIn("failed to list nodes", str(e.exception))
