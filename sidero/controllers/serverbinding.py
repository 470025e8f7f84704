# -*- test-case-name: tests.controllers.test_capi_controllers -*-
"""ServerBinding controller (spec §2.7), and the release of bindings nothing holds any more.

C{status.ready} says whether the Server of the same name exists.  Beyond the Go controller, a
binding is deleted (its server released, then wiped) when it has been an orphan for
C{orphan_grace} seconds: its MetalMachine is gone, or that MetalMachine's C{serverRef} names a
different server (a duplicate).  The MetalMachine controller never leaves such bindings behind
itself; this is the safety net for objects edited or deleted by hand.  The grace period, the
cluster's pause (set by C{clusterctl move}, which may create bindings before their MetalMachines)
and reading the MetalMachine from the store, not a cache, keep it from releasing a server in use.
"""

from __future__ import annotations

import copy

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sidero.api import conditions
from sidero.api.registry import CAPI_CLUSTER, METAL_MACHINE, SERVER, SERVER_BINDING, ResourceType
from sidero.controllers.capi import CLUSTER_NAME_LABEL, is_paused, meta, metal_machine_key, name_of
from sidero.controllers.events import CAPS_CONTROLLER_MANAGER, EventRecorder
from sidero.controllers.informer import Informer
from sidero.controllers.patch import patch_changes
from sidero.controllers.runtime import Controller, ControllerManager, Result, split_key
from sidero.store.errors import NotFound
from sidero.store.interfaces import IResourceStore, Object

#: how long a binding must have existed before it can be released as an orphan.
DEFAULT_ORPHAN_GRACE = 300.0
REASON_ALLOCATION = "Server Allocation"
#: informer index of ServerBindings by the C{namespace/name} of their MetalMachine.
BY_METAL_MACHINE = "metalMachineRef"


class ServerBindingReconciler:
    log = Logger()

    def __init__(
        self, store: IResourceStore, clock: IReactorTime, recorder: EventRecorder,
        orphan_grace: float | None = DEFAULT_ORPHAN_GRACE,
        bindings: Informer | None = None, servers: Informer | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.recorder = recorder
        self.orphan_grace = orphan_grace
        #: the ServerBinding and Server informers, read once synced as Sidero's cached client
        #: reads them (None: the store).  Every Server event reconciles the binding of that
        #: name, and most servers have none: from the cache that costs no request, where a
        #: GET answering 404 per agent heartbeat spent the client's rate limit.
        self.bindings = bindings
        self.servers = servers

    async def _cached_or_get(self, informer: Informer | None, kind: ResourceType,
                             name: str) -> Object | None:
        if informer is not None and informer.has_synced:
            return informer.get(name)
        return await self._get(kind, name)

    async def _get(self, kind: ResourceType, name: str, namespace: str | None = None) -> Object | None:
        try:
            return await self.store.get(kind, name, namespace)
        except NotFound:
            return None

    async def reconcile(self, key: str) -> Result | None:
        _, name = split_key(key)
        binding = await self._cached_or_get(self.bindings, SERVER_BINDING, name)
        if binding is None or meta(binding).get("deletionTimestamp"):
            return None
        server = await self._cached_or_get(self.servers, SERVER, name)
        obj = copy.deepcopy(binding)
        obj.setdefault("status", {})["ready"] = server is not None
        written = await patch_changes(self.store, SERVER_BINDING, binding, obj)
        if written is None or self.orphan_grace is None:
            return None
        return await self._release_orphan(written, server)

    async def _orphaned_because(self, binding: Object) -> str | None:
        ref = (binding.get("spec") or {}).get("metalMachineRef") or {}
        namespace, mm_name = str(ref.get("namespace") or ""), str(ref.get("name") or "")
        cluster_name = (meta(binding).get("labels") or {}).get(CLUSTER_NAME_LABEL)
        if cluster_name and namespace and is_paused(await self._get(CAPI_CLUSTER, cluster_name, namespace)):
            return None
        mm = await self._get(METAL_MACHINE, mm_name, namespace) if mm_name and namespace else None
        if mm is None:
            return f'metal machine "{namespace}/{mm_name}" does not exist'
        if is_paused(mm):
            return None
        pinned = ((mm.get("spec") or {}).get("serverRef") or {}).get("name")
        if pinned and pinned != name_of(binding):
            return f'metal machine "{namespace}/{mm_name}" uses server "{pinned}"'
        return None

    async def _release_orphan(self, binding: Object, server: Object | None) -> Result | None:
        assert self.orphan_grace is not None
        created = conditions.parse_rfc3339(str(meta(binding).get("creationTimestamp") or ""))
        age = self.clock.seconds() - created if created is not None else self.orphan_grace
        if age < self.orphan_grace:
            # Too young to release whatever it is: look again when it is not (the reads of
            # its MetalMachine and Cluster wait until then).
            return Result(requeue_after=self.orphan_grace - age + 1.0)
        why = await self._orphaned_because(binding)
        if why is None:
            return None
        name = name_of(binding)
        try:
            await self.store.delete(SERVER_BINDING, name,
                                    resource_version=str(meta(binding).get("resourceVersion") or "") or None)
        except NotFound:
            return None
        message = f"Server released: its binding was orphaned ({why})."
        self.log.warn("ServerBinding {name} released: {why}", name=name, why=why)
        if server is not None:
            self.recorder.warning(server, REASON_ALLOCATION, message)
        return None


def make_serverbinding_controller(
    manager: ControllerManager, store: IResourceStore, clock: IReactorTime | None = None,
    recorder: EventRecorder | None = None, orphan_grace: float | None = DEFAULT_ORPHAN_GRACE,
) -> Controller:
    clock = clock if clock is not None else manager.clock
    if recorder is None:
        recorder = EventRecorder(store, clock, component=CAPS_CONTROLLER_MANAGER)
    reconciler = ServerBindingReconciler(store, clock, recorder, orphan_grace,
                                         bindings=manager.informer(SERVER_BINDING),
                                         servers=manager.informer(SERVER))
    controller = Controller("serverbinding", SERVER_BINDING, reconciler.reconcile, clock=clock)
    controller.watches(SERVER, lambda server: [name_of(server)])

    def machine_to_bindings(mm: Object) -> list[str]:
        # A MetalMachine deleted or re-pointed may orphan bindings: look at the ones naming it.
        key = f"{meta(mm).get('namespace') or ''}/{name_of(mm)}"
        return [name_of(b) for b in controller.primary.by_index(BY_METAL_MACHINE, key)]

    controller.watches(METAL_MACHINE, machine_to_bindings)
    manager.add_controller(controller)
    controller.primary.add_index(BY_METAL_MACHINE, lambda b: [k for k in [metal_machine_key(b)] if k])
    return controller
