"""EmbeddedStore: the contract suite, plus what only the embedded backend has (SQLite file,
restart durability, event-log compaction, bookmarks on a fake clock, admission)."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sidero.api import registry
from sidero.api.admission import Admission
from sidero.api.conditions import rfc3339 as conditions_rfc3339
from sidero.api.registry import ResourceType
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import (
    ADDED,
    BOOKMARK,
    DELETED,
    MODIFIED,
    IAdmission,
    IResourceStore,
    IWatch,
    WatchEvent,
)
from tests.store.contract import Recorder, StoreContractTests
from tests.store.inline import FakeReactor, inline_store, open_inline_store

Object = dict[str, Any]


def server(name: str, **spec: Any) -> Object:
    return {"apiVersion": registry.SERVER.api_version, "kind": "Server",
            "metadata": {"name": name}, "spec": {"accepted": False, **spec}}


def result_of(test: TestCase, d: Any) -> Any:
    """The result of an already-fired Deferred or finished coroutine."""
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    return test.successResultOf(d)


class EmbeddedContractTests(StoreContractTests, TestCase):
    """The contract, against a :memory: store running SQLite in its own real thread."""

    def makeStore(self) -> Deferred[IResourceStore]:
        from twisted.internet import reactor

        store = EmbeddedStore(reactor, ":memory:")

        async def ready() -> IResourceStore:
            await store.open()
            self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
            return store

        return Deferred.fromCoroutine(ready())


class EmbeddedInlineContractTests(StoreContractTests, TestCase):
    """The contract again, with the database calls inline and a fake clock (deterministic)."""

    def makeStore(self) -> Deferred[IResourceStore]:
        store, self.clock = open_inline_store(self)
        return succeed(store)

    def sleep(self, seconds: float) -> Deferred[None]:
        self.clock.advance(seconds)
        return succeed(None)


class EmbeddedAdmittedContractTests(EmbeddedInlineContractTests):
    """The contract with sidero's real admission, as a real API server with our CRDs applies
    schemas: proves the contract's objects are valid and survive pruning."""

    def makeStore(self) -> Deferred[IResourceStore]:
        store, self.clock = open_inline_store(self, admission=Admission())
        return succeed(store)


