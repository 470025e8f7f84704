"""Server controller (§2.2): every row of the decision table, allocation, the finalizer, the
reboot-timeout wait and convergence under a flaky power manager, on the real embedded store
(SQLite inline) with a fake clock, and the fake power manager standing in for real BMCs."""

from __future__ import annotations

import random
from collections.abc import Coroutine, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import conditions
from sidero.api.registry import EVENT, SERVER, SERVER_BINDING, SERVER_CLASS
from sidero.controllers.events import EventRecorder
from sidero.controllers.runtime import ControllerManager, Result
from sidero.controllers.server import (
    SERVER_FINALIZER,
    PowerManager,
    ServerReconciler,
    make_server_controller,
)
from sidero.power.fake import (
    EXPLICIT,
    FailureDice,
    FailureInjectingPowerManager,
    FakeFleet,
    FakeMachine,
    FakePowerManager,
)
from sidero.power.interfaces import SimulatedFailure
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import Object
from tests.store.inline import FakeReactor, open_inline_store

NAME = "4c4c4544-0039-3010-8048-b7c04f563232"
#: What a call the fake power manager is told to fail says.
SIMULATED = str(SimulatedFailure())


def server(name: str = NAME, accepted: bool = True, **spec: Any) -> Object:
    return {"apiVersion": SERVER.api_version, "kind": "Server", "metadata": {"name": name},
            "spec": {"accepted": accepted, **spec}}


def binding(name: str = NAME) -> Object:
    obj: Object = {
        "apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding", "metadata": {"name": name},
        "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": "default", "name": "m"},
                 "siderolink": {"address": "fdae::2/64", "publicKey": "k"}},
    }
    return obj


class Base(SynchronousTestCase):
    reboot_timeout = 1200.0

    def setUp(self) -> None:
        self.store: EmbeddedStore
        self.clock: FakeReactor
        self.store, self.clock = open_inline_store(self)
        self.fleet = FakeFleet(report_state=True)
        self.powers: dict[str, PowerManager] = {}
        self.power_error: Exception | None = None
        self.recorder = EventRecorder(self.store, self.clock)
        self.reconciler = ServerReconciler(self.store, self.power_for, self.recorder, self.clock,
                                           reboot_timeout=self.reboot_timeout, pxe_mode="bios")

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    async def power_for(self, obj: Object) -> PowerManager:
        if self.power_error is not None:
            raise self.power_error
        name = obj["metadata"]["name"]
        return self.powers.setdefault(name, FakePowerManager(name, self.fleet, is_fake=False))

    def power(self, name: str = NAME, on: bool = False, fake: bool = False,
              fail: Iterable[str] = ()) -> FakeMachine:
        """A fresh machine for C{name} (C{fake}: the fake manager, else one standing in for a
        real BMC), on or off, whose calls named in C{fail} fail explicitly."""
        self.powers[name] = FakePowerManager(name, self.fleet, is_fake=fake)
        machine = self.fleet.machines[name] = FakeMachine(
            powered=on, failing={call: EXPLICIT for call in fail})
        return machine

    def reconcile(self, name: str = NAME) -> Result | None:
        result: Result | None = self.ok(self.reconciler.reconcile(name))
        return result

    def get(self, name: str = NAME) -> Object:
        obj: Object = self.ok(self.store.get(SERVER, name))
        return obj

    def set_status(self, name: str = NAME, **status: Any) -> None:
        self.ok(self.store.patch(SERVER, name, {"status": status}, subresource="status"))

    def events(self) -> list[tuple[str, str, str]]:
        items = self.ok(self.store.list(EVENT)).items
        return [(e["type"], e["reason"], e["message"]) for e in items]


