"""LeaseElector: client-go leader election over the embedded store, driven by a fake clock.

The store runs SQLite inline (no thread) on a L{Clock} that is also the reactor, so every
store call completes synchronously and time moves only when a test advances it.  A
L{FlakyStore} wrapper per elector injects failures, hangs and concurrent writes.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sidero.api.registry import LEASE, SERVER
from sidero.controllers.leader import ILeaderElector
from sidero.controllers.lease import (
    LEADER_ELECTION_ID,
    LeaseElector,
    micro_time,
    validate_durations,
)
from sidero.controllers.runtime import Controller, ControllerManager
from sidero.store import errors
from sidero.store.interfaces import Object
from tests.store.flaky import FlakyStore
from tests.store.inline import START, FakeReactor, open_inline_store

NS = "sidero-system"


class Timeline:
    """Subscriber recording (clock time, identity, gained/lost)."""

    def __init__(self, clock: FakeReactor) -> None:
        self.clock = clock
        self.events: list[tuple[float, str, str]] = []

    def follow(self, elector: LeaseElector) -> None:
        elector.subscribe(lambda: self.events.append((self.clock.seconds(), elector.identity, "gain")),
                          lambda: self.events.append((self.clock.seconds(), elector.identity, "loss")))

    def of(self, identity: str) -> list[tuple[float, str]]:
        return [(t, what) for t, who, what in self.events if who == identity]


class LeaseElectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store, self.clock = open_inline_store(self)
        self.timeline = Timeline(self.clock)

    def elector(self, identity: str, **kwargs: Any) -> tuple[LeaseElector, FlakyStore]:
        flaky = FlakyStore(self.store)
        kwargs.setdefault("random", lambda: 0.0)
        elector = LeaseElector(flaky, self.clock, namespace=NS, identity=identity, **kwargs)
        self.timeline.follow(elector)

        def stop() -> None:
            if elector.running:
                flaky.hang = False
                flaky.error = None
                elector.stopService()
        self.addCleanup(stop)
        return elector, flaky

    def lease(self) -> Object:
        result: Object = self.successResultOf(self.store.get(LEASE, LEADER_ELECTION_ID, NS))
        return result

    # Steps are binary fractions, so the clock lands exactly on whole seconds.
    def run_for(self, seconds: float, step: float = 0.125) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() + step <= end + 1e-9:
            self.clock.advance(step)

    def run_until(self, predicate: Callable[[], bool], limit: float, step: float = 0.0625) -> float:
        """Advance until C{predicate} holds; return the clock time then."""
        end = self.clock.seconds() + limit
        while not predicate():
            if self.clock.seconds() > end:
                self.fail(f"condition not reached within {limit}s")
            self.clock.advance(step)
        return self.clock.seconds()

    # -- acquiring ------------------------------------------------------------------------

    def test_provides_interface(self) -> None:
        """LeaseElector provides ILeaderElector and starts as a non-leader."""
        a, _ = self.elector("a")
        self.assertTrue(verifyObject(ILeaderElector, a))
        self.assertFalse(a.is_leader())

    def test_acquires_absent_lease(self) -> None:
        """With no Lease, starting creates it naming us, with MicroTime stamps and 0 transitions."""
        a, _ = self.elector("a")
        with capturedLogs() as logs:
            a.startService()
        self.assertTrue(a.is_leader())
        self.assertEqual(self.timeline.of("a"), [(START, "gain")])
        spec = self.lease()["spec"]
        self.assertEqual(spec["holderIdentity"], "a")
        self.assertEqual(spec["leaseDurationSeconds"], 15)
        self.assertEqual(spec["leaseTransitions"], 0)
        self.assertEqual(spec["acquireTime"], micro_time(START))
        self.assertEqual(spec["renewTime"], spec["acquireTime"])
        self.assertRegex(spec["renewTime"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        messages = [e["log_format"] for e in logs]
        self.assertIn("became leader of {lease}", messages)
        self.assertIn("leader is now {leader}", messages)

    def test_micro_time_keeps_microseconds(self) -> None:
        """MicroTime renders UTC with six fractional digits."""
        self.assertEqual(micro_time(1_700_000_000.25), "2023-11-14T22:13:20.250000Z")

    def test_default_identity_is_host_and_uuid(self) -> None:
        """Without an identity the elector uses hostname_uuid, unique per instance."""
        a = LeaseElector(self.store, self.clock, namespace=NS)
        b = LeaseElector(self.store, self.clock, namespace=NS)
        self.assertRegex(a.identity, "^" + re.escape(socket.gethostname()) + r"_[0-9a-f-]{36}$")
        self.assertNotEqual(a.identity, b.identity)

    def test_no_acquire_while_another_holds_a_fresh_lease(self) -> None:
        """A candidate never leads while the holder keeps renewing, and knows who leads."""
        a, _ = self.elector("a")
        b, _ = self.elector("b")
        a.startService()
        with capturedLogs() as logs:
            b.startService()
            self.run_for(60)
        self.assertTrue(a.is_leader())
        self.assertFalse(b.is_leader())
        self.assertEqual(b.current_leader, "a")
        self.assertEqual(self.timeline.of("b"), [])
        self.assertEqual(self.lease()["spec"]["leaseTransitions"], 0)
        self.assertEqual([e for e in logs if e.get("log_format") == "leader is now {leader}"
                          and e.get("identity") == "b"][0]["leader"], "a")

    def test_renewal_keeps_leadership(self) -> None:
        """The leader renews every retry period: renewTime moves, acquireTime and transitions stay."""
        a, flaky = self.elector("a")
        a.startService()
        first = self.lease()["spec"]
        self.run_for(100)
        spec = self.lease()["spec"]
        self.assertTrue(a.is_leader())
        self.assertEqual(self.timeline.of("a"), [(START, "gain")])
        self.assertEqual(spec["acquireTime"], first["acquireTime"])
        self.assertEqual(spec["leaseTransitions"], 0)
        self.assertGreaterEqual(spec["renewTime"], micro_time(START + 98))
        self.assertEqual(flaky.calls.count("update"), 50)

    # -- taking over ----------------------------------------------------------------------

    def test_takeover_after_expiry(self) -> None:
        """When the holder stops answering, it steps down at its renew deadline and a candidate
        takes over once leaseDurationSeconds passed on its own clock since the last change."""
        a, flaky_a = self.elector("a")
        b, _ = self.elector("b")
        a.startService()
        b.startService()
        self.run_for(5)
        last_renewal = self.lease()["spec"]["renewTime"]
        crashed = self.clock.seconds()
        flaky_a.hang = True
        took_over = self.run_until(b.is_leader, 30)
        (lost_at, what), = self.timeline.of("a")[1:]
        self.assertEqual(what, "loss")
        self.assertLess(lost_at, took_over)  # never two leaders
        self.assertLessEqual(lost_at, crashed + 10.0)
        self.assertGreater(took_over, crashed + 15.0 - 2.0 - 0.01)
        self.assertLessEqual(took_over, crashed + 15.0 + 0.1)
        spec = self.lease()["spec"]
        self.assertEqual(spec["holderIdentity"], "b")
        self.assertEqual(spec["leaseTransitions"], 1)
        self.assertGreater(spec["acquireTime"], last_renewal)

    def test_expiry_uses_our_clock_not_remote_timestamps(self) -> None:
        """A Lease whose renewTime is long past is still respected for leaseDurationSeconds
        after we first saw it: remote timestamps are not trusted."""
        self.successResultOf(self.store.create({
            "apiVersion": LEASE.api_version, "kind": "Lease",
            "metadata": {"name": LEADER_ELECTION_ID, "namespace": NS},
            "spec": {"holderIdentity": "old", "leaseDurationSeconds": 15,
                     "acquireTime": micro_time(0), "renewTime": micro_time(0), "leaseTransitions": 4}}))
        b, _ = self.elector("b")
        b.startService()
        self.assertFalse(b.is_leader())
        took_over = self.run_until(b.is_leader, 30)
        self.assertEqual(took_over, START + 15.0)
        self.assertEqual(self.lease()["spec"]["leaseTransitions"], 5)

    def test_release_on_stop_lets_another_take_over_at_once(self) -> None:
        """Stopping the leader clears holderIdentity; the watching candidate takes over at once."""
        a, _ = self.elector("a")
        b, _ = self.elector("b")
        a.startService()
        b.startService()
        self.run_for(3)
        stopped = self.clock.seconds()
        self.successResultOf(a.stopService())
        self.assertFalse(a.is_leader())
        self.assertTrue(b.is_leader())
        self.assertEqual(self.timeline.of("a")[-1], (stopped, "loss"))
        self.assertEqual(self.timeline.of("b"), [(stopped, "gain")])
        spec = self.lease()["spec"]
        self.assertEqual((spec["holderIdentity"], spec["leaseTransitions"]), ("b", 1))

    def test_release_without_watch_taken_over_within_retry_period(self) -> None:
        """Polling alone notices a released Lease at the next retry (no waiting for expiry)."""
        a, _ = self.elector("a", watch=False)
        b, _ = self.elector("b", watch=False)
        a.startService()
        b.startService()
        self.run_for(3)
        stopped = self.clock.seconds()
        self.successResultOf(a.stopService())
        self.assertEqual(self.lease()["spec"]["holderIdentity"], "")
        took_over = self.run_until(b.is_leader, 10)
        self.assertLessEqual(took_over - stopped, 2.0)

    def test_stop_waits_for_subscribers_before_release(self) -> None:
        """A subscriber's on_loss Deferred delays the release: controllers finish first."""
        a, _ = self.elector("a")
        draining: Deferred[None] = Deferred()
        a.subscribe(lambda: None, lambda: draining)
        a.startService()
        stopped = a.stopService()
        self.assertNoResult(stopped)
        self.assertEqual(self.lease()["spec"]["holderIdentity"], "a")
        draining.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.lease()["spec"]["holderIdentity"], "")

    def test_stop_as_candidate_leaves_lease_alone(self) -> None:
        """A candidate that never led does not touch the Lease on stop."""
        a, _ = self.elector("a")
        b, flaky_b = self.elector("b")
        a.startService()
        b.startService()
        self.successResultOf(b.stopService())
        self.assertNotIn("update", flaky_b.calls)
        self.assertEqual(self.lease()["spec"]["holderIdentity"], "a")

    # -- losing ---------------------------------------------------------------------------

    def test_renew_failures_past_deadline_lose_leadership(self) -> None:
        """Failed renewals keep leadership until renew_deadline after the last success, then
        lose it; once the store answers again the lease (still ours) is taken back."""
        a, flaky = self.elector("a")
        a.startService()
        self.run_for(4)
        last_ok = START + 4.0
        flaky.error = lambda: errors.Unavailable("API server down")
        with capturedLogs() as logs:
            self.run_for(10 - 0.0625, step=0.0625)
            self.assertTrue(a.is_leader())
            self.run_for(0.0625, step=0.0625)
        self.assertFalse(a.is_leader())
        self.assertEqual(self.timeline.of("a"), [(START, "gain"), (last_ok + 10.0, "loss")])
        warnings = [e for e in logs if e.get("log_format", "").startswith("leader election for lease")]
        self.assertEqual(len(warnings), 1)  # one line per distinct problem, not one per retry
        self.assertIn("lost leadership of {lease}: {reason}", [e["log_format"] for e in logs])
        flaky.error = None
        self.run_until(a.is_leader, 5)
        self.assertEqual(self.lease()["spec"]["leaseTransitions"], 0)

    def test_hung_store_loses_at_deadline(self) -> None:
        """Calls that never answer time out: a hung store cannot keep us leader past the deadline."""
        a, flaky = self.elector("a")
        a.startService()
        self.run_for(2)
        flaky.hang = True
        self.run_until(lambda: not a.is_leader(), 10.5)
        self.assertEqual(self.timeline.of("a")[-1], (START + 2.0 + 10.0, "loss"))
        flaky.hang = False
        self.run_until(a.is_leader, 10)

    def test_foreign_holder_makes_leader_step_down_at_once(self) -> None:
        """If someone else writes itself into the Lease, the leader steps down without
        waiting for its deadline."""
        a, _ = self.elector("a")
        a.startService()
        self.run_for(1)
        lease = self.lease()
        lease["spec"]["holderIdentity"] = "intruder"
        self.successResultOf(self.store.update(lease))
        self.assertFalse(a.is_leader())
        self.assertEqual(a.current_leader, "intruder")
        self.assertEqual(self.timeline.of("a")[-1], (START + 1.0, "loss"))

    def test_conflict_means_someone_else_won(self) -> None:
        """A write refused with Conflict (another writer between our read and write) does
        not make us leader; we then respect the new holder."""
        self.successResultOf(self.store.create({
            "apiVersion": LEASE.api_version, "kind": "Lease",
            "metadata": {"name": LEADER_ELECTION_ID, "namespace": NS},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1}}))
        b, flaky = self.elector("b", watch=False)

        def rival() -> None:
            lease = self.lease()
            lease["spec"].update({"holderIdentity": "rival", "leaseDurationSeconds": 15})
            self.successResultOf(self.store.update(lease))

        flaky.before_update = rival
        b.startService()
        self.assertFalse(b.is_leader())
        self.run_for(10)
        self.assertFalse(b.is_leader())
        self.assertEqual(b.current_leader, "rival")
        self.assertEqual(self.lease()["spec"]["holderIdentity"], "rival")

    def test_failing_takeover_of_expired_lease_does_not_spin(self) -> None:
        """When writes to an expired foreign Lease keep failing, the candidate retries at the
        retry period, not in a busy loop."""
        self.successResultOf(self.store.create({
            "apiVersion": LEASE.api_version, "kind": "Lease",
            "metadata": {"name": LEADER_ELECTION_ID, "namespace": NS},
            "spec": {"holderIdentity": "old", "leaseDurationSeconds": 1}}))
        b, flaky = self.elector("b", watch=False)
        b.startService()
        original = flaky._pass

        def forbid(name: str, *a: Any, **kw: Any) -> Deferred[Any]:
            if name == "update":
                flaky.calls.append(name)
                return fail(errors.Forbidden("leases are forbidden"))
            return original(name, *a, **kw)

        flaky._pass = forbid  # type: ignore[method-assign]
        self.run_for(20)
        self.assertFalse(b.is_leader())
        self.assertLessEqual(flaky.calls.count("update"), 11)
        self.assertGreaterEqual(flaky.calls.count("update"), 9)

    def test_simultaneous_candidates_one_wins(self) -> None:
        """Several candidates started together: exactly one leads, ever."""
        electors = [self.elector(name)[0] for name in ("a", "b", "c")]
        for e in electors:
            e.startService()
        self.run_for(30)
        self.assertEqual([e.identity for e in electors if e.is_leader()], ["a"])
        self.assertEqual([who for _, who, _ in self.timeline.events], ["a"])

    def test_missing_namespace_reported_once_then_recovers(self) -> None:
        """A create refused because the namespace is missing logs one clear warning while it
        lasts, and leadership follows once the namespace exists."""
        a, flaky = self.elector("a")
        flaky.create_error = lambda: errors.not_found("namespaces", NS)
        with capturedLogs() as logs:
            a.startService()
            self.run_for(20)
            self.assertFalse(a.is_leader())
            flaky.create_error = None
            self.run_until(a.is_leader, 5)
        problems = [e["problem"] for e in logs if "problem" in e]
        self.assertEqual(len(problems), 1)
        self.assertIn(f'namespace "{NS}" does not exist', problems[0])
        self.assertIn("lease {lease} reachable again", [e["log_format"] for e in logs])

    # -- configuration --------------------------------------------------------------------

    def test_bad_durations_refused(self) -> None:
        """Timings that could let two replicas lead are refused with a clear ValueError."""
        cases = [
            ((10.0, 10.0, 2.0), "must be greater than the renew deadline"),
            ((15.0, 2.4, 2.0), "must be greater than the retry period × 1.2"),
            ((15.0, 10.0, 0.0), "retry period must be a positive"),
            ((-1.0, 10.0, 2.0), "lease duration must be a positive"),
            ((15.0, float("nan"), 2.0), "renew deadline must be a positive"),
        ]
        for args, message in cases:
            e = self.assertRaises(ValueError, validate_durations, *args)
            self.assertIn(message, str(e))
            self.assertRaises(ValueError, LeaseElector, self.store, self.clock, namespace=NS,
                              lease_duration=args[0], renew_deadline=args[1], retry_period=args[2])
        validate_durations(15.0, 10.0, 2.0)
        validate_durations(3.0, 2.0, 0.5)

    def test_empty_identity_refused(self) -> None:
        """An empty identity or namespace is refused."""
        self.assertRaises(ValueError, LeaseElector, self.store, self.clock, namespace=NS, identity="")
        self.assertRaises(ValueError, LeaseElector, self.store, self.clock, namespace="")

    # -- with the controller manager --------------------------------------------------------

    def test_manager_runs_controllers_only_while_leading(self) -> None:
        """A ControllerManager gated by the elector starts its controllers on gain and stops
        them when leadership is lost."""
        a, flaky = self.elector("a")
        manager = ControllerManager(self.store, self.clock, elector=a)
        seen: list[str] = []

        async def reconcile(key: str) -> None:
            seen.append(key)

        controller = manager.add_controller(Controller("servers", SERVER, reconcile, clock=self.clock))
        self.successResultOf(self.store.create({"apiVersion": SERVER.api_version, "kind": "Server",
                                                "metadata": {"name": "s1"}, "spec": {}}))
        manager.startService()
        self.addCleanup(manager.stopService)
        self.assertFalse(controller.running)
        a.startService()
        self.clock.advance(0)
        self.assertTrue(manager.leading)
        self.assertTrue(controller.running)
        self.assertEqual(seen, ["s1"])
        flaky.error = lambda: errors.Unavailable("down")
        self.run_for(11)
        self.assertFalse(manager.leading)
        self.assertFalse(controller.running)
