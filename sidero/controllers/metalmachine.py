# -*- test-case-name: tests.controllers.test_metalmachine -*-
"""MetalMachine controller (spec §2.6): bind a Cluster API Machine to a Server.

A ServerBinding named after the Server is what allocates it, so the store's name uniqueness is
what makes a server impossible to bind twice: of two MetalMachines racing for one server, the
second create fails with AlreadyExists and tries the next.  Everything else is about surviving a
crash at any point:

* the MetalMachine is read from the store, never a cache (a stale copy without C{serverRef}
  would allocate a second server);
* the finalizer is written before a binding is created, so a MetalMachine cannot vanish and
  leave its binding behind;
* before allocating, the bindings are listed from the store and one that already names this
  MetalMachine is re-adopted (a crash between creating the binding and recording
  C{spec.serverRef}); the MetalMachine's own patch carries its resourceVersion.

Where the Go controller is fragile this one differs, compatibly: deletion does not wait for the
Machine and Cluster (it only releases what this MetalMachine holds), a C{serverRef} naming a server
bound to another MetalMachine is refused with a condition instead of being adopted, the binding
created for a C{serverRef} is used at once (no NotFound re-run), CAPI pause is honoured, and a
missing class or server is a C{ServerAllocated} condition with its reason rather than an error
loop.  A MetalMachine with no owner Machine but the C{metal.sidero.dev/bootstrap-data-secret}
annotation is a standalone allocation (a lab without Cluster API).
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sidero.api import conditions
from sidero.api.registry import (
    CAPI_CLUSTER,
    CAPI_MACHINE,
    METAL_MACHINE,
    SECRET,
    SERVER,
    SERVER_BINDING,
    SERVER_CLASS,
)
from sidero.controllers.capi import (
    CLUSTER_NAME_LABEL,
    binding_belongs_to,
    is_paused,
    meta,
    metal_machine_key,
    name_of,
    namespace_of,
    owner_name,
)
from sidero.controllers.events import CAPS_CONTROLLER_MANAGER, EventRecorder
from sidero.controllers.informer import Informer
from sidero.controllers.patch import patch_changes
from sidero.controllers.runtime import (
    DEFAULT_REQUEUE_AFTER,
    Controller,
    ControllerManager,
    ReconcileError,
    Result,
    split_key,
)
from sidero.k8s.workload import IWorkloadNodes, ProviderIDError
from sidero.store.errors import AlreadyExists, BadRequest, NotFound
from sidero.store.interfaces import IResourceStore, Object

METAL_MACHINE_FINALIZER = "metalmachine.infrastructure.cluster.x-k8s.io"
#: sidero's extension: the bootstrap Secret of a MetalMachine that has no owner Machine.
BOOTSTRAP_SECRET_ANNOTATION = "metal.sidero.dev/bootstrap-data-secret"
PROVIDER_ID_PREFIX = "sidero://"

PROVIDER_SET = "ProviderSet"
REASON_PROVIDER_UPDATE_FAILED = "ProviderUpdateFailed"

#: sidero's condition saying why a MetalMachine has no server (absent from the Go controller).
SERVER_ALLOCATED = "ServerAllocated"
REASON_NO_REFERENCE = "NoServerReference"
REASON_CLASS_NOT_FOUND = "ServerClassNotFound"
REASON_SERVER_NOT_FOUND = "ServerNotFound"
REASON_NO_SERVER_AVAILABLE = "NoServerAvailable"
REASON_BOUND_ELSEWHERE = "ServerBoundElsewhere"

REASON_ALLOCATION = "Server Allocation"

#: Seconds a server this process began to bind is skipped by its other reconciles (long
#: enough for the new binding to reach the cache).
CLAIM_SECONDS = 30.0
REASON_ASSIGNMENT = "Server Assignment"


def provider_id(server: str) -> str:
    return PROVIDER_ID_PREFIX + server


def machine_addresses(binding: Object) -> list[dict[str, str]]:
    """§2.6 step 12: the binding's addresses as InternalIP, then its hostname."""
    spec = binding.get("spec") or {}
    out = [{"type": "InternalIP", "address": str(a)} for a in spec.get("addresses") or []]
    if spec.get("hostname"):
        out.append({"type": "Hostname", "address": str(spec["hostname"])})
    return out


