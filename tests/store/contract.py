"""Contract tests for every L{IResourceStore} backend.

Mix L{StoreContractTests} into a trial C{TestCase} and implement L{StoreContractTests.makeStore}
(a Deferred of a ready store, its cleanup registered with C{addCleanup}).  The tests use only
the interface, kinds that a real API server with sidero's CRDs serves, unique names per test
and the namespaces every cluster has, and they wait for asynchronous effects (watch events,
garbage collection) by bounded polling, so they run unchanged against a real kube-apiserver
(garbage collection there needs kube-controller-manager's garbage collector).
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.store import errors
from sidero.store.interfaces import (
    ADDED,
    BOOKMARK,
    DELETED,
    MODIFIED,
    IResourceStore,
    IWatch,
    WatchEvent,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase as _Base
else:
    _Base = object

Object = dict[str, Any]

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
FINALIZER = "contract.sidero.dev/hold"


class Recorder:
    """Collects the events of one watch (bookmarks apart)."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self.bookmarks: list[WatchEvent] = []

    def __call__(self, event: WatchEvent) -> None:
        if event.type == BOOKMARK:
            self.bookmarks.append(event)
        else:
            self.events.append(event)

    def of(self, name: str) -> list[tuple[str, Object]]:
        return [(e.type, e.object) for e in self.events if e.object["metadata"].get("name") == name]

    def types(self, name: str) -> list[str]:
        return [t for t, _ in self.of(name)]