@implementer(IAdmission)
class StandInAdmission:
    """Defaults C{spec.pxeMode} and refuses a Server whose hostname is C{bad}."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def admit(self, kind: ResourceType, operation: str, new: Object | None, old: Object | None) -> Object | None:
        self.calls.append((kind.kind, operation))
        if operation == "DELETE":
            if old and old["metadata"].get("labels", {}).get("protected") == "yes":
                raise errors.Forbidden("protected")
            return None
        assert new is not None
        if kind is registry.SERVER:
            if new["spec"].get("hostname") == "bad":
                raise errors.invalid("Server", registry.METAL_GROUP, new["metadata"]["name"], [
                    {"field": "spec.hostname", "message": 'Invalid value: "bad": not allowed'}])
            new["spec"].setdefault("pxeMode", "bios")
        return new


class EmbeddedStoreTests(TestCase):
    """Behaviour only the embedded backend has, on the inline pool and a fake clock."""

    def open(self, path: str = ":memory:", **kwargs: Any) -> tuple[EmbeddedStore, FakeReactor]:
        return open_inline_store(self, path, **kwargs)

    def watch(self, store: EmbeddedStore, rt: ResourceType, callback: Callable[[WatchEvent], object],
              **kwargs: Any) -> IWatch:
        w: IWatch = result_of(self, store.watch(rt, callback, **kwargs))
        self.addCleanup(w.stop)
        return w

    def test_provides_interface(self) -> None:
        """EmbeddedStore provides IResourceStore."""
        store, _ = self.open()
        self.assertTrue(verifyObject(IResourceStore, store))

    def test_unconditional_update(self) -> None:
        """An update without resourceVersion is applied unconditionally."""
        store, _ = self.open()
        result_of(self, store.create(server("a")))
        updated = result_of(self, store.update(server("a", hostname="h")))
        self.assertEqual(updated["spec"]["hostname"], "h")
        self.assertEqual(updated["metadata"]["resourceVersion"], "2")

    def test_first_resource_version_and_timestamp(self) -> None:
        """The first write of a new store is resourceVersion 1; timestamps come from the reactor clock."""
        store, reactor = self.open()
        created = result_of(self, store.create(server("a")))
        self.assertEqual(created["metadata"]["resourceVersion"], "1")
        self.assertEqual(created["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z")

    def test_namespace_defaults(self) -> None:
        """A namespaced object without namespace goes to default; a cluster-scoped one drops it."""
        store, _ = self.open()
        mm = result_of(self, store.create({"apiVersion": registry.METAL_MACHINE.api_version,
                                           "kind": "MetalMachine", "metadata": {"name": "m"}, "spec": {}}))
        self.assertEqual(mm["metadata"]["namespace"], "default")
        srv = server("s")
        srv["metadata"]["namespace"] = "elsewhere"
        created = result_of(self, store.create(srv))
        self.assertNotIn("namespace", created["metadata"])
        self.assertEqual(result_of(self, store.get(registry.SERVER, "s", "whatever"))["metadata"]["uid"],
                         created["metadata"]["uid"])

    def test_non_storage_version_refused(self) -> None:
        """A served but non-storage version (v1alpha1) must be converted first: BadRequest."""
        store, _ = self.open()
        obj = server("a")
        obj["apiVersion"] = "metal.sidero.dev/v1alpha1"
        self.failureResultOf(store.create(obj), errors.BadRequest)

    def test_status_update_for_kind_without_subresource(self) -> None:
        """update_status of a kind without status subresource is the API server's 404."""
        store, _ = self.open()
        secret = result_of(self, store.create({"apiVersion": "v1", "kind": "Secret",
                                               "metadata": {"name": "s"}}))
        self.failureResultOf(store.update_status(dict(secret, status={})), errors.NotFound)

    def test_secret_has_no_generation(self) -> None:
        """Core kinds such as Secret carry no generation, as in Kubernetes."""
        store, _ = self.open()
        secret = result_of(self, store.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}))
        self.assertNotIn("generation", secret["metadata"])
        self.assertEqual(secret["type"], "Opaque")

    def test_concurrent_finalizer_deletion_bumps_generation(self) -> None:
        """Marking an object for deletion bumps its generation, as the API server does."""
        store, _ = self.open()
        obj = server("a")
        obj["metadata"]["finalizers"] = ["x.io/f"]
        result_of(self, store.create(obj))
        deleting = result_of(self, store.delete(registry.SERVER, "a"))
        self.assertEqual(deleting["metadata"]["generation"], 2)

    # -- admission ------------------------------------------------------------------------

    def test_admission_defaults_are_stored(self) -> None:
        """What admission returns is what gets stored."""
        admission = StandInAdmission()
        store, _ = self.open(admission=admission)
        created = result_of(self, store.create(server("a")))
        self.assertEqual(created["spec"]["pxeMode"], "bios")
        self.assertEqual(result_of(self, store.get(registry.SERVER, "a"))["spec"]["pxeMode"], "bios")
        self.assertEqual(admission.calls, [("Server", "CREATE")])

    def test_admission_refusal_writes_nothing(self) -> None:
        """An admission error propagates unchanged and nothing is written or published."""
        store, _ = self.open(admission=StandInAdmission())
        recorder = Recorder()
        self.watch(store, registry.SERVER, recorder, resource_version="0")
        err = self.failureResultOf(store.create(server("a", hostname="bad")), errors.Invalid)
        self.assertEqual(err.value.message,
                         'Server.metal.sidero.dev "a" is invalid: spec.hostname: Invalid value: "bad": not allowed')
        self.failureResultOf(store.get(registry.SERVER, "a"), errors.NotFound)
        good = result_of(self, store.create(server("b")))
        self.assertEqual(good["metadata"]["resourceVersion"], "1")
        self.failureResultOf(store.update(dict(good, spec={"accepted": True, "hostname": "bad"})), errors.Invalid)
        self.failureResultOf(store.patch(registry.SERVER, "b", {"spec": {"hostname": "bad"}}), errors.Invalid)
        self.assertEqual(result_of(self, store.get(registry.SERVER, "b"))["metadata"]["resourceVersion"], "1")
        self.assertEqual([e.type for e in recorder.events], [ADDED])

    def test_admission_can_refuse_delete(self) -> None:
        """A DELETE refused by admission leaves the object in place."""
        store, _ = self.open(admission=StandInAdmission())
        obj = server("a")
        obj["metadata"]["labels"] = {"protected": "yes"}
        result_of(self, store.create(obj))
        self.failureResultOf(store.delete(registry.SERVER, "a"), errors.Forbidden)
        result_of(self, store.get(registry.SERVER, "a"))

    def test_real_admission_refuses_invalid_server(self) -> None:
        """sidero.api.admission.Admission refuses a Server with an invalid bootFromDiskMethod."""
        store, _ = self.open(admission=Admission())
        err = self.failureResultOf(store.create(server("a", bootFromDiskMethod="floppy")), errors.Invalid)
        self.assertIn('Invalid value: "floppy"', err.value.message)
        self.failureResultOf(store.get(registry.SERVER, "a"), errors.NotFound)

    # -- watch details --------------------------------------------------------------------

    def test_bookmarks(self) -> None:
        """A watch asking for bookmarks gets one after the initial list and then periodically."""
        store, reactor = self.open(bookmark_interval=30)
        result_of(self, store.create(server("a")))
        recorder = Recorder()
        self.watch(store, registry.SERVER, recorder, bookmarks=True)
        self.assertEqual([e.type for e in recorder.events], [ADDED])
        self.assertEqual(len(recorder.bookmarks), 1)
        first = recorder.bookmarks[0].object
        self.assertEqual(first["metadata"]["resourceVersion"], "1")
        self.assertEqual(first["metadata"]["annotations"], {"k8s.io/initial-events-end": "true"})
        self.assertEqual(first["kind"], "Server")
        result_of(self, store.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}))
        reactor.advance(30)
        self.assertEqual(len(recorder.bookmarks), 2)
        self.assertEqual(recorder.bookmarks[1].object["metadata"]["resourceVersion"], "2")
        reactor.advance(30)
        self.assertEqual(len(recorder.bookmarks), 3)

    def test_events_expire_after_their_ttl(self) -> None:
        """Events are deleted (watchers see DELETED) a TTL after their last write, not before."""
        store, reactor = self.open(event_ttl=600)

        def event(name: str, last: float) -> Object:
            stamp = conditions_rfc3339(last)
            return {"apiVersion": "v1", "kind": "Event",
                    "metadata": {"name": name, "namespace": "default"},
                    "involvedObject": {"kind": "Server", "name": "a"}, "reason": "R", "message": "m",
                    "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1, "type": "Normal"}

        now = reactor.seconds()
        result_of(self, store.create(event("old", now)))
        recorder = Recorder()
        self.watch(store, registry.EVENT, recorder)
        reactor.advance(400)
        result_of(self, store.create(event("young", reactor.seconds())))
        # "old" is renewed by a later write (client-go bumps lastTimestamp on a repeat).
        reactor.advance(100)
        renewed = result_of(self, store.get(registry.EVENT, "old", "default"))
        renewed["lastTimestamp"] = conditions_rfc3339(reactor.seconds())
        result_of(self, store.update(renewed))
        reactor.advance(600)  # young: 700 s old; old: 600 s since its renewal
        names = [e["metadata"]["name"] for e in result_of(self, store.list(registry.EVENT)).items]
        self.assertEqual(names, ["old"])
        self.assertIn((DELETED, "young"), [(e.type, e.object["metadata"]["name"]) for e in recorder.events])
        reactor.advance(200)
        self.assertEqual(result_of(self, store.list(registry.EVENT)).items, [])
        # Other kinds never expire.
        result_of(self, store.create(server("s")))
        reactor.advance(100_000)
        self.assertEqual(len(result_of(self, store.list(registry.SERVER)).items), 1)

    def test_no_bookmarks_unless_asked(self) -> None:
        """A watch without bookmarks=True never gets a BOOKMARK."""
        store, reactor = self.open(bookmark_interval=30)
        recorder = Recorder()
        self.watch(store, registry.SERVER, recorder)
        reactor.advance(300)
        self.assertEqual(recorder.bookmarks, [])

    def test_compacted_resource_version_is_gone(self) -> None:
        """A watch from a resourceVersion older than the retained log ends with Gone via done."""
        store, _ = self.open(event_log_size=5)
        for i in range(20):
            result_of(self, store.create(server(f"s{i}")))
        w = self.watch(store, registry.SERVER, Recorder(), resource_version="2")
        failure = self.failureResultOf(w.done, errors.Gone)
        self.assertEqual(failure.value.code, 410)
        recent = Recorder()
        w2 = self.watch(store, registry.SERVER, recent, resource_version="17")
        self.assertEqual([e.object["metadata"]["name"] for e in recent.events], ["s17", "s18", "s19"])
        self.assertNoResult(w2.done)

    def test_event_log_is_bounded(self) -> None:
        """The persisted event log stays near its configured size however many writes happen."""
        path = self.mktemp()
        store, _ = inline_store(path, event_log_size=50)
        result_of(self, store.open())
        for i in range(300):
            result_of(self, store.create(server(f"s{i}")))
        result_of(self, store.close())
        conn = sqlite3.connect(path)
        count, low = conn.execute("SELECT COUNT(*), MIN(rv) FROM events").fetchone()
        conn.close()
        self.assertLessEqual(count, 55)
        self.assertGreaterEqual(count, 50)
        self.assertEqual(low, 300 - count + 1)

    def test_bad_resource_version_is_bad_request(self) -> None:
        """A watch or delete with a resourceVersion that is not a number fails with BadRequest."""
        store, _ = self.open()
        self.failureResultOf(store.watch(registry.SERVER, Recorder(), resource_version="abc"), errors.BadRequest)
        self.failureResultOf(store.delete(registry.SERVER, "x", resource_version="abc"), errors.BadRequest)

    def test_callback_may_stop_its_watch(self) -> None:
        """A callback that stops its own watch gets nothing more."""
        store, _ = self.open()
        seen: list[WatchEvent] = []
        holder: list[IWatch] = []

        def callback(event: WatchEvent) -> None:
            seen.append(event)
            holder[0].stop()

        holder.append(self.watch(store, registry.SERVER, callback, resource_version="0"))
        result_of(self, store.create(server("a")))
        result_of(self, store.create(server("b")))
        self.assertEqual(len(seen), 1)
        self.assertEqual(store.watcher_count(), 0)

    def test_write_from_callback_keeps_order(self) -> None:
        """A callback that writes while an event is being delivered does not reorder other watchers."""
        store, _ = self.open()

        def writer(event: WatchEvent) -> None:
            if event.object["metadata"]["name"] == "a":
                store.create(server("b"))

        self.watch(store, registry.SERVER, writer, resource_version="0")
        recorder = Recorder()
        self.watch(store, registry.SERVER, recorder, resource_version="0")
        result_of(self, store.create(server("a")))
        self.assertEqual([e.object["metadata"]["name"] for e in recorder.events], ["a", "b"])

    def test_close_ends_watches_with_unavailable(self) -> None:
        """Closing the store ends running watches with Unavailable and refuses later calls."""
        store, _ = inline_store()
        result_of(self, store.open())
        w = self.watch(store, registry.SERVER, Recorder())
        result_of(self, store.close())
        self.failureResultOf(w.done, errors.Unavailable)
        self.failureResultOf(store.get(registry.SERVER, "a"), errors.Unavailable)
        self.failureResultOf(store.create(server("a")), errors.Unavailable)

    def test_namespace_watch(self) -> None:
        """A watch on one namespace sees nothing from another."""
        store, _ = self.open()
        recorder = Recorder()
        self.watch(store, registry.SECRET, recorder, namespace="a", resource_version="0")
        for ns in ("b", "a"):
            result_of(self, store.create({"apiVersion": "v1", "kind": "Secret",
                                          "metadata": {"name": "s", "namespace": ns}}))
        self.assertEqual([e.object["metadata"]["namespace"] for e in recorder.events], ["a"])

    # -- garbage collection ---------------------------------------------------------------

    def test_absent_owner_collects_dependent(self) -> None:
        """An object whose only owner never existed is collected, as the Kubernetes GC does."""
        store, _ = self.open()
        obj = server("orphan")
        obj["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Secret", "name": "x",
                                               "uid": "00000000-0000-0000-0000-000000000000"}]
        result_of(self, store.create(obj))
        result_of(self, store.gc_idle())
        self.failureResultOf(store.get(registry.SERVER, "orphan"), errors.NotFound)

    def test_gc_idle(self) -> None:
        """gc_idle fires at once when nothing is pending and the dependents are gone by then."""
        store, _ = self.open()
        self.successResultOf(store.gc_idle())
        owner = result_of(self, store.create(server("owner")))
        dep = server("dep")
        dep["metadata"]["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": "Server",
                                               "name": "owner", "uid": owner["metadata"]["uid"]}]
        result_of(self, store.create(dep))
        recorder = Recorder()
        self.watch(store, registry.SERVER, recorder, resource_version="2")
        result_of(self, store.delete(registry.SERVER, "owner"))
        result_of(self, store.gc_idle())
        self.assertEqual([(e.type, e.object["metadata"]["name"]) for e in recorder.events],
                         [(DELETED, "owner"), (DELETED, "dep")])

    def test_gc_resumes_after_restart(self) -> None:
        """Dependents of an owner removed just before a stop are collected at the next open."""
        path = self.mktemp()
        store, _ = inline_store(path)
        result_of(self, store.open())
        owner = result_of(self, store.create(server("owner")))
        dep = server("dep")
        dep["metadata"]["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": "Server",
                                               "name": "owner", "uid": owner["metadata"]["uid"]}]
        result_of(self, store.create(dep))
        result_of(self, store.close())
        # As if the process died between the owner's removal and the garbage collector's turn.
        conn = sqlite3.connect(path)
        conn.execute("DELETE FROM objects WHERE name = 'owner'")
        conn.commit()
        conn.close()
        again, _ = inline_store(path)
        result_of(self, again.open())
        self.addCleanup(lambda: result_of(self, again.close()))
        result_of(self, again.gc_idle())
        self.failureResultOf(again.get(registry.SERVER, "dep"), errors.NotFound)

    def test_bad_input_is_bad_request(self) -> None:
        """A patch that is not an object, or an object that is not JSON, is refused with BadRequest."""
        store, _ = self.open()
        result_of(self, store.create(server("a")))
        self.failureResultOf(store.patch(registry.SERVER, "a", ["x"]), errors.BadRequest)  # type: ignore[arg-type]
        self.failureResultOf(store.create(server("b", hostname=object())), errors.BadRequest)
        self.failureResultOf(store.create({"apiVersion": "v9", "kind": "Nope", "metadata": {"name": "x"}}),
                             errors.BadRequest)
        self.failureResultOf(store.patch(registry.SERVER, "a", {}, subresource="scale"), errors.NotFound)

    # -- durability -----------------------------------------------------------------------

    def test_restart_keeps_objects_and_resource_versions(self) -> None:
        """A file store reopened keeps its objects, and resourceVersions keep increasing."""
        path = os.path.join(self.mktemp(), "state", "store.db")
        store, _ = inline_store(path)
        result_of(self, store.open())
        a = result_of(self, store.create(server("a", hostname="h")))
        result_of(self, store.patch(registry.SERVER, "a", {"status": {"power": "on"}}, subresource="status"))
        before = result_of(self, store.list(registry.SERVER)).resource_version
        result_of(self, store.close())
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

        again, _ = inline_store(path)
        result_of(self, again.open())
        self.addCleanup(lambda: result_of(self, again.close()))
        got = result_of(self, again.get(registry.SERVER, "a"))
        self.assertEqual(got["metadata"]["uid"], a["metadata"]["uid"])
        self.assertEqual(got["status"], {"power": "on"})
        b = result_of(self, again.create(server("b")))
        self.assertGreater(int(b["metadata"]["resourceVersion"]), int(before))

        recorder = Recorder()
        self.watch(again, registry.SERVER, recorder, resource_version=a["metadata"]["resourceVersion"])
        self.assertEqual([(e.type, e.object["metadata"]["name"]) for e in recorder.events],
                         [(MODIFIED, "a"), (ADDED, "b")])

    def test_restart_after_compaction_is_gone(self) -> None:
        """A watch from a pre-restart resourceVersion that was compacted since ends with Gone."""
        path = self.mktemp()
        store, _ = inline_store(path, event_log_size=3)
        result_of(self, store.open())
        first = result_of(self, store.create(server("a")))
        result_of(self, store.close())
        again, _ = inline_store(path, event_log_size=3)
        result_of(self, again.open())
        self.addCleanup(lambda: result_of(self, again.close()))
        for i in range(10):
            result_of(self, again.create(server(f"n{i}")))
        w = self.watch(again, registry.SERVER, Recorder(),
                                        resource_version=first["metadata"]["resourceVersion"])
        self.failureResultOf(w.done, errors.Gone)


