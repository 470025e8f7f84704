"""The store contract, unchanged, against L{KubernetesStore} on a real kube-apiserver.

The shared server runs kube-controller-manager's garbage collector beside it, so the garbage
collection tests run against the real collector (the contract's waits allow for its 30 s
resource rediscovery after the CRDs appear). Skips loudly (see
L{tests.k8s.apiserver.require_binary}) when no kube-apiserver binary exists.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from sidero.store.interfaces import IResourceStore
from tests.k8s.support import make_store, server_with_crds
from tests.store.contract import StoreContractTests


class KubernetesStoreContractTests(StoreContractTests, TestCase):
    """Every store contract test, against a real API server with sidero's CRDs."""

    # Above the contract's garbage-collection waits, so a slow collector fails with their message.
    timeout = 240

    def makeStore(self) -> Deferred[IResourceStore]:
        async def make() -> IResourceStore:
            server = await server_with_crds()
            return await make_store(self, server)

        return Deferred.fromCoroutine(make())
