# -*- test-case-name: tests.controllers.test_lease,tests.k8s.test_leader_election -*-
"""Leader election with a C{coordination.k8s.io/v1} Lease, as client-go's C{leaderelection} does it.

Every replica runs an L{LeaseElector} on the same Lease.  The rules are client-go's:

  - A candidate takes the Lease when it does not exist, when it already names this identity,
    when its holder is empty (released), or when it has expired: C{leaseDurationSeconds}
    have passed on I{our} clock since we last saw the record change.  Remote timestamps
    (C{renewTime}) are written for people, never trusted for timing.
  - Every write carries the resourceVersion we read, so of two candidates racing for an
    expired Lease one gets a Conflict and goes back to waiting.
  - The leader renews every C{retry_period}; when no renewal has succeeded for
    C{renew_deadline} (counted from the start of the last successful request, so the
    other replicas' view of expiry is always later), it steps down and becomes a candidate.
    Store calls have time limits, so a hung API server cannot keep us leading.
  - Stopping the service releases a held Lease (C{holderIdentity} cleared, duration 1 s),
    so another replica takes over at once rather than after expiry (client-go's
    C{ReleaseOnCancel}).

One addition: the elector also watches the Lease.  A change wakes the candidates at once
(they re-read it), so a release is taken over in milliseconds, and the moment a record
changed is observed sooner (which only makes expiry, measured from that moment, more
accurate; polling every C{retry_period} still works without the watch).  A candidate that
sees a fresh foreign Lease schedules its next attempt for the instant the Lease expires.
"""

from __future__ import annotations

import copy
import datetime
import math
import random as _random
import socket
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sidero.api.registry import LEASE
from sidero.controllers.leader import ILeaderElector, ManualLeader
from sidero.store import errors
from sidero.store.interfaces import BOOKMARK, DELETED, IResourceStore, IWatch, Object, WatchEvent
from sidero.threads import CallTimeout, with_timeout

__all__ = [
    "LEADER_ELECTION_ID", "JITTER_FACTOR", "LeaseElector", "LeaseRecord", "NamespaceMissing", "default_identity",
    "micro_time", "validate_durations",
]

#: Sidero's controller-manager Lease name (spec §0, "leader-election IDs").
LEADER_ELECTION_ID = "controller-leader-election-sidero-controller-manager"
#: client-go's jitter on candidate retries; the renew deadline must exceed retry × this.
JITTER_FACTOR = 1.2

T = TypeVar("T")


def micro_time(seconds: float) -> str:
    """A Kubernetes MicroTime: RFC 3339 in UTC with exactly six fractional digits."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_identity() -> str:
    """client-go's convention: the host name plus a random UUID (unique per process)."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


def validate_durations(lease_duration: float, renew_deadline: float, retry_period: float) -> None:
    """Refuse timings under which two replicas could lead at once (client-go's checks).

    @raise ValueError: with the offending values.
    """
    for label, value in (("lease duration", lease_duration), ("renew deadline", renew_deadline),
                         ("retry period", retry_period)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"leader election {label} must be a positive number of seconds, not {value!r}")
    if lease_duration <= renew_deadline:
        raise ValueError(
            f"leader election lease duration ({lease_duration:g}s) must be greater than the renew "
            f"deadline ({renew_deadline:g}s)")
    if renew_deadline <= JITTER_FACTOR * retry_period:
        raise ValueError(
            f"leader election renew deadline ({renew_deadline:g}s) must be greater than the retry "
            f"period × {JITTER_FACTOR:g} ({JITTER_FACTOR * retry_period:g}s)")


class LeaseRecord:
    """The election fields of a Lease's spec, compared as a whole to notice changes."""

    __slots__ = ("holder", "duration", "acquire_time", "renew_time", "transitions")

    def __init__(self, spec: Any) -> None:
        spec = spec if isinstance(spec, dict) else {}
        self.holder = str(spec.get("holderIdentity") or "")
        try:
            self.duration = max(int(spec.get("leaseDurationSeconds") or 0), 0)
        except (TypeError, ValueError):
            self.duration = 0
        self.acquire_time = spec.get("acquireTime")
        self.renew_time = spec.get("renewTime")
        try:
            self.transitions = max(int(spec.get("leaseTransitions") or 0), 0)
        except (TypeError, ValueError):
            self.transitions = 0

    def _key(self) -> tuple[Any, ...]:
        return (self.holder, self.duration, self.acquire_time, self.renew_time, self.transitions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeaseRecord) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"LeaseRecord(holder={self.holder!r}, duration={self.duration}, renew={self.renew_time!r})"