def object_reference(obj: Object, full: bool = True) -> dict[str, str]:
    ref = {"kind": str(obj.get("kind") or ""), "name": name_of(obj)}
    if full:
        ref["apiVersion"] = str(obj.get("apiVersion") or "")
        ref["uid"] = str(meta(obj).get("uid") or "")
        ref["resourceVersion"] = str(meta(obj).get("resourceVersion") or "")
    return {k: v for k, v in ref.items() if v}


def new_binding(metal_machine: Object, server: str, server_class: Object | None) -> Object:
    """The ServerBinding allocating C{server} to C{metal_machine} (§2.6 step 9)."""
    mm_meta = meta(metal_machine)
    spec: dict[str, Any] = {
        "metalMachineRef": {
            "kind": METAL_MACHINE.kind, "uid": str(mm_meta.get("uid") or ""),
            "namespace": namespace_of(metal_machine), "name": name_of(metal_machine),
        },
    }
    if server_class is not None:
        spec["serverClassRef"] = object_reference(server_class)
    binding_meta: dict[str, Any] = {"name": server}
    if mm_meta.get("labels"):
        binding_meta["labels"] = dict(mm_meta["labels"])
    return {"apiVersion": SERVER_BINDING.api_version, "kind": SERVER_BINDING.kind,
            "metadata": binding_meta, "spec": spec}


class _Wait(Exception):
    """Stop this pass: the MetalMachine is patched and the key requeued after C{delay}."""

    def __init__(self, delay: float | None = DEFAULT_REQUEUE_AFTER) -> None:
        self.delay = delay


