"""LeaseElector against a real kube-apiserver: two replicas, each with its own KubernetesStore
(own API client, own thread pool), as two sidero processes would run.

Short timings (lease 3 s, renew deadline 2 s, retry 0.5 s) keep the tests quick.  The tests
skip loudly without the kube-apiserver binary (see L{tests.k8s.apiserver.require_binary}).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from sidero.api.registry import LEASE, NAMESPACE, SECRET
from sidero.controllers.lease import LEADER_ELECTION_ID, LeaseElector
from sidero.controllers.runtime import Controller, ControllerManager
from sidero.k8s.store import KubernetesStore
from sidero.store.interfaces import Object
from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.support import make_store, server_with_crds
from tests.store.flaky import FlakyStore

LEASE_DURATION = 3.0
RENEW_DEADLINE = 2.0
RETRY_PERIOD = 0.5


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Poll C{predicate} every 10 ms on the real reactor; return the time it first held."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await sleep(0.01)
    return float(reactor.seconds())


@dataclass
class Replica:
    """One simulated sidero process: its store, elector and (optionally) controller manager."""

    name: str
    store: KubernetesStore
    flaky: FlakyStore
    elector: LeaseElector
    manager: ControllerManager | None = None
    intervals: list[tuple[float, float, str, bool]] = field(default_factory=list)  # start, end, key, leading


class LeaderElectionTests(TestCase):
    timeout = 120

    async def _set_up(self) -> None:
        self.server: KubeAPIServer = await server_with_crds()
        self.ns = f"le-{uuid.uuid4().hex[:8]}"
        self.admin = await make_store(self, self.server)
        await self.admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}})

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._set_up())

    async def replica(self, name: str, *, namespace: str | None = None, hang: bool = False,
                      controllers: bool = False) -> Replica:
        store = await make_store(self, self.server)
        flaky = FlakyStore(store)
        elector = LeaseElector(
            flaky if hang else store, reactor, namespace=namespace or self.ns,
            identity=f"{name}_{uuid.uuid4()}", lease_duration=LEASE_DURATION,
            renew_deadline=RENEW_DEADLINE, retry_period=RETRY_PERIOD)
        r = Replica(name, store, flaky, elector)
        if controllers:
            r.manager = ControllerManager(store, reactor, elector=elector)
            r.manager.add_controller(Controller(f"secrets-{name}", SECRET, self._reconciler(r),
                                                clock=reactor))
            r.manager.startService()
            self.addCleanup(lambda: r.manager.stopService() if r.manager and r.manager.running else None)
        elector.startService()
        self.addCleanup(self._stop_elector, r)
        return r

    def _stop_elector(self, r: Replica) -> Deferred[None] | None:
        if not r.elector.running:
            return None
        r.flaky.hang = False
        return r.elector.stopService()

    def _reconciler(self, r: Replica) -> Callable[[str], Any]:
        async def reconcile(key: str) -> None:
            if not key.startswith(self.ns + "/"):
                return
            start = reactor.seconds()
            leading_at_start = r.elector.is_leader()
            await sleep(0.05)
            r.intervals.append((start, reactor.seconds(), key, leading_at_start))
        return reconcile

    async def kubectl_lease(self) -> Object:
        result = await threads.deferToThread(
            self.server.kubectl, "get", "lease", "-n", self.ns, LEADER_ELECTION_ID, "-o", "json")
        self.assertEqual(result.returncode, 0, result.stderr)
        lease: Object = json.loads(result.stdout)
        return lease

    def leaders(self, *replicas: Replica) -> list[Replica]:
        return [r for r in replicas if r.elector.is_leader()]

    # -- tests ------------------------------------------------------------------------------

    async def test_exactly_one_of_two_leads(self) -> None:
        """Two replicas on separate stores: exactly one leads, continuously, and kubectl shows it."""
        a = await self.replica("a")
        b = await self.replica("b")
        await wait_for(lambda: bool(self.leaders(a, b)), "a leader")
        (leader,) = self.leaders(a, b)
        for _ in range(int(2 * LEASE_DURATION / 0.05)):
            await sleep(0.05)
            self.assertEqual(self.leaders(a, b), [leader])
        other = b if leader is a else a
        self.assertEqual(other.elector.current_leader, leader.elector.identity)
        lease = await self.kubectl_lease()
        self.assertEqual(lease["spec"]["holderIdentity"], leader.elector.identity)
        self.assertEqual(lease["spec"]["leaseDurationSeconds"], 3)
        self.assertRegex(lease["spec"]["renewTime"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

    async def _churn(self, seconds: float, prefix: str) -> None:
        """Create and change Secrets in the test namespace for C{seconds}."""
        end = reactor.seconds() + seconds
        i = 0
        while reactor.seconds() < end:
            name = f"{prefix}-{i % 5}"
            if i < 5:
                await self.admin.create({"apiVersion": "v1", "kind": "Secret",
                                         "metadata": {"name": name, "namespace": self.ns},
                                         "data": {}})
            else:
                await self.admin.patch(SECRET, name, {"metadata": {"labels": {"n": str(i)}}},
                                       namespace=self.ns)
            i += 1
            await sleep(0.05)

    def assert_no_overlap(self, a: Replica, b: Replica) -> None:
        for s1, e1, k1, _ in a.intervals:
            for s2, e2, k2, _ in b.intervals:
                self.assertTrue(e1 <= s2 or e2 <= s1,
                                f"{a.name} reconciled {k1} in [{s1:.3f}, {e1:.3f}] while {b.name} "
                                f"reconciled {k2} in [{s2:.3f}, {e2:.3f}]")
        for r in (a, b):
            for start, _, key, leading in r.intervals:
                self.assertTrue(leading, f"{r.name} reconciled {key} at {start:.3f} without leading")

    async def test_controllers_never_overlap_and_survive_a_crashed_leader(self) -> None:
        """Only the leader's controllers reconcile; when the leader's API connection dies
        (renewals stop without a release) it steps down at its renew deadline, the other
        takes over within lease duration + retry period, and their reconciles never overlap."""
        a = await self.replica("a", controllers=True)
        b = await self.replica("b", controllers=True)
        await wait_for(lambda: bool(self.leaders(a, b)), "a leader")
        (leader,) = self.leaders(a, b)
        follower = b if leader is a else a
        await self._churn(1.5, "one")
        await wait_for(lambda: len(leader.intervals) >= 5, "leader reconciles")
        self.assertEqual(follower.intervals, [])
        assert leader.manager is not None and follower.manager is not None
        self.assertTrue(leader.manager.leading)
        self.assertFalse(follower.manager.leading)

        crashed = reactor.seconds()
        await leader.store.close()  # abrupt: every call fails from now on, nothing is released
        churning = Deferred.fromCoroutine(self._churn(LEASE_DURATION + 3.0, "two"))
        stepped_down = await wait_for(lambda: not leader.elector.is_leader(), "the old leader stepping down",
                                      timeout=10)
        took_over = await wait_for(follower.elector.is_leader, "takeover", timeout=10)
        await churning
        await wait_for(lambda: len(follower.intervals) >= 5, "new leader reconciles")
        self.assertLessEqual(stepped_down - crashed, RENEW_DEADLINE + 0.1)
        self.assertLess(stepped_down, took_over)
        self.assertLessEqual(took_over - crashed, LEASE_DURATION + RETRY_PERIOD,
                             f"takeover took {took_over - crashed:.2f}s")
        self.assertFalse(leader.manager.leading)
        self.assertTrue(follower.manager.leading)
        self.assert_no_overlap(a, b)
        lease = await self.kubectl_lease()
        self.assertEqual(lease["spec"]["holderIdentity"], follower.elector.identity)
        self.assertEqual(lease["spec"]["leaseTransitions"], 1)

    async def test_frozen_leader_is_replaced_after_expiry(self) -> None:
        """A leader whose calls hang (a frozen process) keeps the Lease until it expires,
        then the other replica takes over within lease duration + retry period."""
        a = await self.replica("a", hang=True)
        await wait_for(a.elector.is_leader, "a leading")
        b = await self.replica("b")
        await wait_for(lambda: b.elector.current_leader == a.elector.identity, "b seeing a lead")
        await sleep(1.0)
        frozen = reactor.seconds()
        a.flaky.hang = True
        took_over = await wait_for(b.elector.is_leader, "takeover", timeout=10)
        self.assertFalse(a.elector.is_leader())
        self.assertGreaterEqual(took_over - frozen, LEASE_DURATION - RETRY_PERIOD - 0.1)
        self.assertLessEqual(took_over - frozen, LEASE_DURATION + RETRY_PERIOD,
                             f"takeover took {took_over - frozen:.2f}s")

    async def test_graceful_stop_hands_over_within_retry_period(self) -> None:
        """Stopping the leader releases the Lease; the other replica leads within a retry
        period, and its controllers start."""
        a = await self.replica("a", controllers=True)
        await wait_for(a.elector.is_leader, "a leading")
        b = await self.replica("b", controllers=True)
        await wait_for(lambda: b.elector.current_leader == a.elector.identity, "b seeing a lead")
        stopping = reactor.seconds()
        await a.elector.stopService()
        released = reactor.seconds()
        took_over = await wait_for(b.elector.is_leader, "takeover", timeout=10)
        assert b.manager is not None and a.manager is not None
        await wait_for(lambda: b.manager is not None and b.manager.leading, "b's controllers")
        self.assertFalse(a.manager.leading)
        self.assertLessEqual(took_over - released, RETRY_PERIOD,
                             f"takeover took {took_over - released:.2f}s after the release")
        self.assertLessEqual(took_over - stopping, RETRY_PERIOD + 1.0)
        lease = await self.kubectl_lease()
        self.assertEqual(lease["spec"]["holderIdentity"], b.elector.identity)

    async def test_missing_namespace_reported_then_created(self) -> None:
        """Without the namespace the elector logs one clear error and keeps trying; once the
        namespace exists it leads."""
        missing = f"le-missing-{uuid.uuid4().hex[:8]}"
        with capturedLogs() as logs:
            a = await self.replica("a", namespace=missing)
            await sleep(4 * RETRY_PERIOD)
            self.assertFalse(a.elector.is_leader())
            await self.admin.create({"apiVersion": NAMESPACE.api_version, "kind": "Namespace",
                                     "metadata": {"name": missing}})
            await wait_for(a.elector.is_leader, "leading once the namespace exists", timeout=15)
        problems = [e["problem"] for e in logs if "problem" in e and e.get("identity") == a.elector.identity]
        self.assertEqual(len(problems), 1, problems)
        self.assertIn(f'namespace "{missing}" does not exist', problems[0])
        lease = await self.admin.get(LEASE, LEADER_ELECTION_ID, missing)
        self.assertEqual(lease["spec"]["holderIdentity"], a.elector.identity)