class ThreadedStoreTests(TestCase):
    """The store with its own real database thread (the production arrangement)."""

    async def test_failed_open_stops_its_thread(self) -> None:
        """A database that cannot be opened fails open() and leaves no store thread running."""
        from twisted.internet import reactor

        not_a_dir = self.mktemp()
        with open(not_a_dir, "w") as f:
            f.write("x")
        store = EmbeddedStore(reactor, os.path.join(not_a_dir, "state.db"))
        with self.assertRaises(FileExistsError):
            await store.open()
        self.assertIsNotNone(store._service)
        assert store._service is not None
        self.assertFalse(store._service.running)
        self.assertFalse(store._service.pool.started)

    async def test_many_concurrent_writes_reach_watchers_in_order(self) -> None:
        """Writes issued without waiting reach a watcher in resourceVersion order, without gaps."""
        from twisted.internet import reactor
        from twisted.internet.defer import gatherResults

        store = EmbeddedStore(reactor, ":memory:")
        await store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        recorder = Recorder()
        w = await store.watch(registry.SERVER, recorder, resource_version="0")
        self.addCleanup(w.stop)
        results = await gatherResults([store.create(server(f"s{i}")) for i in range(40)])
        rvs = sorted(int(o["metadata"]["resourceVersion"]) for o in results)
        self.assertEqual(rvs, list(range(1, 41)))
        self.assertEqual([int(e.object["metadata"]["resourceVersion"]) for e in recorder.events], rvs)

    async def test_watch_started_during_writes_misses_nothing(self) -> None:
        """A watch from rv 0 started while writes are in flight sees each object exactly once."""
        from twisted.internet import reactor
        from twisted.internet.defer import gatherResults

        store = EmbeddedStore(reactor, ":memory:")
        await store.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(store.close()))
        pending = [store.create(server(f"s{i}")) for i in range(20)]
        recorder = Recorder()
        watching = store.watch(registry.SERVER, recorder, resource_version="")
        pending += [store.create(server(f"t{i}")) for i in range(20)]
        await gatherResults(pending)
        w = await watching
        self.addCleanup(w.stop)
        names = [e.object["metadata"]["name"] for e in recorder.events]
        self.assertEqual(len(names), 40)
        self.assertEqual(set(names), {f"s{i}" for i in range(20)} | {f"t{i}" for i in range(20)})
        self.assertTrue(all(e.type == ADDED for e in recorder.events))
        self.assertNotIn(BOOKMARK, [e.type for e in recorder.events])