class MetalMachineReconciler:
    """Reconcile one MetalMachine by C{namespace/name} (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        store: IResourceStore,
        recorder: EventRecorder,
        clock: IReactorTime,
        workload: IWorkloadNodes | None = None,
        bindings: Informer | None = None,
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.clock = clock
        self.workload = workload
        #: the ServerBinding informer, to skip candidates already bound (None: try each).
        self.bindings = bindings
        #: server name -> when a reconcile of this process began to bind it (see L{_skip}).
        self._claimed: dict[str, float] = {}

    async def _get(self, kind: Any, name: str, namespace: str | None = None) -> Object | None:
        try:
            return await self.store.get(kind, name, namespace)
        except NotFound:
            return None

    async def reconcile(self, key: str) -> Result | None:
        namespace, name = split_key(key)
        mm = await self._get(METAL_MACHINE, name, namespace)
        if mm is None:
            return None
        if is_paused(mm):
            self.log.debug("MetalMachine {key} is paused", key=key)
            return None
        machine_name = owner_name(mm, CAPI_MACHINE.kind)
        machine = None
        if machine_name is not None:
            machine = await self._get(CAPI_MACHINE, machine_name, namespace)
        labels = meta(machine if machine is not None else mm).get("labels") or {}
        cluster_name = str(labels.get(CLUSTER_NAME_LABEL) or "")
        cluster = await self._get(CAPI_CLUSTER, cluster_name, namespace) if cluster_name else None
        if is_paused(cluster):
            self.log.debug("MetalMachine {key}: cluster {cluster} is paused", key=key, cluster=cluster_name)
            return None

        orig = copy.deepcopy(mm)
        obj = copy.deepcopy(mm)
        if meta(mm).get("deletionTimestamp"):
            return await self._reconcile_delete(orig, obj)

        # §2.6 steps 2-5: wait for Cluster API to get the Machine ready for infrastructure.
        if machine_name is None:
            if not meta(mm).get("annotations", {}).get(BOOTSTRAP_SECRET_ANNOTATION):
                self.log.debug("MetalMachine {key} has no owner Machine yet", key=key)
                return Result(requeue_after=DEFAULT_REQUEUE_AFTER)
        else:
            if machine is None:
                self.log.debug("MetalMachine {key}: owner Machine {machine} not found", key=key,
                               machine=machine_name)
                return Result(requeue_after=DEFAULT_REQUEUE_AFTER)
            if cluster is None:
                raise ReconcileError("no cluster label or cluster does not exist")
            if not (cluster.get("status") or {}).get("infrastructureReady"):
                return Result(requeue_after=DEFAULT_REQUEUE_AFTER)
            if not ((machine.get("spec") or {}).get("bootstrap") or {}).get("dataSecretName"):
                return Result(requeue_after=DEFAULT_REQUEUE_AFTER)

        # The finalizer is stored before any binding exists (see the module docstring).
        finalizers = list(meta(obj).get("finalizers") or [])
        if METAL_MACHINE_FINALIZER not in finalizers:
            obj["metadata"]["finalizers"] = [*finalizers, METAL_MACHINE_FINALIZER]
            written = await patch_changes(self.store, METAL_MACHINE, orig, obj, status=False)
            if written is None:
                return None
            orig = copy.deepcopy(written)
            obj = copy.deepcopy(written)

        try:
            delay = await self._reconcile_normal(obj, cluster_name or None)
        except _Wait as wait:
            delay = wait.delay
        finally:
            await patch_changes(self.store, METAL_MACHINE, orig, obj)
        return Result(requeue_after=delay) if delay else None

    # -- allocation ----------------------------------------------------------------------------

    def _allocation_failed(self, obj: Object, reason: str, severity: str, message: str,
                           delay: float | None = DEFAULT_REQUEUE_AFTER) -> _Wait:
        conditions.mark_false(obj, SERVER_ALLOCATED, reason, severity, message, self.clock.seconds())
        self.log.info("MetalMachine {namespace}/{name}: {message}", namespace=namespace_of(obj),
                      name=name_of(obj), message=message, reason=reason)
        return _Wait(delay)

    async def _owned_bindings(self, obj: Object) -> list[Object]:
        """Bindings naming this MetalMachine, read from the store (oldest first).

        The store filters them (a field selector on C{spec.metalMachineRef}, which the CRD
        declares selectable): one allocation no longer reads every binding of the fleet.  An
        API server that does not know the field (Kubernetes before 1.31, or CRDs of an older
        sidero) answers BadRequest, and then every binding is listed as before.
        """
        selector = (f"spec.metalMachineRef.namespace={namespace_of(obj)},"
                    f"spec.metalMachineRef.name={name_of(obj)}")
        try:
            listing = await self.store.list(SERVER_BINDING, field_selector=selector)
        except BadRequest:
            listing = await self.store.list(SERVER_BINDING)
        owned = [b for b in listing.items if binding_belongs_to(b, obj)]
        owned.sort(key=lambda b: (str(meta(b).get("creationTimestamp") or ""), name_of(b)))
        return owned

    def _skip(self, server_name: str) -> bool:
        """Whether a candidate is certainly taken, from what this process already knows: its
        binding is in the cache, or another reconcile here began to bind it moments ago.

        Only a shortcut (the class's C{serversAvailable} lags behind allocations, and ten
        reconciles at once would otherwise all try its first servers): the store's refusal of a
        second binding of one name is still what makes a server impossible to bind twice.  A
        server skipped wrongly is tried on the next pass.
        """
        claimed = self._claimed.get(server_name)
        if claimed is not None:
            if self.clock.seconds() - claimed < CLAIM_SECONDS:
                return True
            del self._claimed[server_name]
        if len(self._claimed) > 10_000:  # a bound: forget claims too old to matter
            now = self.clock.seconds()
            self._claimed = {k: t for k, t in self._claimed.items() if now - t < CLAIM_SECONDS}
        return (self.bindings is not None and self.bindings.has_synced
                and self.bindings.get(server_name) is not None)

    async def _allocate(self, obj: Object) -> Object:
        """Find or create this MetalMachine's binding through its ServerClass."""
        spec = obj.get("spec") or {}
        owned = await self._owned_bindings(obj)
        if owned:
            self.log.info("MetalMachine {namespace}/{name}: reconciled missing server ref {server}",
                          namespace=namespace_of(obj), name=name_of(obj), server=name_of(owned[0]))
            return owned[0]
        class_ref = spec.get("serverClassRef") or {}
        class_name = str(class_ref.get("name") or "")
        if not class_name:
            raise self._allocation_failed(
                obj, REASON_NO_REFERENCE, conditions.SEVERITY_ERROR,
                "either a server or serverclass ref must be supplied", delay=None)
        server_class = await self._get(SERVER_CLASS, class_name)
        if server_class is None:
            raise self._allocation_failed(
                obj, REASON_CLASS_NOT_FOUND, conditions.SEVERITY_ERROR,
                f'serverclasses.metal.sidero.dev "{class_name}" not found')
        available = list((server_class.get("status") or {}).get("serversAvailable") or [])
        for server_name in map(str, available):
            if self._skip(server_name):
                continue
            self._claimed[server_name] = self.clock.seconds()
            server = await self._get(SERVER, server_name)
            status = (server or {}).get("status") or {}
            if server is None or status.get("inUse") or not status.get("isClean"):
                self._claimed.pop(server_name, None)
                continue
            try:
                binding = await self.store.create(new_binding(obj, server_name, server_class))
            except AlreadyExists:
                continue  # another MetalMachine won this one
            except BaseException:
                self._claimed.pop(server_name, None)
                raise
            self.recorder.normal(
                server, REASON_ALLOCATION,
                f'Server is allocated via serverclass "{class_name}" for metal machine "{name_of(obj)}".')
            self.log.info("MetalMachine {namespace}/{name}: allocated server {server} from class {cls}",
                          namespace=namespace_of(obj), name=name_of(obj), server=server_name, cls=class_name)
            return binding
        raise self._allocation_failed(
            obj, REASON_NO_SERVER_AVAILABLE, conditions.SEVERITY_WARNING,
            f'no server available in serverclass "{class_name}"')

    async def _pinned(self, obj: Object, server_name: str) -> Object:
        """The binding for a C{serverRef} set by the user (§2.6 step 10), created if needed."""
        binding = await self._get(SERVER_BINDING, server_name)
        if binding is None:
            server = await self._get(SERVER, server_name)
            if server is None:
                raise self._allocation_failed(
                    obj, REASON_SERVER_NOT_FOUND, conditions.SEVERITY_ERROR,
                    f'servers.metal.sidero.dev "{server_name}" not found')
            try:
                binding = await self.store.create(new_binding(obj, server_name, None))
            except AlreadyExists:
                binding = await self._get(SERVER_BINDING, server_name)
                if binding is None:
                    raise _Wait(DEFAULT_REQUEUE_AFTER) from None
            else:
                self.recorder.normal(
                    server, REASON_ASSIGNMENT,
                    f'Server as assigned via serverRef for metal machine "{name_of(obj)}".')
        if not binding_belongs_to(binding, obj):
            ref = (binding.get("spec") or {}).get("metalMachineRef") or {}
            raise self._allocation_failed(
                obj, REASON_BOUND_ELSEWHERE, conditions.SEVERITY_ERROR,
                f'server "{server_name}" is bound to metal machine '
                f'"{ref.get("namespace", "")}/{ref.get("name", "")}"')
        return binding

    async def _reconcile_normal(self, obj: Object, cluster_name: str | None) -> float | None:
        spec = obj.setdefault("spec", {})
        ref = spec.get("serverRef") or {}
        if ref.get("name"):
            binding = await self._pinned(obj, str(ref["name"]))
        else:
            binding = await self._allocate(obj)
            spec["serverRef"] = {"kind": SERVER.kind, "name": name_of(binding)}
        server_name = name_of(binding)
        conditions.mark_true(obj, SERVER_ALLOCATED, self.clock.seconds())
        spec["providerID"] = provider_id(server_name)

        status = obj.setdefault("status", {})
        status["addresses"] = machine_addresses(binding)
        status["ready"] = True
        for c in conditions.get_conditions(binding):
            conditions.set(obj, c)

        if cluster_name is None:
            return None
        return await self._set_node_provider_id(obj, cluster_name, server_name)

    async def _set_node_provider_id(self, obj: Object, cluster_name: str, server_name: str) -> float | None:
        """§2.6 step 13 through the workload cluster's kubeconfig Secret."""
        now = self.clock.seconds()
        try:
            if self.workload is None:
                raise ProviderIDError("no workload cluster client is configured")
            kubeconfig = await self._kubeconfig(namespace_of(obj), cluster_name)
            await self.workload.set_provider_id(kubeconfig, server_name, provider_id(server_name))
        except ProviderIDError as e:
            conditions.mark_false(obj, PROVIDER_SET, REASON_PROVIDER_UPDATE_FAILED,
                                  conditions.SEVERITY_WARNING, str(e), now)
            self.log.info("MetalMachine {namespace}/{name}: providerID not set: {error}",
                          namespace=namespace_of(obj), name=name_of(obj), error=str(e))
            return DEFAULT_REQUEUE_AFTER
        conditions.mark_true(obj, PROVIDER_SET, now)
        return None

    async def _kubeconfig(self, namespace: str, cluster_name: str) -> bytes:
        secret_name = f"{cluster_name}-kubeconfig"
        secret = await self._get(SECRET, secret_name, namespace)
        if secret is None:
            raise ProviderIDError(f'secrets "{secret_name}" not found')
        value = (secret.get("data") or {}).get("value")
        if not value:
            raise ProviderIDError(f"secret {namespace}/{secret_name} has no key \"value\"")
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as e:
            raise ProviderIDError(f"secret {namespace}/{secret_name}: invalid base64: {e}") from None

    # -- deletion ------------------------------------------------------------------------------

    async def _reconcile_delete(self, orig: Object, obj: Object) -> Result | None:
        """Release every binding this MetalMachine holds, then let it go."""
        for binding in await self._owned_bindings(obj):
            try:
                await self.store.delete(SERVER_BINDING, name_of(binding))
            except NotFound:
                pass
            self.log.info("MetalMachine {namespace}/{name}: released server {server}",
                          namespace=namespace_of(obj), name=name_of(obj), server=name_of(binding))
        spec = obj.get("spec")
        if isinstance(spec, dict):
            spec.pop("serverRef", None)
        obj["metadata"]["finalizers"] = [
            f for f in meta(obj).get("finalizers") or [] if f != METAL_MACHINE_FINALIZER]
        await patch_changes(self.store, METAL_MACHINE, orig, obj, status=False)
        return None


def make_metalmachine_controller(
    manager: ControllerManager,
    store: IResourceStore,
    workload: IWorkloadNodes | None = None,
    clock: IReactorTime | None = None,
    recorder: EventRecorder | None = None,
) -> Controller:
    """Build the MetalMachine controller, register it with C{manager} and return it."""
    clock = clock if clock is not None else manager.clock
    if recorder is None:
        recorder = EventRecorder(store, clock, component=CAPS_CONTROLLER_MANAGER)
    reconciler = MetalMachineReconciler(store, recorder, clock, workload,
                                        bindings=manager.informer(SERVER_BINDING))
    controller = Controller("metalmachine", METAL_MACHINE, reconciler.reconcile, clock=clock)

    def binding_to_machine(binding: Object) -> list[str]:
        key = metal_machine_key(binding)
        return [key] if key else []

    controller.watches(SERVER_BINDING, binding_to_machine)
    manager.add_controller(controller)
    return controller
