"""Client-side rate limiting: the token bucket on a fake clock, and the Kubernetes store's
throttling against a real kube-apiserver (skips loudly without one, see tests/k8s/apiserver.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero.api.registry import LEASE, SECRET
from sidero.k8s.ratelimit import DEFAULT_BURST, DEFAULT_QPS, TokenBucket
from tests.k8s.support import make_store, server_with_crds


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TokenBucketTests(SynchronousTestCase):
    def test_defaults_are_controller_runtimes(self) -> None:
        """QPS 20 and burst 30, as controller-runtime's rest.Config."""
        bucket = TokenBucket()
        self.assertEqual((bucket.qps, bucket.burst), (20.0, 30))
        self.assertEqual((DEFAULT_QPS, DEFAULT_BURST), (20.0, 30))

    def test_burst_then_queue_in_order(self) -> None:
        """The burst goes at once; the next requests wait 1/qps more each, in order."""
        clock = FakeClock()
        bucket = TokenBucket(qps=10, burst=3, clock=clock)
        self.assertEqual([bucket.reserve() for _ in range(3)], [0.0, 0.0, 0.0])
        delays = [bucket.reserve() for _ in range(3)]
        for got, want in zip(delays, [0.1, 0.2, 0.3], strict=True):
            self.assertAlmostEqual(got, want)
        self.assertEqual((bucket.requests, bucket.throttled), (6, 3))
        self.assertAlmostEqual(bucket.waited, 0.6)

    def test_refills_up_to_burst(self) -> None:
        """Idle time refills tokens at qps, never beyond the burst."""
        clock = FakeClock()
        bucket = TokenBucket(qps=10, burst=2, clock=clock)
        bucket.reserve(), bucket.reserve()
        self.assertGreater(bucket.reserve(), 0)  # in debt by one token
        clock.now += 10.0  # far more than needed to refill
        self.assertEqual([bucket.reserve(), bucket.reserve()], [0.0, 0.0])
        self.assertGreater(bucket.reserve(), 0)

    def test_unlimited(self) -> None:
        """qps 0 never waits but still counts."""
        bucket = TokenBucket(qps=0, burst=1)
        self.assertEqual(sum(bucket.reserve() for _ in range(1000)), 0.0)
        self.assertEqual(bucket.requests, 1000)

    def test_give_back_returns_a_token(self) -> None:
        """A token given back (its request was never sent) serves the next caller, and never
        fills the bucket beyond its burst."""
        clock = FakeClock()
        bucket = TokenBucket(qps=10, burst=2, clock=clock)
        bucket.reserve(), bucket.reserve()
        self.assertGreater(bucket.reserve(), 0)  # in debt
        bucket.give_back()
        bucket.give_back()
        self.assertEqual(bucket.reserve(), 0.0)
        for _ in range(10):
            bucket.give_back()
        self.assertEqual([bucket.reserve(), bucket.reserve()], [0.0, 0.0])
        self.assertGreater(bucket.reserve(), 0)

    def test_burst_must_be_positive(self) -> None:
        self.assertRaises(ValueError, TokenBucket, 5, 0)

    def test_wait_stops_early(self) -> None:
        """A thread waiting for a token wakes up when told to stop."""
        bucket = TokenBucket(qps=0.01, burst=1)
        bucket.reserve()
        stop = threading.Event()
        stop.set()
        started = time.monotonic()
        self.assertFalse(bucket.wait(stop))
        self.assertLess(time.monotonic() - started, 1.0)


def secret(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "data": {}}


class StoreThrottlingTests(TestCase):
    timeout = 120

    def test_requests_are_spaced_and_lease_is_not_queued(self) -> None:
        """With qps 5 and burst 2, eight gets take at least 1.2 s, the reactor stays free
        meanwhile, and a Lease read issued behind them is answered at once (its own bucket)."""
        async def run() -> None:
            from twisted.internet import reactor

            server = await server_with_crds()
            store = await make_store(self, server, rate_limiter=TokenBucket(qps=5, burst=2))
            await store.create(secret("throttled"))  # takes a token too
            store.rate_limiter = TokenBucket(qps=5, burst=2)  # a full bucket for the measure
            ticks = []
            ticking = reactor.callLater  # the reactor keeps running timers while requests wait

            def tick() -> None:
                ticks.append(time.monotonic())
                if len(ticks) < 10:
                    ticking(0.1, tick)

            tick()
            started = time.monotonic()
            gets = gatherResults([Deferred.fromCoroutine(_get(store, "throttled")) for _ in range(8)])
            lease_done = Deferred.fromCoroutine(_lease_absent(store))
            lease_seconds = await lease_done
            await gets
            elapsed = time.monotonic() - started
            self.assertGreaterEqual(elapsed, (8 - 2) / 5 - 0.05)
            self.assertLess(lease_seconds, 0.8, "the Lease read queued behind the throttled gets")
            self.assertEqual(store.rate_limiter.requests, 8)
            self.assertEqual(store.rate_limiter.throttled, 6)
            self.assertEqual(store.lease_rate_limiter.requests, 1)
            self.assertGreaterEqual(len(ticks), 8, "the reactor was blocked while requests waited")

        return Deferred.fromCoroutine(run())


    def test_cancelled_while_throttled_is_never_sent(self) -> None:
        """A request cancelled while it waits for its token (an agent call past its deadline)
        is never sent, and its token goes back to the requests behind it."""
        async def run() -> None:
            from twisted.internet import reactor

            from sidero.store.errors import NotFound

            server = await server_with_crds()
            store = await make_store(self, server)
            store.rate_limiter = TokenBucket(qps=1, burst=1)
            sent: list[object] = []
            real_run = store._run

            def counting_run(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
                sent.append(args[:2])
                return real_run(f, *args, **kwargs)

            store._run = counting_run  # type: ignore[method-assign]
            await store.create(secret("first"))  # the only token
            waiting = store.create(secret("cancelled"))  # its token is due in 1 s
            self.assertEqual(store.rate_limiter.throttled, 1)
            waiting.cancel()
            self.failureResultOf(waiting, CancelledError)
            # The next caller waits for one token, not two (the cancelled one's came back).
            self.assertLess(store.rate_limiter.reserve(), 1.5)
            store.rate_limiter = TokenBucket(qps=0)
            await deferLater(reactor, 1.5, lambda: None)  # past when it would have gone
            self.assertEqual(len(sent), 1, f"the cancelled request was sent: {sent}")
            try:
                await store.get(SECRET, "cancelled", "default")
            except NotFound:
                pass
            else:
                self.fail("the cancelled create was written")

        return Deferred.fromCoroutine(run())


async def _get(store: object, name: str) -> None:
    await store.get(SECRET, name, "default")  # type: ignore[attr-defined]


async def _lease_absent(store: object) -> float:
    from sidero.store.errors import NotFound

    started = time.monotonic()
    try:
        await store.get(LEASE, "no-such-lease", "default")  # type: ignore[attr-defined]
    except NotFound:
        pass
    return time.monotonic() - started
