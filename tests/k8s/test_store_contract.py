"""The store contract, unchanged, against L{KubernetesStore} on a real kube-apiserver.

Skips loudly (see L{tests.k8s.apiserver.require_binary}) when no kube-apiserver binary exists.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from sidero.store.interfaces import IResourceStore
from tests.k8s.support import make_store, server_with_crds
from tests.store.contract import StoreContractTests

NO_GC = (
    "SKIPPED: needs kube-controller-manager's garbage collector, which the test kube-apiserver "
    "fixture (tests/k8s/apiserver.py, tools/kube-apiserver) does not run; KubernetesStore "
    "itself does no garbage collection by design"
)


class KubernetesStoreContractTests(StoreContractTests, TestCase):
    """Every store contract test, against a real API server with sidero's CRDs."""

    timeout = 120

    def makeStore(self) -> Deferred[IResourceStore]:
        async def make() -> IResourceStore:
            server = await server_with_crds()
            return await make_store(self, server)

        return Deferred.fromCoroutine(make())

    # Garbage collection belongs to kube-controller-manager, absent from the fixture.
    async def test_gc_deletes_dependents(self) -> None:
        """Removing an owner removes its dependents (needs kube-controller-manager)."""
        await super().test_gc_deletes_dependents()

    test_gc_deletes_dependents.skip = NO_GC  # type: ignore[attr-defined]

    async def test_gc_waits_for_every_owner(self) -> None:
        """A dependent with two owners stays while one is left (needs kube-controller-manager)."""
        await super().test_gc_waits_for_every_owner()

    test_gc_waits_for_every_owner.skip = NO_GC  # type: ignore[attr-defined]

    async def test_gc_honours_dependent_finalizers(self) -> None:
        """A collected dependent with a finalizer waits for it (needs kube-controller-manager)."""
        await super().test_gc_honours_dependent_finalizers()

    test_gc_honours_dependent_finalizers.skip = NO_GC  # type: ignore[attr-defined]

