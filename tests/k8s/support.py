"""Helpers shared by the Kubernetes store tests: the shared server with sidero's CRDs, and a
ready L{KubernetesStore} on it."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from sidero.k8s.client import load_api_client
from sidero.k8s.store import KubernetesStore
from tests.k8s.apiserver import KubeAPIServer, crd_manifests, sharedAPIServer

_crds_applied: set[str] = set()


async def server_with_crds(server: KubeAPIServer | None = None) -> KubeAPIServer:
    """The shared server (or C{server}) once sidero's CRDs are Established on it."""
    if server is None:
        server = await sharedAPIServer()
    assert server.workdir is not None
    key = str(server.workdir)
    if key not in _crds_applied:
        paths = crd_manifests()
        if not paths:
            raise AssertionError("deploy/crds/*.yaml is missing: the store needs sidero's CRDs")
        await threads.deferToThread(server.apply_crds, paths)
        _crds_applied.add(key)
    return server


def make_pool(test: TestCase, name: str = "k8s-test") -> ThreadPool:
    """A started pool, stopped (joined off the reactor thread) at test cleanup."""
    pool = ThreadPool(minthreads=0, maxthreads=4, name=name)
    pool.start()
    test.addCleanup(lambda: threads.deferToThread(pool.stop))
    return pool


async def make_store(test: TestCase, server: KubeAPIServer, **kwargs: Any) -> KubernetesStore:
    """An opened store on C{server}, closed at test cleanup."""
    from twisted.internet import reactor

    api_client = load_api_client(str(server.kubeconfig))
    store = KubernetesStore(reactor, api_client, make_pool(test), **kwargs)
    test.addCleanup(lambda: defer.Deferred.fromCoroutine(store.close()))
    await store.open()
    return store