class StoreContractTests(_Base):
    """Behaviour every store backend must share with the Kubernetes API server."""

    store: IResourceStore
    timeout = 60
    poll_interval = 0.05
    wait_limit = 30.0
    # Kubernetes' garbage collector is asynchronous and rediscovers resources (new CRDs) only
    # every 30 s, after which its informers must sync: allow two such periods and a margin.
    gc_wait_limit = 90.0

    # -- hooks for the backend's test case ------------------------------------------------

    def makeStore(self) -> Deferred[IResourceStore]:
        """A ready store; register its cleanup with C{addCleanup}."""
        raise NotImplementedError

    def sleep(self, seconds: float) -> Deferred[None]:
        """Let C{seconds} pass (the real reactor by default; a fake clock may override)."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        return deferLater(reactor, seconds, lambda: None)

    # -- helpers --------------------------------------------------------------------------

    async def setUp(self) -> None:  # type: ignore[override]
        self.store = await self.makeStore()
        self.run_id = uuid.uuid4().hex[:8]

    def unique(self, prefix: str = "c") -> str:
        return f"{prefix}-{self.run_id}-{uuid.uuid4().hex[:6]}"

    async def eventually(
        self, check: Callable[[], Awaitable[Any] | Any], what: str = "condition",
        limit: float | None = None,
    ) -> Any:
        """Call C{check} until it stops raising AssertionError (or NotFound), within C{limit}
        seconds (L{wait_limit} by default)."""
        limit = self.wait_limit if limit is None else limit
        steps = int(limit / self.poll_interval)
        last: Exception | None = None
        for _ in range(steps):
            try:
                result = check()
                if isinstance(result, (Deferred, Awaitable)):
                    result = await result
                return result
            except (AssertionError, errors.NotFound) as e:
                last = e
            await self.sleep(self.poll_interval)
        self.fail(f"{what} did not happen within {limit}s: {last}")

    def server(self, name: str | None = None, labels: dict[str, str] | None = None, **spec: Any) -> Object:
        meta: Object = {"name": name or self.unique("srv"), "labels": {"contract-run": self.run_id}}
        meta["labels"].update(labels or {})
        return {"apiVersion": registry.SERVER.api_version, "kind": "Server", "metadata": meta,
                "spec": {"accepted": False, **spec}}

    def binding_spec(self) -> Object:
        """A ServerBinding spec that passes the CRD schema (metalMachineRef is required)."""
        return {"metalMachineRef": {"kind": "MetalMachine", "namespace": "default",
                                    "name": self.unique("mm")}}

    def owner_ref(self, owner: Object) -> Object:
        return {"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"]}

    async def create(self, obj: Object) -> Object:
        """Create and register a cleanup that removes the object whatever its finalizers."""
        created = await self.store.create(obj)
        rt = registry.by_api_version_kind(created["apiVersion"], created["kind"])
        meta = created["metadata"]
        self.addCleanup(self.purge, rt, meta["name"], meta.get("namespace"))
        return created

    async def purge(self, rt: ResourceType, name: str, namespace: str | None) -> None:
        try:
            obj = await self.store.get(rt, name, namespace)
            if obj["metadata"].get("finalizers"):
                await self.store.patch(rt, name, {"metadata": {"finalizers": None}}, namespace)
            await self.store.delete(rt, name, namespace)
        except errors.NotFound:
            pass

    async def watch(self, rt: ResourceType, **kwargs: Any) -> tuple[Recorder, IWatch]:
        recorder = Recorder()
        w = await self.store.watch(rt, recorder, **kwargs)
        self.addCleanup(w.stop)
        return recorder, w

    async def assert_fails(self, d: Awaitable[Any], error: type[errors.StoreError]) -> errors.StoreError:
        try:
            await d
        except error as e:
            return e
        self.fail(f"expected {error.__name__}")

    # -- create / get ---------------------------------------------------------------------

    async def test_create_sets_server_fields(self) -> None:
        """create fills uid, creationTimestamp, resourceVersion and generation 1."""
        created = await self.create(self.server())
        meta = created["metadata"]
        self.assertEqual(len(str(uuid.UUID(meta["uid"]))), 36)
        self.assertRegex(meta["creationTimestamp"], RFC3339)
        self.assertTrue(meta["resourceVersion"].isdigit())
        self.assertEqual(meta["generation"], 1)
        self.assertNotIn("namespace", meta)
        fetched = await self.store.get(registry.SERVER, meta["name"])
        self.assertEqual(fetched["metadata"]["uid"], meta["uid"])
        self.assertEqual(fetched["metadata"]["resourceVersion"], meta["resourceVersion"])

    async def test_resource_versions_increase(self) -> None:
        """Each write gets a larger resourceVersion, across kinds."""
        a = await self.create(self.server())
        b = await self.create({"apiVersion": "v1", "kind": "Secret",
                               "metadata": {"name": self.unique("sec"), "namespace": "default"}})
        c = await self.store.patch(registry.SERVER, a["metadata"]["name"], {"spec": {"hostname": "h"}})
        rvs = [int(o["metadata"]["resourceVersion"]) for o in (a, b, c)]
        self.assertEqual(rvs, sorted(set(rvs)))

    async def test_create_drops_status_of_status_subresource(self) -> None:
        """create ignores status for a kind with a status subresource."""
        obj = self.server()
        obj["status"] = {"ready": True, "power": "on"}
        created = await self.create(obj)
        self.assertNotIn("status", created)
        fetched = await self.store.get(registry.SERVER, created["metadata"]["name"])
        self.assertNotIn("status", fetched)

    async def test_create_existing_is_already_exists(self) -> None:
        """A second create of the same name fails with AlreadyExists and the Kubernetes wording."""
        obj = self.server()
        await self.create(obj)
        err = await self.assert_fails(self.store.create(obj), errors.AlreadyExists)
        self.assertEqual(err.message, f'servers.metal.sidero.dev "{obj["metadata"]["name"]}" already exists')

    async def test_get_missing_is_not_found(self) -> None:
        """get of a missing object fails with NotFound worded as the API server words it."""
        name = self.unique("missing")
        err = await self.assert_fails(self.store.get(registry.SERVER, name), errors.NotFound)
        self.assertEqual(err.message, f'servers.metal.sidero.dev "{name}" not found')

    async def test_generate_name(self) -> None:
        """generateName yields distinct names made of the prefix and a five-character suffix."""
        prefix = f"gen-{self.run_id}-"
        names = set()
        for _ in range(2):
            obj = self.server()
            del obj["metadata"]["name"]
            obj["metadata"]["generateName"] = prefix
            created = await self.create(obj)
            name = created["metadata"]["name"]
            self.assertTrue(name.startswith(prefix))
            self.assertEqual(len(name), len(prefix) + 5)
            names.add(name)
        self.assertEqual(len(names), 2)

    async def test_namespaced_kind_lands_in_its_namespace(self) -> None:
        """A namespaced object is stored and read in its namespace only."""
        name = self.unique("sec")
        created = await self.create({"apiVersion": "v1", "kind": "Secret",
                                     "metadata": {"name": name, "namespace": "kube-public"},
                                     "stringData": {"k": "value"}})
        self.assertEqual(created["metadata"]["namespace"], "kube-public")
        self.assertEqual(created["data"], {"k": base64.b64encode(b"value").decode()})
        self.assertNotIn("stringData", created)
        await self.assert_fails(self.store.get(registry.SECRET, name, "default"), errors.NotFound)
        fetched = await self.store.get(registry.SECRET, name, "kube-public")
        self.assertEqual(fetched["metadata"]["uid"], created["metadata"]["uid"])

    async def test_invalid_name_is_invalid(self) -> None:
        """A name that is not a DNS subdomain is refused with Invalid."""
        obj = self.server(name=f"Bad_Name-{self.run_id}")
        err = await self.assert_fails(self.store.create(obj), errors.Invalid)
        self.assertIn("metadata.name", err.message)

    # -- update ---------------------------------------------------------------------------

    async def test_stale_update_conflicts(self) -> None:
        """An update carrying an old resourceVersion fails with Conflict, worded as Kubernetes."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        first = dict(created, spec={"accepted": False, "hostname": "one"})
        await self.store.update(first)
        stale = dict(created, spec={"accepted": False, "hostname": "two"})
        err = await self.assert_fails(self.store.update(stale), errors.Conflict)
        self.assertEqual(
            err.message,
            f'Operation cannot be fulfilled on servers.metal.sidero.dev "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again")
        fetched = await self.store.get(registry.SERVER, name)
        self.assertEqual(fetched["spec"]["hostname"], "one")

    async def test_update_of_missing_is_not_found(self) -> None:
        """update of an object that does not exist fails with NotFound."""
        obj = self.server()
        obj["metadata"]["resourceVersion"] = "1"
        await self.assert_fails(self.store.update(obj), errors.NotFound)

    async def test_update_keeps_stored_status(self) -> None:
        """update replaces spec and metadata but keeps the stored status."""
        created = await self.create(self.server())
        with_status = await self.store.update_status(dict(created, status={"power": "on"}))
        changed = dict(with_status, status={"power": "off"}, spec={"accepted": True})
        changed["metadata"] = dict(with_status["metadata"], labels={"contract-run": self.run_id, "x": "y"})
        updated = await self.store.update(changed)
        self.assertEqual(updated["status"], {"power": "on"})
        self.assertEqual(updated["spec"]["accepted"], True)
        self.assertEqual(updated["metadata"]["labels"]["x"], "y")

    async def test_update_status_keeps_spec_and_metadata(self) -> None:
        """update_status replaces only status; metadata and spec stay as stored."""
        created = await self.create(self.server(hostname="kept"))
        sent = dict(created, spec={"accepted": True, "hostname": "ignored"}, status={"ready": True})
        sent["metadata"] = dict(created["metadata"], labels={"ignored": "yes"})
        updated = await self.store.update_status(sent)
        self.assertEqual(updated["status"], {"ready": True})
        self.assertEqual(updated["spec"], created["spec"])
        self.assertEqual(updated["metadata"].get("labels"), created["metadata"]["labels"])
        self.assertEqual(updated["metadata"]["generation"], created["metadata"]["generation"])
        self.assertGreater(int(updated["metadata"]["resourceVersion"]),
                           int(created["metadata"]["resourceVersion"]))

    async def test_stale_status_update_conflicts(self) -> None:
        """update_status follows the same resourceVersion rule as update."""
        created = await self.create(self.server())
        await self.store.update_status(dict(created, status={"power": "on"}))
        await self.assert_fails(self.store.update_status(dict(created, status={"power": "off"})),
                                errors.Conflict)

    async def test_generation_follows_spec(self) -> None:
        """generation goes up on a spec change only, not on metadata or status changes."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        relabelled = await self.store.patch(registry.SERVER, name, {"metadata": {"labels": {"a": "b"}}})
        self.assertEqual(relabelled["metadata"]["generation"], 1)
        status = await self.store.patch(registry.SERVER, name, {"status": {"power": "on"}}, subresource="status")
        self.assertEqual(status["metadata"]["generation"], 1)
        spec = await self.store.patch(registry.SERVER, name, {"spec": {"cordoned": True}})
        self.assertEqual(spec["metadata"]["generation"], 2)

    async def test_noop_update_writes_nothing(self) -> None:
        """An update that changes nothing keeps the resourceVersion and sends no watch event."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        recorder, _ = await self.watch(registry.SERVER, resource_version=created["metadata"]["resourceVersion"])
        same = await self.store.update(created)
        self.assertEqual(same["metadata"]["resourceVersion"], created["metadata"]["resourceVersion"])
        changed = await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "after"}})

        def seen() -> None:
            self.assertEqual(recorder.types(name), [MODIFIED])
        await self.eventually(seen, "the MODIFIED event")
        self.assertEqual(recorder.of(name)[0][1]["metadata"]["resourceVersion"],
                         changed["metadata"]["resourceVersion"])

    # -- patch ----------------------------------------------------------------------------

    async def test_merge_patch_with_nested_nulls(self) -> None:
        """A merge patch merges objects, replaces lists and removes members set to null."""
        obj = self.server(hostname="h", bmc={"endpoint": "10.0.0.1", "user": "admin", "port": 623},
                          configPatches=[{"op": "add", "path": "/a", "value": 1}])
        created = await self.create(obj)
        patched = await self.store.patch(registry.SERVER, created["metadata"]["name"], {
            "spec": {"hostname": None, "bmc": {"port": None, "user": "root"},
                     "configPatches": [{"op": "remove", "path": "/b"}]},
        })
        self.assertNotIn("hostname", patched["spec"])
        self.assertEqual(patched["spec"]["bmc"], {"endpoint": "10.0.0.1", "user": "root"})
        self.assertEqual(patched["spec"]["configPatches"], [{"op": "remove", "path": "/b"}])
        self.assertEqual(patched["metadata"]["generation"], 2)

    async def test_patch_resource_version_is_precondition(self) -> None:
        """A resourceVersion inside a patch must match, else Conflict and nothing changes."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        rv = created["metadata"]["resourceVersion"]
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "first"}})
        await self.assert_fails(
            self.store.patch(registry.SERVER, name, {"metadata": {"resourceVersion": rv},
                                                      "spec": {"hostname": "second"}}),
            errors.Conflict)
        current = await self.store.get(registry.SERVER, name)
        self.assertEqual(current["spec"]["hostname"], "first")
        ok = await self.store.patch(registry.SERVER, name, {
            "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
            "spec": {"hostname": "third"}})
        self.assertEqual(ok["spec"]["hostname"], "third")

    async def test_status_patch_touches_only_status(self) -> None:
        """A status-subresource patch changes status and ignores spec; a main patch ignores status."""
        created = await self.create(self.server(hostname="h"))
        name = created["metadata"]["name"]
        patched = await self.store.patch(registry.SERVER, name,
                                         {"status": {"isClean": True}, "spec": {"hostname": "no"}},
                                         subresource="status")
        self.assertEqual(patched["status"], {"isClean": True})
        self.assertEqual(patched["spec"]["hostname"], "h")
        main = await self.store.patch(registry.SERVER, name, {"status": {"isClean": False},
                                                              "spec": {"hostname": "yes"}})
        self.assertEqual(main["status"], {"isClean": True})
        self.assertEqual(main["spec"]["hostname"], "yes")
        nested = await self.store.patch(registry.SERVER, name, {"status": {"isClean": None, "power": "on"}},
                                        subresource="status")
        self.assertEqual(nested["status"], {"power": "on"})

    async def test_patch_of_missing_is_not_found(self) -> None:
        """patch of a missing object fails with NotFound."""
        await self.assert_fails(self.store.patch(registry.SERVER, self.unique("none"), {"spec": {}}),
                                errors.NotFound)

    # -- delete and finalizers ------------------------------------------------------------

    async def test_delete_without_finalizers_removes(self) -> None:
        """delete removes an object without finalizers and returns None."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        result = await self.store.delete(registry.SERVER, name)
        self.assertIsNone(result)
        await self.assert_fails(self.store.get(registry.SERVER, name), errors.NotFound)
        await self.assert_fails(self.store.delete(registry.SERVER, name), errors.NotFound)

    async def test_delete_precondition(self) -> None:
        """delete with a stale resourceVersion fails with Conflict and keeps the object."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "x"}})
        await self.assert_fails(
            self.store.delete(registry.SERVER, name, resource_version=created["metadata"]["resourceVersion"]),
            errors.Conflict)
        await self.store.get(registry.SERVER, name)

    async def test_finalizers_hold_deletion(self) -> None:
        """delete of an object with finalizers sets deletionTimestamp once and keeps it."""
        obj = self.server()
        obj["metadata"]["finalizers"] = [FINALIZER]
        created = await self.create(obj)
        name = created["metadata"]["name"]
        first = await self.store.delete(registry.SERVER, name)
        assert first is not None
        self.assertRegex(first["metadata"]["deletionTimestamp"], RFC3339)
        self.assertEqual(first["metadata"]["deletionGracePeriodSeconds"], 0)
        second = await self.store.delete(registry.SERVER, name)
        assert second is not None
        self.assertEqual(second["metadata"]["deletionTimestamp"], first["metadata"]["deletionTimestamp"])
        self.assertEqual(second["metadata"]["resourceVersion"], first["metadata"]["resourceVersion"])
        stored = await self.store.get(registry.SERVER, name)
        self.assertEqual(stored["metadata"]["finalizers"], [FINALIZER])

    async def test_removing_last_finalizer_deletes(self) -> None:
        """An update removing the last finalizer of an object being deleted removes it (DELETED event)."""
        obj = self.server()
        obj["metadata"]["finalizers"] = [FINALIZER, FINALIZER + "-2"]
        created = await self.create(obj)
        name = created["metadata"]["name"]
        recorder, _ = await self.watch(registry.SERVER, resource_version=created["metadata"]["resourceVersion"])
        deleting = await self.store.delete(registry.SERVER, name)
        assert deleting is not None
        one = await self.store.update(dict(deleting, metadata=dict(deleting["metadata"], finalizers=[FINALIZER])))
        await self.store.get(registry.SERVER, name)
        await self.store.update(dict(one, metadata=dict(one["metadata"], finalizers=[])))
        await self.assert_fails(self.store.get(registry.SERVER, name), errors.NotFound)

        def seen() -> None:
            self.assertEqual(recorder.types(name), [MODIFIED, MODIFIED, DELETED])
        await self.eventually(seen, "the deletion events")

    async def test_no_new_finalizers_while_deleting(self) -> None:
        """No finalizer may be added to an object being deleted (422 Invalid, as Kubernetes)."""
        obj = self.server()
        obj["metadata"]["finalizers"] = [FINALIZER]
        created = await self.create(obj)
        deleting = await self.store.delete(registry.SERVER, created["metadata"]["name"])
        assert deleting is not None
        more = dict(deleting, metadata=dict(deleting["metadata"], finalizers=[FINALIZER, "another.io/f"]))
        err = await self.assert_fails(self.store.update(more), errors.Invalid)
        self.assertIn("no new finalizers can be added if the object is being deleted", err.message)

    # -- list and selectors ---------------------------------------------------------------

    async def test_label_selectors(self) -> None:
        """list applies equality, set and existence label selectors."""
        db = await self.create(self.server(labels={"tier": "db"}))
        web = await self.create(self.server(labels={"tier": "web", "gpu": "yes"}))
        bare = await self.create(self.server())
        run = f"contract-run={self.run_id}"

        async def names(selector: str) -> set[str]:
            result = await self.store.list(registry.SERVER, label_selector=f"{run},{selector}")
            return {o["metadata"]["name"] for o in result.items}

        n = {o["metadata"]["name"] for o in (db, web, bare)}
        dbn, webn, baren = (o["metadata"]["name"] for o in (db, web, bare))
        self.assertEqual(await names("tier=db"), {dbn})
        self.assertEqual(await names("tier in (db,web)"), {dbn, webn})
        self.assertEqual(await names("!gpu"), {dbn, baren})
        self.assertEqual(await names("tier!=db"), {webn, baren})
        self.assertEqual(await names("tier"), {dbn, webn})
        everything = await self.store.list(registry.SERVER, label_selector=run)
        self.assertEqual({o["metadata"]["name"] for o in everything.items}, n)

    async def test_field_selector(self) -> None:
        """list applies a metadata.name field selector."""
        a = await self.create(self.server())
        await self.create(self.server())
        name = a["metadata"]["name"]
        result = await self.store.list(registry.SERVER, field_selector=f"metadata.name={name}")
        self.assertEqual([o["metadata"]["name"] for o in result.items], [name])
        others = await self.store.list(registry.SERVER, label_selector=f"contract-run={self.run_id}",
                                       field_selector=f"metadata.name!={name}")
        self.assertEqual(len(others.items), 1)

    async def test_invalid_selector_is_bad_request(self) -> None:
        """An unparsable label selector fails with BadRequest."""
        await self.assert_fails(self.store.list(registry.SERVER, label_selector="a in (b"), errors.BadRequest)

    async def test_list_namespaces_and_order(self) -> None:
        """list of a namespaced kind filters by namespace, or spans all ordered by namespace then name."""
        label = {"contract-run": self.run_id}
        made = []
        for ns, name in (("kube-public", "b"), ("default", "c"), ("default", "a")):
            made.append(await self.create({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": f"{name}-{self.run_id}", "namespace": ns, "labels": label}}))
        selector = f"contract-run={self.run_id}"
        everywhere = await self.store.list(registry.SECRET, label_selector=selector)
        self.assertEqual([(o["metadata"]["namespace"], o["metadata"]["name"][0]) for o in everywhere.items],
                         [("default", "a"), ("default", "c"), ("kube-public", "b")])
        public = await self.store.list(registry.SECRET, namespace="kube-public", label_selector=selector)
        self.assertEqual([o["metadata"]["name"][0] for o in public.items], ["b"])
        self.assertTrue(everywhere.resource_version.isdigit())

    # -- watch ----------------------------------------------------------------------------

    async def test_watch_from_list_sees_changes_in_order(self) -> None:
        """A watch from a list's resourceVersion sees ADDED, MODIFIED, DELETED in increasing order."""
        listed = await self.store.list(registry.SERVER, label_selector=f"contract-run={self.run_id}")
        recorder, _ = await self.watch(registry.SERVER, resource_version=listed.resource_version,
                                       label_selector=f"contract-run={self.run_id}")
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "h"}})
        await self.store.patch(registry.SERVER, name, {"status": {"power": "on"}}, subresource="status")
        await self.store.delete(registry.SERVER, name)

        def seen() -> None:
            self.assertEqual(recorder.types(name), [ADDED, MODIFIED, MODIFIED, DELETED])
        await self.eventually(seen, "four events")
        rvs = [int(o["metadata"]["resourceVersion"]) for _, o in recorder.of(name)]
        self.assertEqual(rvs, sorted(set(rvs)))
        self.assertEqual(recorder.of(name)[2][1]["status"], {"power": "on"})
        self.assertEqual(recorder.of(name)[3][1]["metadata"]["uid"], created["metadata"]["uid"])

    async def test_watch_from_empty_starts_with_current_objects(self) -> None:
        """A watch without resourceVersion first gets ADDED for each current object, then changes."""
        a = await self.create(self.server())
        b = await self.create(self.server())
        recorder, _ = await self.watch(registry.SERVER, resource_version="",
                                       label_selector=f"contract-run={self.run_id}")

        def initial() -> None:
            self.assertEqual({o["metadata"]["name"] for _, o in
                              [(e.type, e.object) for e in recorder.events if e.type == ADDED]},
                             {a["metadata"]["name"], b["metadata"]["name"]})
        await self.eventually(initial, "the initial ADDED events")
        await self.store.patch(registry.SERVER, a["metadata"]["name"], {"spec": {"hostname": "later"}})

        def change() -> None:
            self.assertEqual(recorder.types(a["metadata"]["name"]), [ADDED, MODIFIED])
        await self.eventually(change, "the MODIFIED event")

    async def test_watch_replays_from_old_resource_version(self) -> None:
        """A watch from an earlier resourceVersion replays the changes made since, then goes live."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "one"}})
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "two"}})
        recorder, _ = await self.watch(registry.SERVER, resource_version=created["metadata"]["resourceVersion"],
                                       field_selector=f"metadata.name={name}")
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "three"}})

        def seen() -> None:
            self.assertEqual([o["spec"]["hostname"] for _, o in recorder.of(name)], ["one", "two", "three"])
        await self.eventually(seen, "replayed and live events")

    async def test_watch_stop(self) -> None:
        """After stop() a watch delivers nothing and its done Deferred fires with None."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        recorder, w = await self.watch(registry.SERVER, resource_version=created["metadata"]["resourceVersion"])
        ended: list[Any] = []
        w.done.addBoth(ended.append)
        w.stop()
        await self.eventually(lambda: self.assertEqual(ended, [None]), "done")
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "unseen"}})
        # A second watch proves the change was published; the stopped one must not have it.
        control, _ = await self.watch(registry.SERVER, resource_version=created["metadata"]["resourceVersion"])
        await self.eventually(lambda: self.assertEqual(control.types(name), [MODIFIED]), "control event")
        self.assertEqual(recorder.of(name), [])

    async def test_watch_selector_transitions(self) -> None:
        """An object entering a watch's label selection is ADDED; leaving it is DELETED."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        recorder, _ = await self.watch(registry.SERVER, resource_version=created["metadata"]["resourceVersion"],
                                       label_selector=f"contract-run={self.run_id},phase=on")
        await self.store.patch(registry.SERVER, name, {"metadata": {"labels": {"phase": "on"}}})
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "x"}})
        await self.store.patch(registry.SERVER, name, {"metadata": {"labels": {"phase": "off"}}})

        def seen() -> None:
            self.assertEqual(recorder.types(name), [ADDED, MODIFIED, DELETED])
        await self.eventually(seen, "selection transitions")

    async def test_raising_callback_does_not_disturb_others(self) -> None:
        """A watch callback that raises neither stops its own watch nor others, nor the store."""
        created = await self.create(self.server())
        name = created["metadata"]["name"]
        rv = created["metadata"]["resourceVersion"]
        calls: list[WatchEvent] = []

        def bad(event: WatchEvent) -> None:
            calls.append(event)
            raise RuntimeError("callback bug")

        w = await self.store.watch(registry.SERVER, bad, resource_version=rv)
        self.addCleanup(w.stop)
        good, _ = await self.watch(registry.SERVER, resource_version=rv)
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "a"}})
        await self.store.patch(registry.SERVER, name, {"spec": {"hostname": "b"}})
        await self.eventually(lambda: self.assertEqual(good.types(name), [MODIFIED, MODIFIED]), "good events")
        await self.eventually(
            lambda: self.assertEqual(len([e for e in calls if e.object["metadata"]["name"] == name]), 2),
            "bad callback still called")
        self.flushLoggedErrors(RuntimeError)

    # -- garbage collection ---------------------------------------------------------------

    async def test_gc_deletes_dependents(self) -> None:
        """Removing an owner removes, in the background, the objects whose ownerReferences name it."""
        owner = await self.create(self.server())
        binding = await self.create({
            "apiVersion": registry.SERVER_BINDING.api_version, "kind": "ServerBinding",
            "metadata": {"name": self.unique("sb"), "ownerReferences": [self.owner_ref(owner)]},
            "spec": self.binding_spec()})
        secret = await self.create({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": self.unique("sec"), "namespace": "default",
                         "ownerReferences": [self.owner_ref(binding)]}})
        await self.store.delete(registry.SERVER, owner["metadata"]["name"])
        await self.eventually(lambda: self._assert_gone(registry.SERVER_BINDING, binding), "binding collected",
                              self.gc_wait_limit)
        await self.eventually(lambda: self._assert_gone(registry.SECRET, secret), "secret collected",
                              self.gc_wait_limit)

    async def _assert_gone(self, rt: ResourceType, obj: Object) -> None:
        meta = obj["metadata"]
        try:
            await self.store.get(rt, meta["name"], meta.get("namespace"))
        except errors.NotFound:
            return
        raise AssertionError(f"{meta['name']} still exists")

    async def test_gc_waits_for_every_owner(self) -> None:
        """An object with two owners stays while one is left (losing the dangling reference)."""
        one = await self.create(self.server())
        two = await self.create(self.server())
        dep = await self.create({
            "apiVersion": registry.SERVER_BINDING.api_version, "kind": "ServerBinding",
            "metadata": {"name": self.unique("sb"),
                         "ownerReferences": [self.owner_ref(one), self.owner_ref(two)]},
            "spec": self.binding_spec()})
        name = dep["metadata"]["name"]
        await self.store.delete(registry.SERVER, one["metadata"]["name"])

        async def dangling_dropped() -> None:
            current = await self.store.get(registry.SERVER_BINDING, name)
            self.assertEqual([r["uid"] for r in current["metadata"]["ownerReferences"]],
                             [two["metadata"]["uid"]])
        await self.eventually(dangling_dropped, "the dangling owner reference to be dropped",
                              self.gc_wait_limit)
        await self.store.delete(registry.SERVER, two["metadata"]["name"])
        await self.eventually(lambda: self._assert_gone(registry.SERVER_BINDING, dep), "dependent collected",
                              self.gc_wait_limit)

    async def test_gc_honours_dependent_finalizers(self) -> None:
        """A collected dependent with a finalizer is only marked for deletion until it is released."""
        owner = await self.create(self.server())
        dep = await self.create({
            "apiVersion": registry.SERVER_BINDING.api_version, "kind": "ServerBinding",
            "metadata": {"name": self.unique("sb"), "finalizers": [FINALIZER],
                         "ownerReferences": [self.owner_ref(owner)]},
            "spec": self.binding_spec()})
        name = dep["metadata"]["name"]
        await self.store.delete(registry.SERVER, owner["metadata"]["name"])

        async def marked() -> Object:
            current = await self.store.get(registry.SERVER_BINDING, name)
            self.assertIn("deletionTimestamp", current["metadata"])
            return current
        current = await self.eventually(marked, "the dependent to be marked for deletion", self.gc_wait_limit)
        await self.store.patch(registry.SERVER_BINDING, name, {"metadata": {"finalizers": None}})
        await self.eventually(lambda: self._assert_gone(registry.SERVER_BINDING, current), "dependent removed",
                              self.gc_wait_limit)
