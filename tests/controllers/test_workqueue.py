"""Work queue semantics: de-duplication, per-key serialisation, backoff, delays, concurrency, shutdown."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero.controllers.workqueue import ExponentialBackoff, ShutDown, WorkQueue


class ExponentialBackoffTests(SynchronousTestCase):
    def test_doubles_from_5ms(self) -> None:
        """Consecutive failures of one key wait 5 ms, 10 ms, 20 ms, ..."""
        b: ExponentialBackoff[str] = ExponentialBackoff()
        self.assertEqual([b.when("a") for _ in range(4)], [0.005, 0.01, 0.02, 0.04])
        self.assertEqual(b.num_requeues("a"), 4)

    def test_capped_at_1000s(self) -> None:
        """The delay never exceeds 1000 s, even after very many failures."""
        b: ExponentialBackoff[str] = ExponentialBackoff()
        delays = [b.when("a") for _ in range(200)]
        self.assertEqual(max(delays), 1000.0)
        self.assertEqual(delays[-1], 1000.0)

    def test_per_key_and_forget(self) -> None:
        """Keys back off independently and forget() restarts a key at 5 ms."""
        b: ExponentialBackoff[str] = ExponentialBackoff()
        b.when("a")
        b.when("a")
        self.assertEqual(b.when("b"), 0.005)
        b.forget("a")
        self.assertEqual(b.num_requeues("a"), 0)
        self.assertEqual(b.when("a"), 0.005)


class WorkQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.q: WorkQueue[str] = WorkQueue(self.clock, name="test")

    def test_dedup(self) -> None:
        """Adding a key several times before it is taken yields it once."""
        self.q.add("a")
        self.q.add("b")
        self.q.add("a")
        self.assertEqual(len(self.q), 2)
        self.assertEqual(self.successResultOf(self.q.get()), "a")
        self.assertEqual(self.successResultOf(self.q.get()), "b")
        self.assertNoResult(self.q.get())

    def test_get_waits_then_fires(self) -> None:
        """A get() on an empty queue fires when a key is added."""
        d = self.q.get()
        self.assertNoResult(d)
        self.q.add("x")
        self.assertEqual(self.successResultOf(d), "x")
        self.assertEqual(self.q.processing, frozenset({"x"}))

    def test_readded_while_processing_runs_once_after(self) -> None:
        """A key re-added (twice) while processing is not handed out again until done, then once."""
        self.q.add("a")
        key = self.successResultOf(self.q.get())
        self.q.add("a")
        self.q.add("a")
        second = self.q.get()
        self.assertNoResult(second)
        self.q.done(key)
        self.assertEqual(self.successResultOf(second), "a")
        self.q.done("a")
        self.assertNoResult(self.q.get())

    def test_add_after(self) -> None:
        """add_after makes the key available only once the delay has passed."""
        self.q.add_after("a", 5)
        d = self.q.get()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), "a")

    def test_add_after_earlier_wins(self) -> None:
        """Of two add_after calls for one key, the earlier ready time is kept, once."""
        self.q.add_after("a", 10)
        self.q.add_after("a", 3)
        self.q.add_after("a", 7)
        self.assertEqual(self.q.pending_delayed, {"a": 3.0})
        self.clock.advance(3)
        self.assertEqual(len(self.q), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.q), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_add_after_zero_is_immediate(self) -> None:
        """A non-positive delay adds the key at once."""
        self.q.add_after("a", 0)
        self.assertEqual(len(self.q), 1)

    def test_rate_limited_timings(self) -> None:
        """add_rate_limited waits 5 ms, then 10 ms on the next failure, and forget resets it."""
        self.q.add_rate_limited("a")
        self.assertEqual(self.q.pending_delayed, {"a": 0.005})
        self.clock.advance(0.005)
        key = self.successResultOf(self.q.get())
        self.q.done(key)
        self.q.add_rate_limited("a")
        self.assertAlmostEqual(self.q.pending_delayed["a"], 0.005 + 0.01)
        self.clock.advance(0.01)
        self.q.done(self.successResultOf(self.q.get()))
        self.q.forget("a")
        self.q.add_rate_limited("a")
        self.assertAlmostEqual(self.q.pending_delayed["a"] - self.clock.seconds(), 0.005)

    def test_shutdown_waits_for_in_flight(self) -> None:
        """shut_down drops queued keys, cancels timers, fails getters, and fires after done()."""
        self.q.add("a")
        self.q.add("b")
        self.q.add_after("c", 5)
        key = self.successResultOf(self.q.get())
        d = self.q.shut_down()
        self.assertNoResult(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(self.q.get(), ShutDown)
        self.q.add("z")
        self.assertEqual(len(self.q), 0)
        self.q.done(key)
        self.assertIsNone(self.successResultOf(d))

    def test_shutdown_fails_waiting_getters(self) -> None:
        """A worker blocked in get() is released with ShutDown."""
        d = self.q.get()
        self.successResultOf(self.q.shut_down())
        self.failureResultOf(d, ShutDown)


class ServeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.q: WorkQueue[str] = WorkQueue(self.clock, name="test")
        self.running: dict[str, Deferred[None]] = {}
        self.calls: list[str] = []

    def process(self, key: str) -> Deferred[None]:
        self.calls.append(key)
        d: Deferred[None] = Deferred()
        self.running[key] = d
        return d

    def finish(self, key: str) -> None:
        self.running.pop(key).callback(None)

    def test_concurrency_cap(self) -> None:
        """With 10 workers, at most 10 keys are processed at once; the 11th waits for a slot."""
        self.q.serve(self.process, workers=10)
        for i in range(12):
            self.q.add(f"k{i}")
        self.assertEqual(len(self.running), 10)
        self.assertEqual(len(self.q), 2)
        self.finish("k3")
        self.assertEqual(len(self.running), 10)
        self.assertIn("k10", self.running)
        self.assertEqual(len(self.q), 1)

    def test_per_key_serialisation(self) -> None:
        """A key re-added while a worker processes it is not run concurrently by another worker."""
        self.q.serve(self.process, workers=3)
        self.q.add("a")
        self.q.add("a")
        self.assertEqual(self.calls, ["a"])
        self.q.add("a")
        self.assertEqual(self.calls, ["a"])
        self.finish("a")
        self.assertEqual(self.calls, ["a", "a"])
        self.finish("a")
        self.assertEqual(self.calls, ["a", "a"])

    def test_failing_process_keeps_worker(self) -> None:
        """An exception escaping process is logged and the worker keeps serving."""
        def boom(key: str) -> None:
            self.calls.append(key)
            raise RuntimeError("boom")

        self.q.serve(boom, workers=1)
        self.q.add("a")
        self.q.add("b")
        self.assertEqual(self.calls, ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_coroutine_process(self) -> None:
        """An async def process function is awaited before the key is done."""
        gate: Deferred[None] = Deferred()

        async def proc(key: str) -> None:
            self.calls.append(key)
            await gate

        self.q.serve(proc, workers=1)
        self.q.add("a")
        self.q.add("b")
        self.assertEqual(self.calls, ["a"])
        gate.callback(None)
        self.assertEqual(self.calls, ["a", "b"])

    def test_shutdown_ends_workers_after_in_flight(self) -> None:
        """serve()'s Deferred fires only after shutdown and the in-flight reconcile finishing."""
        ended = self.q.serve(self.process, workers=2)
        self.q.add("a")
        self.q.add("b")
        self.q.add("c")
        drained = self.q.shut_down()
        self.assertNoResult(ended)
        self.assertNoResult(drained)
        self.finish("a")
        self.assertNoResult(drained)
        self.finish("b")
        self.successResultOf(drained)
        self.successResultOf(ended)
        self.assertEqual(self.calls, ["a", "b"])
