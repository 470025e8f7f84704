"""The Cluster API provider's controllers (§2.5-§2.7) on the real embedded store (SQLite inline)
with a fake clock: allocation through a ServerClass and a serverRef, re-adoption, release,
pause, providerID on the workload Node, bad references, orphaned bindings, and many
MetalMachines racing for few servers through the real controller runtime."""

from __future__ import annotations

import base64
import random
from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sidero.api import conditions
from sidero.api.registry import (
    CAPI_CLUSTER,
    CAPI_MACHINE,
    EVENT,
    METAL_CLUSTER,
    METAL_MACHINE,
    SERVER,
    SERVER_BINDING,
    SERVER_CLASS,
)
from sidero.controllers.events import EventRecorder
from sidero.controllers.metalcluster import METAL_CLUSTER_FINALIZER, MetalClusterReconciler
from sidero.controllers.metalmachine import (
    BOOTSTRAP_SECRET_ANNOTATION,
    METAL_MACHINE_FINALIZER,
    PROVIDER_SET,
    SERVER_ALLOCATED,
    MetalMachineReconciler,
    make_metalmachine_controller,
)
from sidero.controllers.runtime import DEFAULT_REQUEUE_AFTER, ControllerManager, Result
from sidero.controllers.server import make_server_controller
from sidero.controllers.serverbinding import ServerBindingReconciler, make_serverbinding_controller
from sidero.controllers.serverclass import make_serverclass_controller
from sidero.k8s.workload import IWorkloadNodes, ProviderIDError
from sidero.power.fake import FakePowerManager
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import Object
from tests.store.inline import FakeReactor, inline_store

NS = "default"
CAPI_V1B1 = "cluster.x-k8s.io/v1beta1"


def server(name: str, clean: bool = True, **spec: Any) -> Object:
    return {"apiVersion": SERVER.api_version, "kind": "Server", "metadata": {"name": name},
            "spec": {"accepted": True, **spec}, "status": {"isClean": clean}}


def server_class(name: str = "workers") -> Object:
    return {"apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass", "metadata": {"name": name},
            "spec": {}}


def metal_machine(name: str, machine: Object | None = None, cls: str | None = "workers",
                  server_ref: str | None = None, **meta: Any) -> Object:
    """A MetalMachine; C{machine} is the stored CAPI Machine owning it (the store's garbage
    collector deletes objects whose owner uid does not exist, as Kubernetes does)."""
    spec: Object = {}
    if cls:
        spec["serverClassRef"] = {"apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass", "name": cls}
    if server_ref:
        spec["serverRef"] = {"kind": "Server", "name": server_ref}
    metadata: Object = {"name": name, "namespace": NS, **meta}
    if machine:
        metadata["ownerReferences"] = [{"apiVersion": CAPI_V1B1, "kind": "Machine",
                                        "name": machine["metadata"]["name"],
                                        "uid": machine["metadata"]["uid"]}]
    return {"apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine", "metadata": metadata,
            "spec": spec}


def capi_cluster(name: str = "c1", ready: bool = True, paused: bool = False) -> Object:
    return {"apiVersion": CAPI_V1B1, "kind": "Cluster", "metadata": {"name": name, "namespace": NS},
            "spec": {"paused": paused} if paused else {},
            "status": {"infrastructureReady": ready}}