class DecisionTableTests(Base):
    def test_missing_server_is_done(self) -> None:
        """A Server that does not exist needs nothing: no power manager, no requeue."""
        self.assertIsNone(self.reconcile("nope"))
        self.assertEqual(self.powers, {})

    def test_power_manager_error(self) -> None:
        """A power manager that cannot be built gives a Warning event and a 20 s requeue."""
        self.ok(self.store.create(server()))
        self.power_error = ValueError('error getting secret "x": not found')
        self.assertEqual(self.reconcile(), Result(requeue_after=20.0))
        self.assertEqual(self.events(), [("Warning", "Server Management",
                                          'Failed to initialize management client: error getting '
                                          'secret "x": not found.')])

    def test_not_accepted(self) -> None:
        """A Server not accepted is marked not clean and not ready, its power reported, never touched."""
        self.ok(self.store.create(server(accepted=False)))
        self.set_status(isClean=True)
        p = self.power(on=True)
        self.assertIsNone(self.reconcile())
        st = self.get()["status"]
        self.assertEqual((st["isClean"], st["ready"], st["inUse"], st["power"]), (False, False, False, "on"))
        self.assertEqual(p.calls, ["is_powered_on"])
        self.assertIn(SERVER_FINALIZER, self.get()["metadata"]["finalizers"])

    def test_impossible_state(self) -> None:
        """In use and clean at once is logged and left not ready, without touching the power."""
        p = self.power(on=True)
        obj = server()
        status: dict[str, Any] = {"inUse": True, "isClean": True}
        step = self.ok(self.reconciler._decide(obj, status, self.powers[NAME], False, "bios", True, None))
        self.assertEqual((step.ready, step.requeue_after), (False, None))
        self.assertEqual(p.calls, [])

    def test_clean_unallocated_powered_on_is_powered_off(self) -> None:
        """A clean, unallocated server that is on is powered off, with a Normal event; ready."""
        self.ok(self.store.create(server()))
        self.set_status(isClean=True)
        p = self.power(on=True)
        self.assertIsNone(self.reconcile())
        self.assertEqual(p.calls, ["is_powered_on", "power_off"])
        self.assertFalse(p.powered)
        self.assertTrue(self.get()["status"]["ready"])
        self.assertEqual(self.events(), [("Normal", "Server Management", "Server powered off.")])

    def test_clean_unallocated_powered_off_untouched(self) -> None:
        """A clean, unallocated server already off is left alone and ready."""
        self.ok(self.store.create(server()))
        self.set_status(isClean=True)
        p = self.power(on=False)
        self.assertIsNone(self.reconcile())
        self.assertEqual(p.calls, ["is_powered_on"])
        self.assertEqual((self.get()["status"]["ready"], self.get()["status"]["power"]), (True, "off"))
        self.assertEqual(self.events(), [])

    def test_clean_power_query_error(self) -> None:
        """A power query error: power "unknown", Warning event, not ready, requeue 20 s."""
        self.ok(self.store.create(server()))
        self.set_status(isClean=True)
        self.power(fail={"is_powered_on"})
        self.assertEqual(self.reconcile(), Result(requeue_after=20.0))
        st = self.get()["status"]
        self.assertEqual((st["power"], st["ready"]), ("unknown", False))
        self.assertEqual(self.events(), [("Warning", "Server Management",
                                          f"Failed to determine power status: {SIMULATED}.")])

    def test_clean_power_off_error(self) -> None:
        """A failing power off gives a Warning event and a 20 s requeue, not ready."""
        self.ok(self.store.create(server()))
        self.set_status(isClean=True)
        self.power(on=True, fail={"power_off"})
        self.assertEqual(self.reconcile(), Result(requeue_after=20.0))
        self.assertFalse(self.get()["status"]["ready"])
        self.assertEqual(self.events(), [("Warning", "Server Management",
                                          f"Failed to power off: {SIMULATED}.")])

    def test_fake_client_no_events(self) -> None:
        """With the fake client the power is "on", powering off happens silently (no event)."""
        self.ok(self.store.create(server()))
        self.set_status(isClean=True)
        p = self.power(on=True, fake=True)
        self.assertIsNone(self.reconcile())
        self.assertEqual(self.get()["status"]["power"], "on")
        self.assertIn("power_off", p.calls)
        self.assertEqual(self.events(), [])

    def test_allocated_powered_off_is_pxe_booted(self) -> None:
        """An allocated server that is off is set to PXE once (spec pxeMode wins) and powered on."""
        self.ok(self.store.create(server(pxeMode="uefi")))
        self.ok(self.store.create(binding()))
        p = self.power(on=False)
        self.assertEqual(self.reconcile(), Result(requeue_after=300.0))
        self.assertEqual(p.calls, ["is_powered_on", "set_pxe:uefi", "power_on"])
        st = self.get()["status"]
        self.assertEqual((st["inUse"], st["isClean"], st["ready"]), (True, False, True))
        self.assertEqual(self.events(), [("Normal", "Server Management",
                                          "Server powered on and set PXE boot once into the environment.")])

    def test_allocated_default_pxe_mode(self) -> None:
        """Without spec.pxeMode the controller's default mode is used."""
        self.ok(self.store.create(server()))
        self.ok(self.store.create(binding()))
        p = self.power(on=False)
        self.reconcile()
        self.assertEqual(p.pxe_mode, "bios")

    def test_allocated_powered_on_rechecked_later(self) -> None:
        """An allocated server that is on is only re-checked after 5 minutes."""
        self.ok(self.store.create(server()))
        self.ok(self.store.create(binding()))
        p = self.power(on=True)
        self.assertEqual(self.reconcile(), Result(requeue_after=300.0))
        self.assertEqual(p.calls, ["is_powered_on"])
        self.assertTrue(self.get()["status"]["ready"])

    def test_allocated_errors(self) -> None:
        """Query, SetPXE and PowerOn errors of an allocated server each give their Warning and 20 s."""
        cases = [
            ({"is_powered_on"}, f"Failed to determine power status: {SIMULATED}."),
            ({"set_pxe:bios"}, f"Failed to set to PXE boot once: {SIMULATED}."),
            ({"power_on"}, f"Failed to power on: {SIMULATED}."),
        ]
        for i, (fail, message) in enumerate(cases):
            name = f"s{i}"
            self.ok(self.store.create(server(name)))
            self.ok(self.store.create(binding(name)))
            self.power(name, on=False, fail=fail)
            self.assertEqual(self.reconcile(name), Result(requeue_after=20.0))
            self.assertFalse(self.get(name)["status"]["ready"])
            self.assertIn(("Warning", "Server Management", message), self.events())

    def test_allocation_clears_owner_references_and_sets_pxebooted(self) -> None:
        """Allocation clears ownerReferences; TalosInstalled on the binding sets PXEBooted=True."""
        owner = self.ok(self.store.create({"apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass",
                                           "metadata": {"name": "owner"}, "spec": {}}))
        obj = server()
        obj["metadata"]["ownerReferences"] = [{"apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass",
                                               "name": "owner", "uid": owner["metadata"]["uid"]}]
        self.ok(self.store.create(obj))
        self.set_status(isClean=True)
        b = self.ok(self.store.create(binding()))
        conditions.mark_true(b, "TalosInstalled", self.clock.seconds())
        self.ok(self.store.update_status(b))
        self.power(on=True)
        self.reconcile()
        got = self.get()
        self.assertNotIn("ownerReferences", got["metadata"])
        self.assertFalse(got["status"]["isClean"])
        self.assertTrue(conditions.is_true(got, "PXEBooted"))

    def test_unallocation_event_and_pxebooted_deleted(self) -> None:
        """A server losing its binding gets "Server marked as unallocated." and loses PXEBooted."""
        self.ok(self.store.create(server()))
        b = self.ok(self.store.create(binding()))
        conditions.mark_true(b, "TalosInstalled", self.clock.seconds())
        self.ok(self.store.update_status(b))
        self.power(on=True)
        self.reconcile()
        self.assertTrue(conditions.has(self.get(), "PXEBooted"))
        self.ok(self.store.delete(SERVER_BINDING, NAME))
        self.reconcile()
        got = self.get()
        self.assertFalse(got["status"]["inUse"])
        self.assertFalse(conditions.has(got, "PXEBooted"))
        self.assertIn(("Normal", "Server Allocation", "Server marked as unallocated."), self.events())


class WipeTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.ok(self.store.create(server()))

    def test_powered_on_is_power_cycled(self) -> None:
        """A dirty unallocated server that is on is set to PXE and power cycled; PowerCycle=False."""
        p = self.power(on=True)
        self.assertEqual(self.reconcile(), Result(requeue_after=400.0))
        self.assertEqual(p.calls, ["is_powered_on", "set_pxe:bios", "power_cycle"])
        got = self.get()
        self.assertFalse(got["status"]["ready"])
        cond = conditions.get(got, "PowerCycle")
        assert cond is not None
        self.assertEqual((cond["status"], cond["reason"], cond["severity"]), ("False", "InProgress", "Info"))
        self.assertEqual(cond["message"], "Server power cycled for wiping at 2023-11-14T22:13:20Z.")
        self.assertEqual(self.events(), [("Normal", "Server Management",
                                          "Server power cycled and set to PXE boot once.")])

    def test_powered_off_is_powered_on(self) -> None:
        """A dirty unallocated server that is off is set to PXE and powered on."""
        p = self.power(on=False)
        self.assertEqual(self.reconcile(), Result(requeue_after=400.0))
        self.assertEqual(p.calls, ["is_powered_on", "set_pxe:bios", "power_on"])
        self.assertTrue(conditions.is_false(self.get(), "PowerCycle"))
        self.assertEqual(self.events(), [("Normal", "Server Management",
                                          "Server powered on and set to PXE boot once.")])

    def test_reboot_timeout_wait(self) -> None:
        """Within the reboot timeout the server is not cycled again; after it, it is, with a new time."""
        p = self.power(on=True)
        self.reconcile()
        first = conditions.get(self.get(), "PowerCycle")
        assert first is not None
        self.clock.advance(1199)
        p.calls.clear()
        self.assertEqual(self.reconcile(), Result(requeue_after=400.0))
        self.assertEqual(p.calls, ["is_powered_on"])
        self.clock.advance(2)
        self.assertEqual(self.reconcile(), Result(requeue_after=400.0))
        self.assertEqual(p.calls, ["is_powered_on", "is_powered_on", "set_pxe:bios", "power_cycle"])
        second = conditions.get(self.get(), "PowerCycle")
        assert second is not None
        self.assertNotEqual(first["lastTransitionTime"], second["lastTransitionTime"])

    def test_power_cycle_true_does_not_wait(self) -> None:
        """A PowerCycle=True condition (wipe done) does not hold back another cycle."""
        obj = self.get()
        conditions.mark_true(obj, "PowerCycle", self.clock.seconds())
        self.ok(self.store.update_status(obj))
        p = self.power(on=True)
        self.reconcile()
        self.assertIn("power_cycle", p.calls)

    def test_errors(self) -> None:
        """Query, SetPXE, PowerCycle and PowerOn errors give their Warning, 20 s, no PowerCycle condition."""
        cases = [
            (True, {"is_powered_on"}, f"Failed to determine power status: {SIMULATED}."),
            (True, {"set_pxe:bios"}, f"Failed to set to PXE boot once: {SIMULATED}."),
            (True, {"power_cycle"}, f"Failed to power cycle: {SIMULATED}."),
            (False, {"power_on"}, f"Failed to power on: {SIMULATED}."),
        ]
        for i, (on, fail, message) in enumerate(cases):
            name = f"w{i}"
            self.ok(self.store.create(server(name)))
            self.power(name, on=on, fail=fail)
            self.assertEqual(self.reconcile(name), Result(requeue_after=20.0))
            got = self.get(name)
            self.assertFalse(conditions.has(got, "PowerCycle"), message)
            self.assertIn(("Warning", "Server Management", message), self.events())

    def test_fake_client_never_sets_power_cycle(self) -> None:
        """With the fake client nothing is recorded: no PowerCycle condition, no event."""
        p = self.power(on=True, fake=True)
        self.assertEqual(self.reconcile(), Result(requeue_after=400.0))
        self.assertIn("power_cycle", p.calls)
        self.assertFalse(conditions.has(self.get(), "PowerCycle"))
        self.assertEqual(self.events(), [])


