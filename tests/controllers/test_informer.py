"""Informer: initial sync, watch events, Gone → relist with synthetic events, reconnect backoff, indexes.

Against the real embedded store (inline), so resourceVersions, resumption and Gone are the
store's own; L{FlakyStore} stages the failures."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero.api.registry import METAL_MACHINE, SERVER, SERVER_BINDING
from sidero.backoff import Backoff
from sidero.controllers.informer import Informer, object_key, split_key
from sidero.store.errors import Gone, Unavailable
from sidero.store.interfaces import Object
from tests.store.flaky import FlakyStore
from tests.store.inline import open_inline_store


def server(name: str, labels: dict[str, str] | None = None, **spec: Any) -> Object:
    return {
        "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
        "metadata": {"name": name, "labels": labels or {}}, "spec": dict(spec),
    }


def binding(name: str, machine: str) -> Object:
    return {
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "ServerBinding",
        "metadata": {"name": name},
        "spec": {"metalMachineRef": {"namespace": "default", "name": machine}},
    }


class Recorder:
    def __init__(self, informer: Informer) -> None:
        self.events: list[tuple[str, ...]] = []
        informer.add_handler(
            on_add=lambda o: self.events.append(("add", o["metadata"]["name"])),
            on_update=lambda old, new: self.events.append(
                ("update", new["metadata"]["name"], old["metadata"]["resourceVersion"],
                 new["metadata"]["resourceVersion"])),
            on_delete=lambda o: self.events.append(("delete", o["metadata"]["name"])),
        )


def flaky_store(test: SynchronousTestCase, **kwargs: Any) -> FlakyStore:
    store, _ = open_inline_store(test, **kwargs)
    return FlakyStore(store)


class InformerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        # A short event log: three writes while disconnected push the informer's
        # resourceVersion out of it, so resuming the watch is Gone.
        self.store = flaky_store(self, event_log_size=2)
        self.store.create(server("a", {"rack": "1"}, accepted=True))
        self.store.create(server("b", {"rack": "2"}))
        self.informer = Informer(
            self.store, SERVER, clock=self.clock, backoff=Backoff(1, 2, 8, 0.5), random=lambda: 0.0,
        )
        self.rec = Recorder(self.informer)

    def start(self) -> None:
        self.informer.startService()
        self.addCleanup(self.informer.stopService)

    def test_initial_sync(self) -> None:
        """The first list fills the cache, fires synced, emits adds and watches from its RV."""
        synced = self.informer.synced
        self.assertNoResult(synced)
        self.start()
        self.successResultOf(synced)
        self.successResultOf(self.informer.synced)
        self.assertTrue(self.informer.has_synced)
        self.assertEqual(self.rec.events, [("add", "a"), ("add", "b")])
        self.assertEqual(self.store.watch_calls, ["2"])
        self.assertEqual(self.informer.get("a")["spec"], {"accepted": True})  # type: ignore[index]
        self.assertIsNone(self.informer.get("zzz"))

    def test_watch_events_update_cache(self) -> None:
        """ADDED/MODIFIED/DELETED events from the watch change the cache and reach handlers."""
        self.start()
        self.store.create(server("c"))
        obj = self.informer.get_copy("a")
        assert obj is not None
        obj["spec"]["accepted"] = False
        self.store.update(obj)
        self.store.delete(SERVER, "b")
        self.assertEqual([o["metadata"]["name"] for o in self.informer.list()], ["a", "c"])
        self.assertEqual(self.informer.get("a")["spec"]["accepted"], False)  # type: ignore[index]
        self.assertEqual(
            self.rec.events[2:], [("add", "c"), ("update", "a", "1", "4"), ("delete", "b")]
        )
        self.assertEqual(self.informer.resource_version, "5")

    def test_get_copy_does_not_alias_cache(self) -> None:
        """Modifying a get_copy result leaves the cached object unchanged."""
        self.start()
        obj = self.informer.get_copy("a")
        assert obj is not None
        obj["spec"]["accepted"] = "mutated"
        self.assertEqual(self.informer.get("a")["spec"]["accepted"], True)  # type: ignore[index]

    def test_list_filters_by_label_selector(self) -> None:
        """list() applies a label selector given as a string."""
        self.start()
        self.assertEqual([o["metadata"]["name"] for o in self.informer.list(label_selector="rack=2")],
                         ["b"])
        self.assertEqual(self.informer.keys(), ["a", "b"])

    def test_late_handler_gets_existing_objects(self) -> None:
        """A handler added after sync is called with an add for each cached object."""
        self.start()
        late = Recorder(self.informer)
        self.assertEqual(late.events, [("add", "a"), ("add", "b")])

    def test_gone_relists_with_synthetic_events(self) -> None:
        """After Gone, a relist emits delete for vanished, update for changed, add for new objects."""
        self.start()
        self.store.end_watches(Unavailable("down"))  # stop receiving events
        # While disconnected: b deleted, a changed, c created; the history is compacted.
        self.store.delete(SERVER, "b")
        obj = self.informer.get_copy("a")
        assert obj is not None
        obj["spec"]["accepted"] = False
        self.store.update(obj)
        self.store.create(server("c"))
        self.rec.events.clear()
        lists_before = self.store.list_calls
        self.clock.advance(1)  # reconnect: watch from RV 2 → Gone → relist
        self.assertEqual(self.store.list_calls, lists_before + 1)
        self.assertEqual(
            self.rec.events, [("delete", "b"), ("update", "a", "1", "4"), ("add", "c")]
        )
        self.assertEqual(self.informer.keys(), ["a", "c"])
        self.assertEqual(self.store.watch_calls[-1], "5")
        self.assertEqual(len(self.store.watches), 1)

    def test_gone_from_watch_relists_immediately(self) -> None:
        """A watch ending with Gone relists at once (no backoff) and resumes watching."""
        self.start()
        self.store.end_watches(Gone("expired"))
        self.assertEqual(self.store.list_calls, 2)
        self.assertEqual(len(self.store.watches), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reconnect_backoff_serving_stale_cache(self) -> None:
        """Watch errors back off 1, 2, 4, 8, 8 s (capped) while the stale cache stays readable."""
        self.start()
        self.store.fail_watches = [Unavailable("down")] * 4
        self.store.end_watches(Unavailable("down"))
        delays = []
        for _ in range(5):
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.assertIsNotNone(self.informer.get("a"))
            self.assertEqual(len(self.informer), 2)
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1, 2, 4, 8, 8])
        self.assertEqual(len(self.store.watches), 1)
        # resumed from the last RV, so no relist was needed
        self.assertEqual(self.store.list_calls, 1)
        self.store.create(server("c"))
        self.assertIsNotNone(self.informer.get("c"))

    def test_backoff_jitter_and_reset(self) -> None:
        """Jitter lengthens a delay by up to its fraction; a working connection resets the backoff."""
        self.informer._random = lambda: 1.0
        self.start()
        self.store.fail_watches = [Unavailable("down")]
        self.store.end_watches(Unavailable("down"))
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 1.5)
        self.clock.advance(1.5)
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 3.0)
        self.clock.advance(3)
        self.store.create(server("c"))  # an event: the connection works
        self.store.end_watches(Unavailable("down"))
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 1.5)

    def test_list_failure_retries(self) -> None:
        """A failing initial list is retried after a backoff; synced fires only when it works."""
        self.store.fail_lists = [Unavailable("down")]
        self.start()
        self.assertFalse(self.informer.has_synced)
        self.assertEqual(len(self.informer), 0)
        self.clock.advance(1)
        self.assertTrue(self.informer.has_synced)
        self.assertEqual(len(self.informer), 2)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_stop_stops_watch_and_timers(self) -> None:
        """stopService ends the watch and cancels any pending reconnect."""
        self.start()
        self.store.fail_watches = [Unavailable("down")]
        self.store.end_watches(Unavailable("down"))
        self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(self.informer.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.store.watches, [])

    def test_resync(self) -> None:
        """With a resync period, every cached object is re-delivered as an update periodically."""
        informer = Informer(self.store, SERVER, clock=self.clock, resync_period=60)
        rec = Recorder(informer)
        informer.startService()
        self.addCleanup(informer.stopService)
        rec.events.clear()
        self.clock.advance(60)
        self.assertEqual(rec.events, [("update", "a", "1", "1"), ("update", "b", "2", "2")])

    def test_handler_exception_does_not_break_informer(self) -> None:
        """A failing handler is logged; the cache and other handlers still see the event."""
        def boom(_: Object) -> None:
            raise RuntimeError("handler bug")

        self.informer.add_handler(on_add=boom)
        self.start()
        self.store.create(server("c"))
        self.assertIn(("add", "c"), self.rec.events)
        self.assertIsNotNone(self.informer.get("c"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)


class IndexTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = flaky_store(self)
        self.store.create(binding("s1", "m1"))
        self.store.create(binding("s2", "m2"))
        self.informer = Informer(self.store, SERVER_BINDING, clock=self.clock)
        self.informer.add_index(
            "machine", lambda o: [o["spec"]["metalMachineRef"]["name"]]
        )
        self.informer.startService()
        self.addCleanup(self.informer.stopService)

    def names(self, objs: list[Object]) -> list[str]:
        return [o["metadata"]["name"] for o in objs]

    def test_index_lookup(self) -> None:
        """by_index finds ServerBindings by spec.metalMachineRef.name."""
        self.assertEqual(self.names(self.informer.by_index("machine", "m1")), ["s1"])
        self.assertEqual(self.informer.by_index("machine", "nope"), [])

    def test_index_follows_changes(self) -> None:
        """Updates move an object between index values; deletes remove it."""
        obj = self.informer.get_copy("s1")
        assert obj is not None
        obj["spec"]["metalMachineRef"]["name"] = "m2"
        self.store.update(obj)
        self.assertEqual(self.informer.by_index("machine", "m1"), [])
        self.assertEqual(self.names(self.informer.by_index("machine", "m2")), ["s1", "s2"])
        self.store.delete(SERVER_BINDING, "s2")
        self.assertEqual(self.names(self.informer.by_index("machine", "m2")), ["s1"])

    def test_index_added_late(self) -> None:
        """An index added after sync covers objects already cached."""
        self.informer.add_index("name", lambda o: [o["metadata"]["name"]])
        self.assertEqual(self.names(self.informer.by_index("name", "s2")), ["s2"])

    def test_index_errors_are_isolated(self) -> None:
        """An index function raising for one object does not stop caching it."""
        self.informer.add_index("bad", lambda o: [o["spec"]["nope"]])
        self.store.create(binding("s3", "m3"))
        self.assertIsNotNone(self.informer.get("s3"))
        self.assertEqual(self.names(self.informer.by_index("machine", "m3")), ["s3"])
        self.flushLoggedErrors(KeyError)


class NamespacedTests(SynchronousTestCase):
    def test_namespaced_keys(self) -> None:
        """Namespaced objects are keyed by (namespace, name) and list() filters by namespace."""
        store = flaky_store(self)
        for ns in ("a", "b"):
            store.create({
                "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha3", "kind": "MetalMachine",
                "metadata": {"name": "m", "namespace": ns}, "spec": {},
            })
        informer = Informer(store, METAL_MACHINE, clock=Clock())
        informer.startService()
        self.addCleanup(informer.stopService)
        self.assertEqual(informer.get("m", "b")["metadata"]["namespace"], "b")  # type: ignore[index]
        self.assertIsNone(informer.get("m"))
        self.assertEqual(len(informer.list(namespace="a")), 1)
        self.assertEqual(informer.keys(), ["a/m", "b/m"])
        self.assertEqual(split_key("a/m"), ("a", "m"))
        self.assertEqual(split_key("m"), (None, "m"))
        self.assertEqual(object_key(informer.list()[0]), "a/m")