@implementer(ILeaderElector)
class LeaseElector(ManualLeader, Service):
    """An L{ILeaderElector} holding a Lease in any L{IResourceStore} (embedded or Kubernetes).

    Start it as a service; subscribers (a L{sidero.controllers.runtime.ControllerManager})
    are called on the reactor thread when leadership is gained or lost.  A subscriber's
    C{on_loss} may return a Deferred: on stop, the Lease is released only after those fire
    (bounded by C{renew_deadline}), so controllers finish before another replica starts.

    @ivar current_leader: the holder we last saw in the Lease (None before the first read,
        C{""} when released).
    """

    log = Logger()

    def __init__(
        self,
        store: IResourceStore,
        clock: IReactorTime,
        *,
        namespace: str,
        name: str = LEADER_ELECTION_ID,
        identity: str | None = None,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        watch: bool = True,
        random: Callable[[], float] = _random.random,
    ) -> None:
        validate_durations(lease_duration, renew_deadline, retry_period)
        if not name or not namespace:
            raise ValueError("leader election needs a Lease name and namespace")
        identity = default_identity() if identity is None else identity
        if not identity:
            raise ValueError("leader election identity must not be empty")
        ManualLeader.__init__(self, False)
        self.setName("leader-election")
        self.store = store
        self.clock = clock
        self.lease_name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_duration = float(lease_duration)
        self.renew_deadline = float(renew_deadline)
        self.retry_period = float(retry_period)
        self.use_watch = watch
        self._random = random
        self.current_leader: str | None = None
        self._lease: Object | None = None  # the last Lease object read or written
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # start of the last successful write while leading
        self._timer: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._busy = False  # an attempt is in flight (set before it starts: it may finish inline)
        self._attempt_waiters: list[Deferred[None]] = []
        self._again = False
        self._epoch = 0  # bumped on loss and stop: outcomes of older attempts cannot make us lead
        self._watch: IWatch | None = None
        self._watch_timer: IDelayedCall | None = None
        self._problem: str | None = None

    @property
    def lease_key(self) -> str:
        return f"{self.namespace}/{self.lease_name}"

    @property
    def lease_duration_seconds(self) -> int:
        """What we write in C{leaseDurationSeconds}: whole seconds, rounded up (never shorter)."""
        return max(1, math.ceil(self.lease_duration))

    # -- notifications ------------------------------------------------------------------

    def gain(self) -> None:
        self._notify(True)

    def lose(self) -> None:
        self._notify(False)

    def _notify(self, leader: bool) -> list[Deferred[Any]]:
        """Flip the state and call every subscriber (one failing does not stop the rest);
        returns the Deferreds the subscribers returned."""
        if self._leader == leader:
            return []
        self._leader = leader
        waits: list[Deferred[Any]] = []
        for on_gain, on_loss in list(self._subscribers):
            try:
                result = (on_gain if leader else on_loss)()
            except Exception:
                self.log.failure("leader election subscriber failed on {change}",
                                 change="gain" if leader else "loss")
                continue
            if isinstance(result, Deferred):
                waits.append(result)
        return waits

    # -- lifecycle ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info("leader election for lease {lease} as {identity}: lease {duration:g}s, renew "
                      "deadline {deadline:g}s, retry {retry:g}s", lease=self.lease_key,
                      identity=self.identity, duration=self.lease_duration,
                      deadline=self.renew_deadline, retry=self.retry_period)
        self._start_watch()
        self._kick()

    def stopService(self) -> Deferred[None]:
        """Stop trying; step down (waiting for subscribers' on_loss Deferreds) and release the Lease."""
        super().stopService()
        self._epoch += 1
        for timer in (self._timer, self._deadline, self._watch_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._deadline = self._watch_timer = None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()
        was_leader = self._leader
        drains = self._notify(False)
        if was_leader:
            self.log.info("lost leadership of {lease}: stopping", lease=self.lease_key,
                          identity=self.identity)
        return Deferred.fromCoroutine(self._finish_stop(drains))

    async def _finish_stop(self, drains: list[Deferred[Any]]) -> None:
        if self._busy:  # its calls have time limits, so this ends
            done: Deferred[None] = Deferred()
            self._attempt_waiters.append(done)
            await done
        if drains:
            await with_timeout(DeferredList(drains, consumeErrors=True), self.clock,
                               self.renew_deadline, "subscribers stepping down").addErrback(
                lambda f: self.log.warn("subscribers did not step down within {s:g}s; releasing "
                                        "the lease anyway", s=self.renew_deadline))
        await self._release()

    async def _release(self) -> None:
        """client-go's release: clear the holder so a candidate takes over without waiting."""
        lease = self._lease
        if lease is None or LeaseRecord(lease.get("spec")).holder != self.identity:
            return
        now = self.clock.seconds()
        body = copy.deepcopy(lease)
        spec = body.setdefault("spec", {})
        spec.update({"holderIdentity": "", "leaseDurationSeconds": 1,
                     "acquireTime": micro_time(now), "renewTime": micro_time(now),
                     "leaseTransitions": LeaseRecord(lease.get("spec")).transitions})
        try:
            released = await self._call(self.store.update(body), "release", self.renew_deadline)
        except errors.Conflict:
            self.log.info("lease {lease} changed since we last wrote it: nothing to release",
                          lease=self.lease_key)
            return
        except Exception as e:
            self.log.warn("could not release lease {lease}: {error}; another replica takes over "
                          "when it expires", lease=self.lease_key, error=_describe(e))
            return
        self._lease = released
        self.log.info("released lease {lease}", lease=self.lease_key, identity=self.identity)

    # -- the attempt loop ---------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, delay), self._kick)

    def _kick(self) -> None:
        """Try to acquire or renew now (or right after the attempt in flight)."""
        if not self.running:
            return
        if self._busy:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        started = self.clock.seconds()
        epoch = self._epoch
        self._busy = True
        d = Deferred.fromCoroutine(self._try(started))
        d.addCallbacks(
            lambda ok: self._finished(bool(ok), None, started, epoch),
            lambda f: self._finished(False, f, started, epoch),
        )

    def _call_timeout(self) -> float:
        """A leader's calls must end by its renew deadline; a candidate's within one too."""
        if self._leader and self._renewed_at is not None:
            return max(0.001, self._renewed_at + self.renew_deadline - self.clock.seconds())
        return self.renew_deadline

    def _call(self, d: Deferred[T], what: str, timeout: float) -> Deferred[T]:
        return with_timeout(d, self.clock, timeout, f"lease {what}")

    async def _try(self, started: float) -> bool:
        """client-go's tryAcquireOrRenew: True when we hold the Lease afresh."""
        timeout = self._call_timeout()
        try:
            lease: Object | None = await self._call(
                self.store.get(LEASE, self.lease_name, self.namespace), "read", timeout)
        except errors.NotFound:
            lease = None
        self._observe(lease)
        stamp = micro_time(started)
        if lease is None:
            new: Object = {
                "apiVersion": LEASE.api_version, "kind": LEASE.kind,
                "metadata": {"name": self.lease_name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity,
                         "leaseDurationSeconds": self.lease_duration_seconds,
                         "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0},
            }
            try:
                created = await self._call(self.store.create(new), "create", timeout)
            except errors.AlreadyExists:
                return False  # another candidate created it first
            except errors.NotFound as e:
                raise NamespaceMissing(self.namespace, str(e)) from e
            self._observe(created)
            return True
        record = self._observed
        assert record is not None
        if record.holder and record.holder != self.identity and not self._expired():
            return False
        body = copy.deepcopy(lease)
        spec = body.get("spec")
        if not isinstance(spec, dict):
            spec = body["spec"] = {}
        ours = record.holder == self.identity
        spec.update({
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "acquireTime": (record.acquire_time or stamp) if ours else stamp,
            "renewTime": stamp,
            "leaseTransitions": record.transitions if ours else record.transitions + 1,
        })
        try:
            updated = await self._call(self.store.update(body), "update", timeout)
        except errors.Conflict:
            return False  # changed since we read it: someone else wrote first
        self._observe(updated)
        return True

    def _expired(self) -> bool:
        record = self._observed
        if record is None:
            return True
        return self.clock.seconds() >= self._observed_at + record.duration

    def _observe(self, lease: Object | None) -> None:
        """Remember what the Lease says, and when (our clock) it last changed."""
        self._lease = lease
        record = LeaseRecord(lease.get("spec")) if lease is not None else None
        if record == self._observed:
            return
        self._observed = record
        self._observed_at = self.clock.seconds()
        holder = record.holder if record is not None else ""
        if holder != self.current_leader:
            self.current_leader = holder
            if holder:
                self.log.info("leader is now {leader}", leader=holder, lease=self.lease_key,
                              identity=self.identity)

    def _finished(self, ok: bool, failure: Failure | None, started: float, epoch: int) -> None:
        self._busy = False
        waiters, self._attempt_waiters = self._attempt_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if not self.running:
            return
        self._report(failure)
        now = self.clock.seconds()
        if ok and epoch == self._epoch:
            self._renewed_at = started
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = self.clock.callLater(
                max(0.0, started + self.renew_deadline - now), self._deadline_passed)
            if not self._leader:
                self.log.info("became leader of {lease}", lease=self.lease_key, identity=self.identity)
                self._notify(True)
            delay = started + self.retry_period - now
        elif self._leader:
            holder = self._observed.holder if self._observed is not None else ""
            if holder and holder != self.identity:
                self._step_down(f"the lease is now held by {holder}")
                delay = self._candidate_delay(now)
            else:
                delay = started + self.retry_period - now  # keep renewing until the deadline
        else:
            delay = self._candidate_delay(now)
        if self._again:
            self._again = False
            delay = 0.0
        self._schedule(delay)

    def _candidate_delay(self, now: float) -> float:
        """client-go's jittered retry, but never past the moment a foreign Lease expires."""
        delay = self.retry_period * (1.0 + self._random() * JITTER_FACTOR)
        record = self._observed
        if record is not None and record.holder and record.holder != self.identity:
            expires_in = self._observed_at + record.duration - now
            if expires_in > 0:  # already expired (a write failed): the plain retry, no busy loop
                delay = min(delay, expires_in)
        return delay

    def _deadline_passed(self) -> None:
        self._deadline = None
        self._step_down(f"no renewal succeeded within the renew deadline ({self.renew_deadline:g}s)")

    def _step_down(self, reason: str) -> None:
        if not self._leader:
            return
        self._epoch += 1
        self._renewed_at = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.log.warn("lost leadership of {lease}: {reason}", lease=self.lease_key, reason=reason,
                      identity=self.identity)
        self._notify(False)
        if self.running and not self._busy and (self._timer is None or not self._timer.active()):
            self._schedule(self._candidate_delay(self.clock.seconds()))

    def _report(self, failure: Failure | None) -> None:
        """Log a store problem once per change (a candidate retries every couple of seconds)."""
        if failure is None:
            if self._problem is not None:
                self.log.info("lease {lease} reachable again", lease=self.lease_key)
            self._problem = None
            return
        problem = _describe(failure.value) if failure.value is not None else failure.getErrorMessage()
        if problem == self._problem:
            return
        self._problem = problem
        if isinstance(failure.value, errors.StoreError | CallTimeout | NamespaceMissing):
            self.log.warn("leader election for lease {lease}: {problem}; retrying",
                          lease=self.lease_key, problem=problem, identity=self.identity)
        else:
            self.log.failure("leader election for lease {lease} failed; retrying", failure,
                             lease=self.lease_key, identity=self.identity)

    # -- the watch (a wake-up hint; polling alone is correct) ---------------------------

    def _start_watch(self) -> None:
        self._watch_timer = None
        if not self.use_watch or not self.running:
            return
        try:
            d = self.store.watch(LEASE, self._on_event, namespace=self.namespace,
                                 field_selector=f"metadata.name={self.lease_name}")
        except Exception as e:
            self._watch_failed(Failure(e))
            return
        d.addCallbacks(self._watching, self._watch_failed)

    def _watching(self, watch: IWatch) -> None:
        if not self.running:
            watch.stop()
            return
        self._watch = watch
        watch.done.addBoth(self._watch_ended, watch)

    def _watch_ended(self, result: object, watch: IWatch) -> None:
        if self._watch is not watch:
            return
        self._watch = None
        if isinstance(result, Failure):
            self._watch_failed(result)

    def _watch_failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self.log.debug("watch of lease {lease} ended ({error}); polling meanwhile",
                       lease=self.lease_key, error=failure.getErrorMessage())
        self._watch_timer = self.clock.callLater(self.retry_period, self._start_watch)

    def _on_event(self, event: WatchEvent) -> None:
        if event.type == BOOKMARK or not self.running:
            return
        record = None if event.type == DELETED else LeaseRecord(event.object.get("spec"))
        if record == self._observed:
            return
        if (record is not None and record.holder == self.identity
                and (self._leader or self._busy)):
            return  # our own write, seen before its response
        self._kick()


class NamespaceMissing(Exception):
    """The Lease's namespace does not exist (Kubernetes): someone must create it."""

    def __init__(self, namespace: str, detail: str) -> None:
        super().__init__(
            f'cannot create the leader election lease: namespace "{namespace}" does not exist '
            f"({detail}); create it (kubectl create namespace {namespace})")
        self.namespace = namespace


def _describe(error: BaseException) -> str:
    if isinstance(error, CallTimeout):
        return f"the store did not answer within {error.seconds:.3g}s ({error.name})"
    return f"{type(error).__name__}: {error}" if not isinstance(error, NamespaceMissing) else str(error)

