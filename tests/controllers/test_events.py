"""EventRecorder: core/v1 Events through the embedded store, de-duplicated and rate-limited."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from sidero.api.registry import EVENT, SERVER
from sidero.controllers.events import EventRecorder
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import Object
from tests.store.inline import FakeReactor, open_inline_store


class EventRecorderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store: EmbeddedStore
        self.clock: FakeReactor
        self.store, self.clock = open_inline_store(self)
        self.server = self.ok(self.store.create({
            "apiVersion": SERVER.api_version, "kind": "Server", "metadata": {"name": "s1"},
            "spec": {"accepted": True}}))
        self.recorder = EventRecorder(self.store, self.clock, burst=3, refill_seconds=300)

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def events(self) -> list[Object]:
        items: list[Object] = self.ok(self.store.list(EVENT)).items
        return items

    def test_event_shape(self) -> None:
        """An Event names the Server (cluster-scoped → namespace default) with type, reason, source."""
        self.ok(self.recorder.warning(self.server, "Server Management", "Failed to power on: x."))
        [e] = self.events()
        self.assertEqual(e["metadata"]["namespace"], "default")
        self.assertTrue(e["metadata"]["name"].startswith("s1."))
        self.assertEqual(e["involvedObject"]["kind"], "Server")
        self.assertEqual(e["involvedObject"]["name"], "s1")
        self.assertEqual(e["involvedObject"]["uid"], self.server["metadata"]["uid"])
        self.assertEqual((e["type"], e["reason"], e["message"], e["count"]),
                         ("Warning", "Server Management", "Failed to power on: x.", 1))
        self.assertEqual(e["source"], {"component": "sidero-controller-manager"})
        self.assertEqual(e["firstTimestamp"], "2023-11-14T22:13:20Z")

    def test_repeat_increments_count(self) -> None:
        """The same event again bumps count and lastTimestamp of the one Event."""
        self.ok(self.recorder.normal(self.server, "Server Management", "Server powered off."))
        self.clock.advance(61)
        self.ok(self.recorder.normal(self.server, "Server Management", "Server powered off."))
        [e] = self.events()
        self.assertEqual(e["count"], 2)
        self.assertEqual(e["lastTimestamp"], "2023-11-14T22:14:21Z")
        self.assertEqual(e["firstTimestamp"], "2023-11-14T22:13:20Z")

    def test_different_message_new_event(self) -> None:
        """A different message (or type) is a separate Event."""
        self.ok(self.recorder.normal(self.server, "Server Management", "a"))
        self.ok(self.recorder.warning(self.server, "Server Management", "a"))
        self.ok(self.recorder.normal(self.server, "Server Management", "b"))
        self.assertEqual(len(self.events()), 3)

    def test_deleted_event_recreated(self) -> None:
        """If the Event being counted was deleted (TTL), a new one is created."""
        e = self.ok(self.recorder.normal(self.server, "R", "m"))
        self.ok(self.store.delete(EVENT, e["metadata"]["name"], namespace="default"))
        again = self.ok(self.recorder.normal(self.server, "R", "m"))
        self.assertEqual(again["count"], 1)
        self.assertEqual(len(self.events()), 1)

    def test_rate_limited_then_refilled(self) -> None:
        """Beyond the burst, events of one object are dropped until tokens refill."""
        for i in range(5):
            self.ok(self.recorder.normal(self.server, "R", f"m{i}"))
        self.assertEqual(len(self.events()), 3)
        self.assertEqual(self.recorder.dropped, 2)
        self.clock.advance(300)
        self.assertIsNotNone(self.ok(self.recorder.normal(self.server, "R", "later")))
        self.assertEqual(len(self.events()), 4)

    def test_write_failure_never_raises(self) -> None:
        """A store failure is counted and the Deferred fires None."""
        self.store.create = lambda obj: fail(errors.Unavailable("down"))  # type: ignore[method-assign]
        self.assertIsNone(self.ok(self.recorder.normal(self.server, "R", "m")))
        self.assertEqual(self.recorder.failed, 1)
        self.flushLoggedErrors(errors.Unavailable)

    def test_concurrent_repeats_serialised(self) -> None:
        """Repeats recorded while the first write is in flight all land in one Event's count."""
        real_create = self.store.create
        # Hold the create: fire it only after the repeats were recorded.
        pending: list[Deferred[Any]] = []

        def hold(obj: Object) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            d.addCallback(lambda _: real_create(obj))
            return d

        self.store.create = hold  # type: ignore[method-assign]
        ds = [self.recorder.normal(self.server, "R", "m") for _ in range(3)]
        self.assertEqual(len(pending), 1)
        pending[0].callback(None)
        for d in ds:
            self.ok(d)
        [e] = self.events()
        self.assertEqual(e["count"], 3)