def capi_machine(name: str, cluster: str = "c1", secret: str | None = "boot") -> Object:
    spec: Object = {"clusterName": cluster, "bootstrap": {}}
    if secret:
        spec["bootstrap"]["dataSecretName"] = secret
    return {"apiVersion": CAPI_V1B1, "kind": "Machine",
            "metadata": {"name": name, "namespace": NS, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
            "spec": spec}


@implementer(IWorkloadNodes)
class FakeWorkload:
    """Nodes of one workload cluster: labels by node name, providerIDs set."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}  # node name -> uuid label
        self.provider_ids: dict[str, str] = {}
        self.kubeconfigs: list[bytes] = []

    def set_provider_id(self, kubeconfig: bytes, server: str, provider_id: str) -> Deferred[None]:
        self.kubeconfigs.append(kubeconfig)
        matching = [n for n, uuid in self.nodes.items() if uuid == server]
        if not matching:
            raise ProviderIDError("no matching nodes found")
        if len(matching) > 1:
            raise ProviderIDError("multiple nodes found with same uuid label")
        self.provider_ids[matching[0]] = provider_id
        return succeed(None)


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.store: EmbeddedStore
        self.clock: FakeReactor
        self.store, self.clock = inline_store()
        self.ok(self.store.open())
        self.addCleanup(lambda: self.ok(self.store.close()))
        self.workload = FakeWorkload()
        self.recorder = EventRecorder(self.store, self.clock)
        self.mm = MetalMachineReconciler(self.store, self.recorder, self.clock, self.workload)

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def create(self, obj: Object) -> Object:
        status = obj.get("status")
        created: Object = self.ok(self.store.create(obj))
        if status:
            kind = {"Server": SERVER, "Cluster": CAPI_CLUSTER}.get(obj["kind"])
            if kind is not None:
                created = self.ok(self.store.patch(kind, obj["metadata"]["name"], {"status": status},
                                                   namespace=obj["metadata"].get("namespace"),
                                                   subresource="status"))
        return created

    def servers(self, *names: str, cls: str = "workers") -> None:
        for name in names:
            self.create(server(name))
        self.create(server_class(cls))
        self.ok(self.store.patch(SERVER_CLASS, cls, {"status": {"serversAvailable": list(names),
                                                                "serversInUse": []}},
                                 subresource="status"))

    def reconcile_mm(self, name: str) -> Result | None:
        result: Result | None = self.ok(self.mm.reconcile(f"{NS}/{name}"))
        return result

    def get_mm(self, name: str) -> Object:
        obj: Object = self.ok(self.store.get(METAL_MACHINE, name, NS))
        return obj

    def bindings(self) -> dict[str, str]:
        items = self.ok(self.store.list(SERVER_BINDING)).items
        return {b["metadata"]["name"]: b["spec"]["metalMachineRef"]["name"] for b in items}

    def events(self) -> list[tuple[str, str, str]]:
        return [(e["type"], e["reason"], e["message"]) for e in self.ok(self.store.list(EVENT)).items]

    def capi(self, *machines: str, cluster: str = "c1") -> list[Object]:
        self.create(capi_cluster(cluster))
        return [self.create(capi_machine(m, cluster)) for m in machines]

    def kubeconfig_secret(self, cluster: str = "c1", value: bytes = b"kubeconfig-bytes") -> None:
        self.create({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": f"{cluster}-kubeconfig", "namespace": NS},
                     "data": {"value": base64.b64encode(value).decode()}})


class AllocationTests(Base):
    def test_allocates_from_class_and_sets_everything(self) -> None:
        """A Machine-owned MetalMachine gets a binding (labels, refs), serverRef, providerID,
        ready, the Server gets the allocation Event, the finalizer is set."""
        self.servers("s1", "s2")
        [m1] = self.capi("m1")
        self.kubeconfig_secret()
        self.workload.nodes["node-a"] = "s1"
        self.create(metal_machine("mm1", machine=m1, labels={"cluster.x-k8s.io/cluster-name": "c1"}))
        self.assertIsNone(self.reconcile_mm("mm1"))
        mm = self.get_mm("mm1")
        self.assertEqual(mm["spec"]["serverRef"], {"kind": "Server", "name": "s1"})
        self.assertEqual(mm["spec"]["providerID"], "sidero://s1")
        self.assertIn(METAL_MACHINE_FINALIZER, mm["metadata"]["finalizers"])
        self.assertIs(mm["status"]["ready"], True)
        self.assertTrue(conditions.is_true(mm, PROVIDER_SET))
        self.assertTrue(conditions.is_true(mm, SERVER_ALLOCATED))
        binding = self.ok(self.store.get(SERVER_BINDING, "s1"))
        self.assertEqual(binding["metadata"]["labels"], {"cluster.x-k8s.io/cluster-name": "c1"})
        ref = binding["spec"]["metalMachineRef"]
        self.assertEqual((ref["kind"], ref["namespace"], ref["name"], ref["uid"]),
                         ("MetalMachine", NS, "mm1", mm["metadata"]["uid"]))
        cls_ref = binding["spec"]["serverClassRef"]
        self.assertEqual((cls_ref["apiVersion"], cls_ref["kind"], cls_ref["name"]),
                         (SERVER_CLASS.api_version, "ServerClass", "workers"))
        self.assertTrue(cls_ref["uid"])
        self.assertEqual(self.workload.provider_ids, {"node-a": "sidero://s1"})
        self.assertEqual(self.workload.kubeconfigs[-1], b"kubeconfig-bytes")
        self.assertIn(("Normal", "Server Allocation",
                       'Server is allocated via serverclass "workers" for metal machine "mm1".'), self.events())

    def test_skips_servers_in_use_or_dirty(self) -> None:
        self.servers("s1", "s2", "s3")
        self.ok(self.store.patch(SERVER, "s1", {"status": {"inUse": True}}, subresource="status"))
        self.ok(self.store.patch(SERVER, "s2", {"status": {"isClean": False}}, subresource="status"))
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("mm1")
        self.assertEqual(self.bindings(), {"s3": "mm1"})

    def test_binding_taken_by_another_tries_next(self) -> None:
        """AlreadyExists (another MetalMachine won the race) moves on to the next server."""
        self.servers("s1", "s2")
        self.create(metal_machine("other", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.ok(self.store.create({"apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
                                   "metadata": {"name": "s1"},
                                   "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": NS,
                                                                "name": "other"}}}))
        self.reconcile_mm("mm1")
        self.assertEqual(self.bindings(), {"s1": "other", "s2": "mm1"})

    def test_no_server_available_waits_with_condition(self) -> None:
        self.servers("s1")
        self.ok(self.store.patch(SERVER, "s1", {"status": {"isClean": False}}, subresource="status"))
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.assertEqual(self.reconcile_mm("mm1"), Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        mm = self.get_mm("mm1")
        self.assertEqual(conditions.reason(mm, SERVER_ALLOCATED), "NoServerAvailable")
        self.assertNotIn("serverRef", mm["spec"])
        self.assertEqual(self.bindings(), {})

    def test_missing_class_is_a_condition(self) -> None:
        self.create(metal_machine("mm1", cls="nope", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.assertEqual(self.reconcile_mm("mm1"), Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        mm = self.get_mm("mm1")
        self.assertTrue(conditions.is_false(mm, SERVER_ALLOCATED))
        self.assertEqual(conditions.reason(mm, SERVER_ALLOCATED), "ServerClassNotFound")
        self.assertEqual(conditions.message(mm, SERVER_ALLOCATED),
                         'serverclasses.metal.sidero.dev "nope" not found')
        self.assertEqual(self.bindings(), {})

    def test_no_reference_is_a_condition_without_retry(self) -> None:
        self.create(metal_machine("mm1", cls=None, annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.assertIsNone(self.reconcile_mm("mm1"))
        mm = self.get_mm("mm1")
        self.assertEqual(conditions.reason(mm, SERVER_ALLOCATED), "NoServerReference")
        self.assertEqual(conditions.message(mm, SERVER_ALLOCATED),
                         "either a server or serverclass ref must be supplied")

    def test_readopts_existing_binding(self) -> None:
        """A binding naming this MetalMachine (crash before serverRef was recorded, or serverRef
        cleared by a user: sfyra's TestMetalMachineServerRefReconcile) is adopted, not doubled."""
        self.servers("s1", "s2")
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("mm1")
        self.assertEqual(self.bindings(), {"s1": "mm1"})
        self.ok(self.store.patch(METAL_MACHINE, "mm1", {"spec": {"serverRef": None}}, namespace=NS))
        self.ok(self.store.patch(SERVER_CLASS, "workers", {"status": {"serversAvailable": ["s2"]}},
                                 subresource="status"))
        self.reconcile_mm("mm1")
        self.assertEqual(self.get_mm("mm1")["spec"]["serverRef"]["name"], "s1")
        self.assertEqual(self.bindings(), {"s1": "mm1"})

    def test_server_ref_creates_binding_at_once(self) -> None:
        """A pinned server is bound and used in the same pass (no NotFound re-run)."""
        self.create(server("s9"))
        self.create(metal_machine("mm1", cls=None, server_ref="s9",
                                  annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.assertIsNone(self.reconcile_mm("mm1"))
        binding = self.ok(self.store.get(SERVER_BINDING, "s9"))
        self.assertNotIn("serverClassRef", binding["spec"])
        mm = self.get_mm("mm1")
        self.assertEqual(mm["spec"]["providerID"], "sidero://s9")
        self.assertIs(mm["status"]["ready"], True)
        self.assertIn(("Normal", "Server Assignment",
                       'Server as assigned via serverRef for metal machine "mm1".'), self.events())

    def test_server_ref_to_missing_server(self) -> None:
        self.create(metal_machine("mm1", cls=None, server_ref="ghost",
                                  annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.assertEqual(self.reconcile_mm("mm1"), Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        mm = self.get_mm("mm1")
        self.assertEqual(conditions.reason(mm, SERVER_ALLOCATED), "ServerNotFound")
        self.assertNotIn("providerID", mm["spec"])
        self.assertEqual(self.bindings(), {})

    def test_server_ref_bound_elsewhere_is_refused(self) -> None:
        """Go adopts a binding that belongs to another MetalMachine; this refuses it."""
        self.servers("s1")
        self.create(metal_machine("owner", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("owner")
        self.create(metal_machine("thief", cls=None, server_ref="s1",
                                  annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("thief")
        thief = self.get_mm("thief")
        self.assertEqual(conditions.reason(thief, SERVER_ALLOCATED), "ServerBoundElsewhere")
        self.assertNotIn("providerID", thief["spec"])
        self.assertFalse(thief.get("status", {}).get("ready"))
        self.assertEqual(self.bindings(), {"s1": "owner"})

    def test_binding_addresses_and_conditions_copied(self) -> None:
        self.servers("s1")
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("mm1")
        self.ok(self.store.patch(SERVER_BINDING, "s1", {"spec": {"addresses": ["10.5.0.7"], "hostname": "n1"}}))
        b = self.ok(self.store.get(SERVER_BINDING, "s1"))
        conditions.mark_false(b, "TalosConfigLoaded", "TalosConfigLoadFailed", conditions.SEVERITY_ERROR,
                              "bad config", self.clock.seconds())
        self.ok(self.store.update_status(b))
        self.reconcile_mm("mm1")
        mm = self.get_mm("mm1")
        self.assertEqual(mm["status"]["addresses"], [{"type": "InternalIP", "address": "10.5.0.7"},
                                                     {"type": "Hostname", "address": "n1"}])
        self.assertEqual(conditions.reason(mm, "TalosConfigLoaded"), "TalosConfigLoadFailed")
        self.assertEqual(conditions.severity(mm, "TalosConfigLoaded"), "Error")


class WaitTests(Base):
    def test_no_owner_machine_waits(self) -> None:
        self.servers("s1")
        self.create(metal_machine("mm1"))
        self.assertEqual(self.reconcile_mm("mm1"), Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        self.assertEqual(self.bindings(), {})
        self.assertNotIn("finalizers", self.get_mm("mm1")["metadata"])

    def test_cluster_missing_is_an_error(self) -> None:
        self.servers("s1")
        m1 = self.create(capi_machine("m1", cluster="absent"))
        self.create(metal_machine("mm1", machine=m1))
        failure = self.failureResultOf(Deferred.fromCoroutine(self.mm.reconcile(f"{NS}/mm1")))
        self.assertEqual(failure.getErrorMessage(), "no cluster label or cluster does not exist")

    def test_infrastructure_not_ready_waits(self) -> None:
        self.servers("s1")
        self.create(capi_cluster(ready=False))
        m1 = self.create(capi_machine("m1"))
        self.create(metal_machine("mm1", machine=m1))
        self.assertEqual(self.reconcile_mm("mm1"), Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        self.assertEqual(self.bindings(), {})

    def test_no_bootstrap_secret_waits(self) -> None:
        self.servers("s1")
        self.create(capi_cluster())
        m1 = self.create(capi_machine("m1", secret=None))
        self.create(metal_machine("mm1", machine=m1))
        self.assertEqual(self.reconcile_mm("mm1"), Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        self.assertEqual(self.bindings(), {})

    def test_paused_annotation(self) -> None:
        self.servers("s1")
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot",
                                                      "cluster.x-k8s.io/paused": ""}))
        self.assertIsNone(self.reconcile_mm("mm1"))
        self.assertEqual(self.bindings(), {})

    def test_paused_cluster(self) -> None:
        self.servers("s1")
        self.create(capi_cluster(paused=True))
        m1 = self.create(capi_machine("m1"))
        self.create(metal_machine("mm1", machine=m1))
        self.assertIsNone(self.reconcile_mm("mm1"))
        self.assertEqual(self.bindings(), {})


class ProviderIDTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.servers("s1")
        [self.m1] = self.capi("m1")

    def test_missing_kubeconfig_secret(self) -> None:
        self.create(metal_machine("mm1", machine=self.m1))
        self.assertEqual(self.reconcile_mm("mm1"), Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        mm = self.get_mm("mm1")
        self.assertIs(mm["status"]["ready"], True)
        self.assertEqual(conditions.reason(mm, PROVIDER_SET), "ProviderUpdateFailed")
        self.assertEqual(conditions.severity(mm, PROVIDER_SET), "Warning")
        self.assertEqual(conditions.message(mm, PROVIDER_SET), 'secrets "c1-kubeconfig" not found')

    def test_no_matching_node_then_node_appears(self) -> None:
        self.kubeconfig_secret()
        self.create(metal_machine("mm1", machine=self.m1))
        self.reconcile_mm("mm1")
        self.assertEqual(conditions.message(self.get_mm("mm1"), PROVIDER_SET), "no matching nodes found")
        self.workload.nodes["n1"] = "s1"
        self.assertIsNone(self.reconcile_mm("mm1"))
        self.assertTrue(conditions.is_true(self.get_mm("mm1"), PROVIDER_SET))

    def test_two_nodes_with_one_uuid(self) -> None:
        self.kubeconfig_secret()
        self.workload.nodes.update({"n1": "s1", "n2": "s1"})
        self.create(metal_machine("mm1", machine=self.m1))
        self.reconcile_mm("mm1")
        self.assertEqual(conditions.message(self.get_mm("mm1"), PROVIDER_SET),
                         "multiple nodes found with same uuid label")

    def test_standalone_without_cluster_label_skips_provider(self) -> None:
        self.create(metal_machine("mm2", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.assertIsNone(self.reconcile_mm("mm2"))
        self.assertFalse(conditions.has(self.get_mm("mm2"), PROVIDER_SET))


class DeletionTests(Base):
    def test_delete_releases_binding_and_finalizer(self) -> None:
        self.servers("s1")
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("mm1")
        self.ok(self.store.delete(METAL_MACHINE, "mm1", NS))
        self.assertIsNone(self.reconcile_mm("mm1"))
        self.assertEqual(self.bindings(), {})
        self.assertIsInstance(self.failureResultOf(self.store.get(METAL_MACHINE, "mm1", NS)).value,
                              errors.NotFound)

    def test_delete_without_machine_or_cluster(self) -> None:
        """Go cannot delete a MetalMachine whose Machine is gone; this can."""
        self.servers("s1")
        [m1] = self.capi("m1")
        self.create(metal_machine("mm1", machine=m1))
        self.kubeconfig_secret()
        self.reconcile_mm("mm1")
        self.assertEqual(self.bindings(), {"s1": "mm1"})
        # The Machine goes first (its dependents are collected, so drop the ownerReference).
        self.ok(self.store.patch(METAL_MACHINE, "mm1", {"metadata": {"ownerReferences": None}}, namespace=NS))
        self.ok(self.store.delete(CAPI_MACHINE, "m1", NS))
        self.ok(self.store.delete(CAPI_CLUSTER, "c1", NS))
        self.ok(self.store.delete(METAL_MACHINE, "mm1", NS))
        self.reconcile_mm("mm1")
        self.assertEqual(self.bindings(), {})

    def test_delete_releases_binding_without_server_ref(self) -> None:
        """A binding created just before a crash (serverRef never recorded) is released too."""
        self.servers("s1")
        self.create(metal_machine("mm1", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("mm1")
        self.ok(self.store.patch(METAL_MACHINE, "mm1", {"spec": {"serverRef": None}}, namespace=NS))
        self.ok(self.store.delete(METAL_MACHINE, "mm1", NS))
        self.reconcile_mm("mm1")
        self.assertEqual(self.bindings(), {})

    def test_delete_leaves_other_machines_binding(self) -> None:
        self.servers("s1")
        self.create(metal_machine("owner", annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("owner")
        self.create(metal_machine("thief", cls=None, server_ref="s1",
                                  annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        self.reconcile_mm("thief")
        self.ok(self.store.delete(METAL_MACHINE, "thief", NS))
        self.reconcile_mm("thief")
        self.assertEqual(self.bindings(), {"s1": "owner"})


class MetalClusterTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.reconciler = MetalClusterReconciler(self.store)
        self.cluster = self.create(capi_cluster())

    def metal_cluster(self, owned: bool = True, **meta: Any) -> Object:
        metadata: Object = {"name": "c1", "namespace": NS, **meta}
        if owned:
            metadata["ownerReferences"] = [{"apiVersion": CAPI_V1B1, "kind": "Cluster", "name": "c1",
                                            "uid": self.cluster["metadata"]["uid"]}]
        return self.create({"apiVersion": METAL_CLUSTER.api_version, "kind": "MetalCluster",
                            "metadata": metadata,
                            "spec": {"controlPlaneEndpoint": {"host": "10.0.0.1", "port": 6443}}})

    def test_ready_with_finalizer(self) -> None:
        self.metal_cluster()
        self.assertIsNone(self.ok(self.reconciler.reconcile(f"{NS}/c1")))
        mc = self.ok(self.store.get(METAL_CLUSTER, "c1", NS))
        self.assertIs(mc["status"]["ready"], True)
        self.assertEqual(mc["metadata"]["finalizers"], [METAL_CLUSTER_FINALIZER])

    def test_no_owner_waits(self) -> None:
        self.metal_cluster(owned=False)
        self.assertEqual(self.ok(self.reconciler.reconcile(f"{NS}/c1")),
                         Result(requeue_after=DEFAULT_REQUEUE_AFTER))
        self.assertFalse(self.ok(self.store.get(METAL_CLUSTER, "c1", NS)).get("status", {}).get("ready"))

    def test_delete_removes_finalizer(self) -> None:
        self.metal_cluster()
        self.ok(self.reconciler.reconcile(f"{NS}/c1"))
        self.ok(self.store.delete(METAL_CLUSTER, "c1", NS))
        self.ok(self.reconciler.reconcile(f"{NS}/c1"))
        self.assertIsInstance(self.failureResultOf(self.store.get(METAL_CLUSTER, "c1", NS)).value,
                              errors.NotFound)

    def test_paused(self) -> None:
        self.metal_cluster(annotations={"cluster.x-k8s.io/paused": "true"})
        self.ok(self.reconciler.reconcile(f"{NS}/c1"))
        self.assertNotIn("status", self.ok(self.store.get(METAL_CLUSTER, "c1", NS)))


class ServerBindingTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.reconciler = ServerBindingReconciler(self.store, self.clock, self.recorder, orphan_grace=60.0)

    def binding(self, name: str, mm: str) -> None:
        self.create({"apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
                     "metadata": {"name": name},
                     "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": NS, "name": mm}}})

    def reconcile(self, name: str) -> Result | None:
        result: Result | None = self.ok(self.reconciler.reconcile(name))
        return result

    def test_ready_follows_server(self) -> None:
        self.create(metal_machine("mm1"))
        self.binding("s1", "mm1")
        self.reconcile("s1")
        self.assertIs(self.ok(self.store.get(SERVER_BINDING, "s1"))["status"]["ready"], False)
        self.create(server("s1"))
        self.reconcile("s1")
        self.assertIs(self.ok(self.store.get(SERVER_BINDING, "s1"))["status"]["ready"], True)

    def test_orphan_released_after_grace(self) -> None:
        self.create(server("s1"))
        self.binding("s1", "ghost")
        result = self.reconcile("s1")
        self.assertIsNotNone(result)
        assert result is not None and result.requeue_after is not None
        self.assertGreater(result.requeue_after, 59)
        self.assertEqual(self.bindings(), {"s1": "ghost"})
        self.clock.advance(61)
        self.assertIsNone(self.reconcile("s1"))
        self.assertEqual(self.bindings(), {})
        self.assertEqual(self.events(), [("Warning", "Server Allocation",
                                          'Server released: its binding was orphaned (metal machine'
                                          ' "default/ghost" does not exist).')])

    def test_duplicate_released(self) -> None:
        """A second binding for a MetalMachine that uses another server is released."""
        self.create(server("s1"))
        self.create(server("s2"))
        self.create(metal_machine("mm1", server_ref="s1"))
        self.binding("s1", "mm1")
        self.binding("s2", "mm1")
        self.clock.advance(61)
        self.reconcile("s1")
        self.reconcile("s2")
        self.assertEqual(self.bindings(), {"s1": "mm1"})

    def test_binding_of_live_machine_kept(self) -> None:
        self.create(server("s1"))
        self.create(metal_machine("mm1"))
        self.binding("s1", "mm1")
        self.clock.advance(3600)
        self.assertIsNone(self.reconcile("s1"))
        self.assertEqual(self.bindings(), {"s1": "mm1"})

    def test_paused_cluster_keeps_orphan(self) -> None:
        """clusterctl move may create bindings before their MetalMachines, in a paused cluster."""
        self.create(server("s1"))
        self.create(capi_cluster(paused=True))
        self.create({"apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
                     "metadata": {"name": "s1", "labels": {"cluster.x-k8s.io/cluster-name": "c1"}},
                     "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": NS, "name": "later"}}})
        self.clock.advance(3600)
        self.reconcile("s1")
        self.assertEqual(self.bindings(), {"s1": "later"})


class RaceTests(Base):
    """Many MetalMachines, few servers, every controller running through the real runtime."""

    def test_never_bound_twice(self) -> None:
        rng = random.Random(7)
        names = [f"s{i:02d}" for i in range(8)]
        for name in names:
            self.create(server(name))
        self.create(server_class())
        manager = ControllerManager(self.store, self.clock)
        make_serverclass_controller(manager, self.store)
        make_metalmachine_controller(manager, self.store, workload=self.workload, recorder=self.recorder)
        make_serverbinding_controller(manager, self.store, recorder=self.recorder, orphan_grace=60.0)

        async def fake_power(obj: Object) -> FakePowerManager:
            return FakePowerManager(obj["metadata"]["name"])

        make_server_controller(manager, self.store, fake_power, recorder=self.recorder)
        manager.startService()
        self.addCleanup(lambda: self.ok(manager.stopService()))
        machines = [f"mm{i:02d}" for i in range(20)]
        rng.shuffle(machines)
        for mm in machines:
            self.create(metal_machine(mm, annotations={BOOTSTRAP_SECRET_ANNOTATION: "boot"}))
        for _ in range(200):
            self.clock.advance(1)
        bindings = self.bindings()
        self.assertEqual(len(bindings), len(names))
        self.assertEqual(len(set(bindings.values())), len(names), "a MetalMachine holds two servers")
        for mm in machines:
            ref = (self.get_mm(mm)["spec"].get("serverRef") or {}).get("name")
            if ref is not None:
                self.assertEqual(bindings[ref], mm)
        bound = {mm for mm in machines if self.get_mm(mm)["spec"].get("serverRef")}
        self.assertEqual(bound, set(bindings.values()))
        for name in names:
            self.assertEqual(self.ok(self.store.get(SERVER, name))["status"]["inUse"], True)
        # Release half: the servers are dirty (the Server controller marked them so when they
        # were allocated), so the waiting machines get them only once wiped (the test plays the
        # agent).
        for mm in sorted(bound)[:4]:
            self.ok(self.store.delete(METAL_MACHINE, mm, NS))
        for _ in range(50):
            self.clock.advance(1)
        self.assertEqual(len(self.bindings()), 4)
        for name in names:
            if name not in self.bindings():
                status = self.ok(self.store.get(SERVER, name))["status"]
                self.assertEqual((status["inUse"], status["isClean"]), (False, False))
                self.ok(self.store.patch(SERVER, name, {"status": {"isClean": True}}, subresource="status"))
        for _ in range(100):
            self.clock.advance(1)
        bindings = self.bindings()
        self.assertEqual(len(bindings), 8)
        self.assertEqual(len(set(bindings.values())), 8)
