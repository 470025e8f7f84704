# -*- test-case-name: tests.k8s.test_workload -*-
"""The workload cluster's Nodes, reached through the Cluster's C{<cluster>-kubeconfig} Secret.

The MetalMachine controller copies C{sidero://<server>} onto the Node that carries the label
C{metal.sidero.dev/uuid=<server>} (spec §2.6 step 13), as Cluster API's Machine controller then
matches Nodes to Machines by providerID.  Every call runs in the Kubernetes thread pool with a
time limit; clients are kept per kubeconfig so a reconcile does not re-read certificates.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from sidero.k8s.client import DEFAULT_REQUEST_TIMEOUT, request
from sidero.store import errors
from sidero.threads import run_in_pool

NODE_UUID_LABEL = "metal.sidero.dev/uuid"
#: seconds one whole provider-ID update may take (list + patch, with connection set-up).
CALL_LIMIT = 30.0
#: workload clusters whose clients are kept (least recently used dropped first).
MAX_CLIENTS = 64


class ProviderIDError(Exception):
    """The providerID could not be set; the message is what the ProviderSet condition says."""


class IWorkloadNodes(Interface):
    """Sets a Node's providerID in a workload cluster."""

    def set_provider_id(kubeconfig: bytes, server: str, provider_id: str) -> Deferred[None]:
        """Find the one Node labelled C{metal.sidero.dev/uuid=<server>} and make its
        C{spec.providerID} C{provider_id}.

        @raise ProviderIDError: with C{no matching nodes found},
            C{multiple nodes found with same uuid label}, or why the cluster could not be used.
        """


def _client_from_kubeconfig(kubeconfig: bytes) -> k8s_client.ApiClient:
    try:
        config = yaml.safe_load(kubeconfig)
    except yaml.YAMLError as e:
        raise ProviderIDError(f"invalid kubeconfig: {e}") from None
    if not isinstance(config, dict):
        raise ProviderIDError("invalid kubeconfig: not a mapping")
    configuration = k8s_client.Configuration()
    try:
        # Embedded certificates go to temporary files the client reads for its lifetime.
        k8s_config.kube_config.KubeConfigLoader(config_dict=config).load_and_set(configuration)
    except Exception as e:
        raise ProviderIDError(f"invalid kubeconfig: {e}") from None
    return k8s_client.ApiClient(configuration)


def set_provider_id_blocking(api_client: k8s_client.ApiClient, server: str, provider_id: str) -> None:
    """The synchronous work of L{IWorkloadNodes.set_provider_id} (runs in a pool thread)."""
    try:
        _, listing = request(
            api_client, "GET", "/api/v1/nodes",
            query=[("labelSelector", f"{NODE_UUID_LABEL}={server}")], timeout=DEFAULT_REQUEST_TIMEOUT,
        )
    except errors.StoreError as e:
        raise ProviderIDError(f"failed to list nodes: {e}") from None
    nodes = (listing or {}).get("items") or []
    if not nodes:
        raise ProviderIDError("no matching nodes found")
    if len(nodes) > 1:
        raise ProviderIDError("multiple nodes found with same uuid label")
    node = nodes[0]
    if (node.get("spec") or {}).get("providerID") == provider_id:
        return
    name = (node.get("metadata") or {}).get("name", "")
    try:
        request(
            api_client, "PATCH", f"/api/v1/nodes/{name}",
            body={"spec": {"providerID": provider_id}},
            content_type="application/merge-patch+json", timeout=DEFAULT_REQUEST_TIMEOUT,
        )
    except errors.StoreError as e:
        raise ProviderIDError(f"failed to patch node {name}: {e}") from None


@implementer(IWorkloadNodes)
class WorkloadNodes:
    """L{IWorkloadNodes} with the official client, in C{pool}."""

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool, call_limit: float = CALL_LIMIT) -> None:
        self.reactor = reactor
        self.pool = pool
        self.call_limit = call_limit
        self._clients: OrderedDict[str, k8s_client.ApiClient] = OrderedDict()
        self._lock = threading.Lock()  # pool threads share the client cache

    def _client(self, kubeconfig: bytes) -> k8s_client.ApiClient:
        key = hashlib.sha256(kubeconfig).hexdigest()
        with self._lock:
            return self._client_locked(key, kubeconfig)

    def _client_locked(self, key: str, kubeconfig: bytes) -> k8s_client.ApiClient:
        client = self._clients.get(key)
        if client is None:
            client = _client_from_kubeconfig(kubeconfig)
            self._clients[key] = client
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(key)
        return client

    def set_provider_id(self, kubeconfig: bytes, server: str, provider_id: str) -> Deferred[None]:
        def work() -> None:
            set_provider_id_blocking(self._client(kubeconfig), server, provider_id)

        d: Deferred[Any] = run_in_pool(
            self.reactor, self.pool, self.call_limit, "workload cluster call", work)
        return d
