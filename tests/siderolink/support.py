"""Objects and informers shared by the SideroLink unit tests (inline embedded store)."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sidero.api.admission import Admission
from sidero.api.registry import CAPI_MACHINE, METAL_MACHINE, SERVER, SERVER_BINDING
from sidero.controllers.informer import Informer
from sidero.store.embedded import EmbeddedStore
from tests.store.inline import FakeReactor, open_inline_store

Object = dict[str, Any]

UUID = "0b7a3c1e-6c1f-4f0a-9c64-2d5f7a8b9c0d"
TUNNEL = "fdae:41e4:649b:9303:7886:731d:1a34:9ba7"
MACHINE_UID = "7d0e5f2a-0000-4000-8000-000000000001"


def binding(name: str = UUID, address: str | None = TUNNEL + "/64", key: str = "",
            namespace: str = "cluster-a", metal_machine: str = "mm-0",
            cluster: str = "cluster-a") -> Object:
    spec: Object = {"metalMachineRef": {"kind": "MetalMachine", "namespace": namespace,
                                        "name": metal_machine}}
    if address is not None:
        spec["siderolink"] = {"address": address, "publicKey": key or "x" * 43 + "="}
    return {"apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
            "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
            "spec": spec}


def capi_machine(name: str = "machine-0", namespace: str = "cluster-a") -> Object:
    return {"apiVersion": CAPI_MACHINE.api_version, "kind": "Machine",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterName": "cluster-a", "bootstrap": {}}}


def metal_machine(name: str = "mm-0", namespace: str = "cluster-a",
                  machine: str | None = "machine-0", machine_uid: str = MACHINE_UID) -> Object:
    """A MetalMachine owned by a Machine (create that first: the store collects orphans)."""
    owners = [{"apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine", "name": machine,
               "uid": machine_uid}] if machine else []
    return {"apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": name, "namespace": namespace, "ownerReferences": owners},
            "spec": {}}


def server(name: str = UUID, addresses: list[str] = (), bmc: str | None = None) -> Object:  # type: ignore[assignment]
    spec: Object = {"accepted": True}
    if bmc:
        spec["bmc"] = {"endpoint": bmc, "user": "u", "pass": "p"}
    return {"apiVersion": SERVER.api_version, "kind": "Server", "metadata": {"name": name},
            "spec": spec}


class StoreTestCase(SynchronousTestCase):
    """The embedded store inline, with informers over it that follow every write at once."""

    def setUp(self) -> None:
        self.store: EmbeddedStore
        self.clock: FakeReactor
        self.store, self.clock = open_inline_store(self, admission=Admission())
        self.informers: dict[str, Informer] = {}
        for kind in (SERVER_BINDING, METAL_MACHINE, SERVER):
            informer = Informer(self.store, kind, clock=self.clock)
            informer.startService()
            self.addCleanup(informer.stopService)
            self.informers[kind.kind] = informer

    def ok(self, d: Any) -> Any:
        from collections.abc import Coroutine

        from twisted.internet.defer import Deferred

        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def create(self, obj: Object) -> Object:
        created: Object = self.ok(self.store.create(obj))
        return created

    def create_owned_metal_machine(self) -> Object:
        """Machine machine-0 and MetalMachine mm-0 it owns, in cluster-a."""
        machine = self.create(capi_machine())
        return self.create(metal_machine(machine_uid=machine["metadata"]["uid"]))
