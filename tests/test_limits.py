"""Concurrency limits (Ironic's): power operations, downloads and wipes are queued past their
limit, never refused, on a fake clock."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import conditions
from sidero.api.registry import SERVER
from sidero.controllers.environment import Downloaded, Downloader
from sidero.controllers.events import EventRecorder
from sidero.controllers.runtime import Result
from sidero.controllers.server import ServerReconciler
from sidero.limits import ConcurrencyLimit, WipeSlots
from sidero.power.fake import FakeFleet, FakeMachine, FakePowerManager
from sidero.power.limited import LimitedPowerManager
from tests.store.inline import open_inline_store


class SlowPower(FakePowerManager):
    """A fake BMC whose every call takes 2 s of the clock."""

    def __init__(self, clock: Clock, name: str, fleet: FakeFleet, log: list[str]) -> None:
        super().__init__(name, fleet, is_fake=False)
        self.clock = clock
        self.log = log

    def power_on(self) -> Deferred[None]:
        self.log.append(f"start {self.name}")

        def done() -> None:
            self.fleet.machine(self.name).powered = True  # type: ignore[union-attr]
            self.log.append(f"end {self.name}")

        return deferLater(self.clock, 2.0, done)


class ConcurrencyLimitTests(SynchronousTestCase):
    def test_power_operations_queue(self) -> None:
        """Ten power-ons through a limit of 3: three at a time in arrival order, seven queued,
        all done after four rounds of 2 s, none failed."""
        clock = Clock()
        limit = ConcurrencyLimit("power", 3)
        fleet = FakeFleet(report_state=True)
        log: list[str] = []
        managers = [LimitedPowerManager(SlowPower(clock, f"s{i}", fleet, log), limit)  # type: ignore[arg-type]
                    for i in range(10)]
        results = [m.power_on() for m in managers]
        self.assertEqual((limit.in_flight, limit.queued), (3, 7))
        self.assertEqual(log, ["start s0", "start s1", "start s2"])
        clock.advance(2)
        self.assertEqual((limit.in_flight, limit.queued), (3, 4))
        self.assertEqual(log[3:], ["end s0", "start s3", "end s1", "start s4", "end s2", "start s5"])
        clock.pump([2, 2, 2])
        self.assertEqual((limit.in_flight, limit.queued), (0, 0))
        for d in results:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(limit.completed, 10)
        self.assertTrue(all(fleet.machine(f"s{i}").powered for i in range(10)))

    def test_failure_frees_the_slot(self) -> None:
        """A failing operation fails its caller only, and the next one runs."""
        limit = ConcurrencyLimit("power", 1)
        first: Deferred[None] = Deferred()
        d1 = limit.run(lambda: first)
        d2 = limit.run(lambda: "second")
        self.assertNoResult(d2)
        first.errback(RuntimeError("bmc"))
        self.failureResultOf(d1, RuntimeError)
        self.assertEqual(self.successResultOf(d2), "second")

    def test_downloads_queue(self) -> None:
        """Six downloads through a limit of 2: two at a time; the others wait, then run."""
        clock = Clock()
        limit = ConcurrencyLimit("download", 2)
        downloader = Downloader(clock, pool=None, agent=object(), limit=limit)  # type: ignore[arg-type]
        running: list[str] = []

        async def fake_fetch(url: str, directory: str, filename: str, sha512: str) -> Downloaded:
            running.append(url)
            await deferLater(clock, 5.0, lambda: None)
            running.remove(url)
            return Downloaded(size=1, sha512="x")

        downloader._fetch = fake_fetch  # type: ignore[method-assign]
        ds = [Deferred.fromCoroutine(downloader.fetch(f"http://m/{i}", "/d", "f")) for i in range(6)]
        self.assertEqual(running, ["http://m/0", "http://m/1"])
        self.assertEqual(limit.queued, 4)
        clock.advance(5)
        self.assertEqual(running, ["http://m/2", "http://m/3"])
        clock.pump([5, 5])
        self.assertEqual([self.successResultOf(d).size for d in ds], [1] * 6)


def dirty(name: str) -> dict[str, Any]:
    return {"apiVersion": SERVER.api_version, "kind": "Server", "metadata": {"name": name},
            "spec": {"accepted": True}}


class WipeSlotTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.clock = open_inline_store(self)
        self.fleet = FakeFleet(report_state=True)
        self.woken: list[str] = []
        self.slots = WipeSlots(2, wake=self.woken.append)
        self.reconciler = ServerReconciler(
            self.store, self.power_for, EventRecorder(self.store, self.clock), self.clock,
            reboot_timeout=1200.0, pxe_mode="bios", wipes=self.slots)
        self.names = [f"server-{i}" for i in range(5)]
        for name in self.names:
            self.ok(self.store.create(dirty(name)))
            self.fleet.machines[name] = FakeMachine(powered=False)

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    async def power_for(self, obj: dict[str, Any]) -> FakePowerManager:
        return FakePowerManager(obj["metadata"]["name"], self.fleet, is_fake=False)

    def reconcile(self, name: str) -> Result | None:
        result: Result | None = self.ok(self.reconciler.reconcile(name))
        return result

    def started(self) -> list[str]:
        return [n for n in self.names if "power_on" in self.fleet.machines[n].operations]

    def test_wipes_queue_and_resume(self) -> None:
        """Five dirty servers, two slots: two are powered into the agent, three wait (asked
        back, not failed); one turning clean wakes the first waiter, which then starts."""
        for name in self.names:
            self.reconcile(name)
        self.assertEqual(self.started(), ["server-0", "server-1"])
        self.assertEqual((self.slots.in_flight, self.slots.queued), (2, 3))
        self.assertEqual(self.reconcile("server-4"), Result(requeue_after=20.0))
        self.assertFalse(conditions.get(self.ok(self.store.get(SERVER, "server-4")), "PowerCycle"))
        # Still wiping (within the reboot timeout): the slot is kept.
        self.clock.advance(100)
        self.reconcile("server-0")
        self.assertEqual(self.slots.in_flight, 2)
        # The agent marks server-0 wiped.
        obj = self.ok(self.store.get(SERVER, "server-0"))
        obj["status"]["isClean"] = True
        conditions.mark_true(obj, "PowerCycle", self.clock.seconds())
        self.ok(self.store.update_status(obj))
        self.reconcile("server-0")
        self.assertEqual(self.woken, ["server-2"])
        # A later waiter cannot jump the queue.
        self.reconcile("server-4")
        self.assertEqual(self.started(), ["server-0", "server-1"])
        self.reconcile("server-2")
        self.assertEqual(self.started(), ["server-0", "server-1", "server-2"])
        self.assertEqual((self.slots.in_flight, self.slots.queued), (2, 2))

    def test_deleted_waiter_leaves_the_queue(self) -> None:
        """A waiting server that is deleted no longer holds its place."""
        for name in self.names:
            self.reconcile(name)
        self.ok(self.store.delete(SERVER, "server-2"))
        self.reconcile("server-2")  # removes the storage finalizer: the Server goes
        self.reconcile("server-2")
        self.assertEqual(list(self.slots.waiting), ["server-3", "server-4"])
