# -*- test-case-name: tests.controllers.test_capi_controllers -*-
"""MetalCluster controller (spec §2.5): ready once owned by a Cluster; the endpoint is the user's.

Unlike the Go controller, deletion does not wait for an owner Cluster (a MetalCluster whose
Cluster is gone could never be deleted otherwise), and CAPI pause is honoured.
"""

from __future__ import annotations

import copy

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sidero.api.registry import CAPI_CLUSTER, METAL_CLUSTER
from sidero.controllers.capi import is_paused, meta, owner_name
from sidero.controllers.patch import patch_changes
from sidero.controllers.runtime import (
    DEFAULT_REQUEUE_AFTER,
    Controller,
    ControllerManager,
    Result,
    split_key,
)
from sidero.store.errors import NotFound
from sidero.store.interfaces import IResourceStore

METAL_CLUSTER_FINALIZER = "metalcluster.infrastructure.cluster.x-k8s.io"


class MetalClusterReconciler:
    log = Logger()

    def __init__(self, store: IResourceStore) -> None:
        self.store = store

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        try:
            mc = await self.store.get(METAL_CLUSTER, name, namespace)
        except NotFound:
            return None
        if is_paused(mc):
            return None
        orig, obj = copy.deepcopy(mc), copy.deepcopy(mc)
        finalizers = list(meta(obj).get("finalizers") or [])
        if meta(mc).get("deletionTimestamp"):
            if METAL_CLUSTER_FINALIZER in finalizers:
                obj["metadata"]["finalizers"] = [f for f in finalizers if f != METAL_CLUSTER_FINALIZER]
                await patch_changes(self.store, METAL_CLUSTER, orig, obj, status=False)
            return None
        cluster_name = owner_name(mc, CAPI_CLUSTER.kind)
        if cluster_name is None:
            self.log.debug("MetalCluster {key} has no owner Cluster yet", key=key)
            return Result(requeue_after=DEFAULT_REQUEUE_AFTER)
        try:
            cluster = await self.store.get(CAPI_CLUSTER, cluster_name, namespace)
        except NotFound:
            return Result(requeue_after=DEFAULT_REQUEUE_AFTER)
        if is_paused(cluster):
            return None
        if METAL_CLUSTER_FINALIZER not in finalizers:
            obj["metadata"]["finalizers"] = [*finalizers, METAL_CLUSTER_FINALIZER]
        obj.setdefault("status", {})["ready"] = True
        await patch_changes(self.store, METAL_CLUSTER, orig, obj)
        return None


def make_metalcluster_controller(
    manager: ControllerManager, store: IResourceStore, clock: IReactorTime | None = None,
) -> Controller:
    reconciler = MetalClusterReconciler(store)
    controller = Controller("metalcluster", METAL_CLUSTER, reconciler.reconcile,
                            clock=clock if clock is not None else manager.clock)
    manager.add_controller(controller)
    return controller
