"""Controller and ControllerManager: fan-out mapping, retries with backoff, requeue_after, leader gating."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sidero.api.registry import SERVER, SERVER_CLASS
from sidero.controllers.informer import Informer
from sidero.controllers.leader import AlwaysLeader, ILeaderElector, ManualLeader
from sidero.controllers.runtime import Controller, ControllerManager, Result
from sidero.store.interfaces import Object
from tests.store.flaky import FlakyStore
from tests.store.inline import open_inline_store


def obj(kind: str, name: str) -> Object:
    return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": kind, "metadata": {"name": name}, "spec": {}}


class Recorder:
    """A reconciler whose outcomes the test scripts per call."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.script: list[object] = []  # Result | Exception | Deferred, consumed per call

    async def __call__(self, key: str) -> Result | None:
        self.calls.append(key)
        if not self.script:
            return None
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        if isinstance(step, Deferred):
            return await step
        assert step is None or isinstance(step, Result)
        return step


class ControllerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FlakyStore(open_inline_store(self)[0])
        self.store.create(obj("ServerClass", "any"))
        self.store.create(obj("ServerClass", "big"))
        self.store.create(obj("Server", "s1"))
        self.rec = Recorder()
        self.manager = ControllerManager(self.store, self.clock)
        self.controller = Controller("serverclass", SERVER_CLASS, self.rec, clock=self.clock)

    def start(self) -> None:
        self.manager.add_controller(self.controller)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)

    def test_initial_reconcile_of_every_object(self) -> None:
        """Once caches sync, every primary object is reconciled exactly once."""
        self.start()
        self.assertEqual(sorted(self.rec.calls), ["any", "big"])

    def test_primary_events_enqueue(self) -> None:
        """Create, update and delete of a primary object each trigger a reconcile of its key."""
        self.start()
        self.rec.calls.clear()
        self.store.create(obj("ServerClass", "new"))
        self.store.patch(SERVER_CLASS, "any", {"spec": {"selector": {}}})
        self.store.delete(SERVER_CLASS, "big")
        self.assertEqual(self.rec.calls, ["new", "any", "big"])

    def test_secondary_mapping_fan_out(self) -> None:
        """Every Server event enqueues all ServerClasses (spec §2.3)."""
        self.controller.watches(SERVER, lambda o: self.controller.primary.keys())
        self.start()
        self.rec.calls.clear()
        self.store.create(obj("Server", "s2"))
        self.assertEqual(sorted(self.rec.calls), ["any", "big"])
        self.rec.calls.clear()
        self.store.delete(SERVER, "s1")
        self.assertEqual(sorted(self.rec.calls), ["any", "big"])

    def test_update_maps_old_and_new(self) -> None:
        """A secondary update enqueues the keys mapped from both the old and the new object."""
        self.controller.watches(SERVER, lambda o: [o["spec"].get("class", "none")])
        self.start()
        self.rec.calls.clear()
        self.store.patch(SERVER, "s1", {"spec": {"class": "big"}})
        self.assertEqual(sorted(self.rec.calls), ["big", "none"])

    def test_errors_retried_with_backoff(self) -> None:
        """A failing reconcile is logged with its key and retried after 5 ms, then 10 ms; success resets."""
        self.start()
        self.rec.calls.clear()
        self.rec.script = [RuntimeError("boom"), RuntimeError("boom again"), None]
        with capturedLogs() as events:
            self.controller.enqueue("any")
        self.assertEqual(self.rec.calls, ["any"])
        failure_events = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual(failure_events[0]["key"], "any")
        self.assertEqual(failure_events[0]["controller"], "serverclass")
        self.assertEqual(failure_events[0]["outcome"], "error")
        self.clock.advance(0.004)
        self.assertEqual(len(self.rec.calls), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.rec.calls), 2)
        self.clock.advance(0.0099)
        self.assertEqual(len(self.rec.calls), 2)
        self.clock.advance(0.0001)
        self.assertEqual(len(self.rec.calls), 3)
        assert self.controller.queue is not None
        self.assertEqual(self.controller.queue.num_requeues("any"), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_requeue_after(self) -> None:
        """Result(requeue_after=20) reconciles the key again 20 s later, with backoff reset."""
        self.start()
        self.rec.calls.clear()
        self.rec.script = [Result(requeue_after=20)]
        self.controller.enqueue("big")
        self.clock.advance(19.9)
        self.assertEqual(self.rec.calls, ["big"])
        self.clock.advance(0.1)
        self.assertEqual(self.rec.calls, ["big", "big"])
        self.clock.advance(100)
        self.assertEqual(self.rec.calls, ["big", "big"])

    def test_requeue_flag_uses_backoff(self) -> None:
        """Result(requeue=True) retries with the key's backoff (5 ms first)."""
        self.start()
        self.rec.calls.clear()
        self.rec.script = [Result(requeue=True)]
        self.controller.enqueue("big")
        self.clock.advance(0.005)
        self.assertEqual(self.rec.calls, ["big", "big"])

    def test_structured_log_fields(self) -> None:
        """Each reconcile logs controller, key, duration and outcome."""
        gate: Deferred[Result | None] = Deferred()
        self.start()
        self.rec.script = [gate]
        with capturedLogs() as events:
            self.controller.enqueue("big")
            self.clock.advance(1.5)
            gate.callback(None)
        done = [e for e in events if e.get("outcome") == "success"]
        self.assertEqual(len(done), 1)
        self.assertEqual((done[0]["controller"], done[0]["key"], done[0]["duration"]),
                         ("serverclass", "big", 1.5))

    def test_concurrency_cap_and_per_key(self) -> None:
        """No more than max_concurrent_reconciles run at once."""
        for i in range(5):
            self.store.create(obj("ServerClass", f"c{i}"))
        controller = Controller("capped", SERVER_CLASS, self.rec, clock=self.clock,
                                max_concurrent_reconciles=3)
        gates: list[Deferred[Result | None]] = [Deferred() for _ in range(7)]
        self.rec.script = list(gates)
        self.manager.add_controller(controller)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)
        self.assertEqual(len(self.rec.calls), 3)
        controller.enqueue(self.rec.calls[0])  # in flight: must not run concurrently
        self.assertEqual(len(self.rec.calls), 3)
        gates[0].callback(None)
        self.assertEqual(len(self.rec.calls), 4)

    def test_reconcile_timeout(self) -> None:
        """A reconcile exceeding reconcile_timeout is cancelled and retried."""
        controller = Controller("slow", SERVER_CLASS, self.rec, clock=self.clock,
                                reconcile_timeout=30)
        self.rec.script = [Deferred(), Deferred()]
        self.manager.add_controller(controller)
        self.manager.startService()
        self.addCleanup(self.manager.stopService)
        self.assertEqual(len(self.rec.calls), 2)
        self.clock.advance(30)
        self.clock.advance(0.005)
        self.assertEqual(len(self.rec.calls), 4)
        self.flushLoggedErrors()

    def test_stop_waits_for_in_flight(self) -> None:
        """Stopping waits for a running reconcile; events after stop are ignored."""
        gate: Deferred[Result | None] = Deferred()
        self.rec.script = [gate]
        self.manager.add_controller(self.controller)
        self.manager.startService()
        stopped = self.manager.stopService()
        self.assertNoResult(stopped)
        gate.callback(Result(requeue_after=1))
        self.successResultOf(stopped)
        self.clock.advance(5)
        self.store.create(obj("ServerClass", "late"))
        self.assertEqual(len(self.rec.calls), 2)
        self.assertIsNone(self.controller.queue)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ManagerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FlakyStore(open_inline_store(self)[0])
        self.store.create(obj("ServerClass", "any"))
        self.store.create(obj("Server", "s1"))

    def test_informers_shared_per_kind(self) -> None:
        """Two controllers of one kind and a protocol read one informer with one watch."""
        manager = ControllerManager(self.store, self.clock)
        a, b = Recorder(), Recorder()
        manager.add_controller(Controller("a", SERVER_CLASS, a, clock=self.clock))
        manager.add_controller(Controller("b", SERVER_CLASS, b, clock=self.clock).watches(
            SERVER, lambda o: []))
        self.assertIs(manager.informer(SERVER_CLASS), manager.informer(SERVER_CLASS))
        manager.startService()
        self.addCleanup(manager.stopService)
        self.assertEqual(len(manager.informers), 2)
        self.assertEqual(len(self.store.watches), 2)
        self.assertEqual((a.calls, b.calls), (["any"], ["any"]))
        self.assertIsInstance(manager.informer(SERVER), Informer)

    def test_leader_gating(self) -> None:
        """Controllers run only while leader; informers keep their caches regardless."""
        elector = ManualLeader()
        manager = ControllerManager(self.store, self.clock, elector=elector)
        rec = Recorder()
        controller = manager.add_controller(Controller("sc", SERVER_CLASS, rec, clock=self.clock))
        manager.startService()
        self.addCleanup(manager.stopService)
        self.assertEqual(rec.calls, [])
        self.assertTrue(manager.informer(SERVER_CLASS).has_synced)
        elector.gain()
        self.assertEqual(rec.calls, ["any"])
        elector.lose()
        self.assertFalse(controller.running)
        self.store.create(obj("ServerClass", "other"))
        self.assertEqual(rec.calls, ["any"])
        self.assertIsNotNone(manager.informer(SERVER_CLASS).get("other"))
        elector.gain()
        self.assertEqual(sorted(rec.calls), ["any", "any", "other"])

    def test_regained_leadership_waits_for_the_last_run(self) -> None:
        """Leadership lost and gained again while a reconcile of the last term is still
        running: the new term's reconcile of that key waits for it (found by the crash test:
        one replica allocated two servers to one MetalMachine this way)."""
        elector = ManualLeader()
        manager = ControllerManager(self.store, self.clock, elector=elector)
        running: list[str] = []
        overlaps: list[str] = []
        gates: list[Deferred[None]] = []

        async def reconcile(key: str) -> None:
            if key in running:
                overlaps.append(key)
            running.append(key)
            gate: Deferred[None] = Deferred()
            gates.append(gate)
            try:
                await gate
            finally:
                running.remove(key)

        controller = manager.add_controller(Controller("sc", SERVER_CLASS, reconcile, clock=self.clock))
        manager.startService()
        self.addCleanup(manager.stopService)
        elector.gain()
        self.assertEqual(running, ["any"])
        elector.lose()
        elector.gain()
        self.assertTrue(controller.running)
        self.assertEqual((running, overlaps), (["any"], []))
        gates[0].callback(None)
        self.assertEqual((running, overlaps), (["any"], []))
        self.assertEqual(len(gates), 2)
        gates[1].callback(None)
        self.assertEqual(running, [])

    def test_runnables_retry_until_success(self) -> None:
        """A start-up runnable runs on gaining leadership and is retried with backoff on failure."""
        manager = ControllerManager(self.store, self.clock)
        attempts: list[float] = []

        async def ensure() -> None:
            attempts.append(self.clock.seconds())
            if len(attempts) < 3:
                raise RuntimeError("store not ready")

        manager.add_runnable("ensure", ensure)
        manager.startService()
        self.addCleanup(manager.stopService)
        self.clock.advance(1)
        self.clock.advance(2)
        self.clock.advance(100)
        self.assertEqual(attempts, [0, 1, 3])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_runnable_retries_cancelled_on_loss(self) -> None:
        """Losing leadership cancels a pending runnable retry."""
        elector = ManualLeader(leader=True)
        manager = ControllerManager(self.store, self.clock, elector=elector)

        async def broken() -> None:
            raise RuntimeError("nope")

        manager.add_runnable("broken", broken)
        manager.startService()
        self.addCleanup(manager.stopService)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        elector.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.flushLoggedErrors(RuntimeError)

    def test_electors_provide_interface(self) -> None:
        """AlwaysLeader and ManualLeader provide ILeaderElector."""
        self.assertTrue(verifyObject(ILeaderElector, AlwaysLeader()))
        self.assertTrue(verifyObject(ILeaderElector, ManualLeader()))
        self.assertTrue(AlwaysLeader().is_leader())