class FinalizerTests(Base):
    def test_added(self) -> None:
        """The storage finalizer is added on the first reconcile."""
        self.ok(self.store.create(server()))
        self.reconcile()
        self.assertEqual(self.get()["metadata"]["finalizers"], [SERVER_FINALIZER])

    def test_removed_when_unallocated(self) -> None:
        """Deleting an unallocated Server removes the finalizer, and the Server goes."""
        self.ok(self.store.create(server()))
        self.reconcile()
        self.ok(self.store.delete(SERVER, NAME))
        self.assertTrue(self.get()["metadata"].get("deletionTimestamp"))
        self.reconcile()
        self.failureResultOf(self.store.get(SERVER, NAME), errors.NotFound)

    def test_allocated_cannot_be_deleted(self) -> None:
        """An allocated Server keeps its finalizer while deleted; once unallocated it goes."""
        self.ok(self.store.create(server()))
        self.ok(self.store.create(binding()))
        self.reconcile()
        self.ok(self.store.delete(SERVER, NAME))
        self.reconcile()
        got = self.get()
        self.assertEqual(got["metadata"]["finalizers"], [SERVER_FINALIZER])
        self.assertTrue(got["metadata"]["deletionTimestamp"])
        self.ok(self.store.delete(SERVER_BINDING, NAME))
        self.reconcile()
        self.failureResultOf(self.store.get(SERVER, NAME), errors.NotFound)

    def test_other_finalizers_kept(self) -> None:
        """Only sidero's finalizer is removed; another controller's stays."""
        obj = server()
        obj["metadata"]["finalizers"] = ["example.com/other"]
        self.ok(self.store.create(obj))
        self.reconcile()
        self.assertEqual(self.get()["metadata"]["finalizers"], ["example.com/other", SERVER_FINALIZER])
        self.ok(self.store.delete(SERVER, NAME))
        self.reconcile()
        self.assertEqual(self.get()["metadata"]["finalizers"], ["example.com/other"])

    def test_conflicting_write_is_retried_not_lost(self) -> None:
        """A status change made by someone else between read and write fails with Conflict."""
        self.ok(self.store.create(server()))
        self.power(on=True)
        real_get = self.store.get

        def racing_get(kind: Any, name: str, namespace: str | None = None) -> Deferred[Object]:
            d = real_get(kind, name, namespace)
            if kind is SERVER:
                self.ok(self.store.patch(SERVER, name, {"status": {"isClean": True}},
                                         subresource="status"))
            return d

        self.store.get = racing_get  # type: ignore[method-assign]
        self.failureResultOf(Deferred.fromCoroutine(self.reconciler.reconcile(NAME)), errors.Conflict)
        self.store.get = real_get  # type: ignore[method-assign]
        self.assertTrue(self.get()["status"]["isClean"])


class ConvergenceTests(Base):
    reboot_timeout = 120.0

    def test_flaky_power_converges(self) -> None:
        """Servers with a power manager failing 10% of calls converge through the controller's requeues."""
        dice = FailureDice(explicit=0.1, silent=0.0, rng=random.Random(1234))
        manager = ControllerManager(self.store, self.clock)
        make_server_controller(manager, self.store, self.power_for, reboot_timeout=self.reboot_timeout,
                               pxe_mode="uefi", clock=self.clock, recorder=self.recorder)
        kinds = {}
        for i in range(9):
            name = f"srv-{i}"
            kind = ("allocated", "clean", "dirty")[i % 3]
            kinds[name] = kind
            self.ok(self.store.create(server(name)))
            self.power(name, on=bool(i % 2))
            self.powers[name] = FailureInjectingPowerManager(self.powers[name], dice, self.clock)
            if kind == "clean":
                self.set_status(name, isClean=True)
            if kind == "allocated":
                self.ok(self.store.create(binding(name)))
        manager.startService()
        self.addCleanup(lambda: self.ok(manager.stopService()))
        for _ in range(200):
            self.clock.advance(5)
        self.assertGreater(dice.injected[EXPLICIT], 3)
        for name, kind in kinds.items():
            got = self.get(name)
            st = got["status"]
            p = self.fleet.machine(name)
            self.assertEqual(got["metadata"]["finalizers"], [SERVER_FINALIZER], name)
            if kind == "allocated":
                self.assertEqual((p.powered, st["inUse"], st["ready"]), (True, True, True), name)
                if "power_on" in p.calls:
                    self.assertEqual(p.pxe_mode, "uefi", name)
            elif kind == "clean":
                self.assertEqual((p.powered, st["ready"], st["power"]), (False, True, "off"), name)
            else:
                self.assertEqual((p.powered, st["ready"], p.pxe_mode), (True, False, "uefi"), name)
                self.assertTrue(conditions.is_false(got, "PowerCycle"), name)
