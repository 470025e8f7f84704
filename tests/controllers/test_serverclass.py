"""ServerClass controller (§2.3) on the real embedded store (SQLite inline, fake clock)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from sidero.api.registry import SERVER, SERVER_CLASS
from sidero.api.selectors import SelectorError
from sidero.controllers.runtime import ControllerManager
from sidero.controllers.serverclass import (
    ClassMembership,
    ServerClassReconciler,
    make_serverclass_controller,
)
from sidero.store import errors
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import Object
from tests.store.inline import FakeReactor, open_inline_store


def server(name: str, accepted: bool = True, labels: dict[str, str] | None = None, **spec: Any) -> Object:
    return {"apiVersion": SERVER.api_version, "kind": "Server",
            "metadata": {"name": name, "labels": labels or {}}, "spec": {"accepted": accepted, **spec}}


def server_class(name: str, **spec: Any) -> Object:
    return {"apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass",
            "metadata": {"name": name}, "spec": spec}


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.store: EmbeddedStore
        self.clock: FakeReactor
        self.store, self.clock = open_inline_store(self)

    def ok(self, d: Any) -> Any:
        if isinstance(d, Coroutine):
            d = Deferred.fromCoroutine(d)
        return self.successResultOf(d)

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.ok(self.store.get(SERVER_CLASS, name)).get("status") or {})


class ReconcileTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.reconciler = ServerClassReconciler(self.store)
        self.ok(self.store.create(server("a", labels={"zone": "east"})))
        self.ok(self.store.create(server("b", labels={"zone": "west"})))
        self.ok(self.store.create(server("c", labels={"zone": "east"}, cordoned=True)))
        self.ok(self.store.create(server("d", accepted=False, labels={"zone": "east"})))
        self.ok(self.store.create(server("e", labels={"zone": "east"})))
        self.ok(self.store.patch(SERVER, "e", {"status": {"inUse": True}}, subresource="status"))

    def test_partition_by_in_use(self) -> None:
        """Accepted, uncordoned, matching servers are split into available and in use, sorted."""
        self.ok(self.store.create(server_class("east", selector={"matchLabels": {"zone": "east"}})))
        self.ok(self.reconciler.reconcile("east"))
        self.assertEqual(self.status("east"), {"serversAvailable": ["a"], "serversInUse": ["e"]})

    def test_empty_lists_not_null(self) -> None:
        """A class matching nothing gets two empty lists."""
        self.ok(self.store.create(server_class("none", qualifiers={"labelSelectors": [{"zone": "north"}]})))
        self.ok(self.reconciler.reconcile("none"))
        self.assertEqual(self.status("none"), {"serversAvailable": [], "serversInUse": []})

    def test_any_is_created_and_holds_everyone(self) -> None:
        """Reconciling "any" creates it when missing; it holds every accepted, uncordoned server."""
        self.ok(self.reconciler.reconcile("any"))
        self.assertEqual(self.status("any"), {"serversAvailable": ["a", "b"], "serversInUse": ["e"]})

    def test_any_qualifiers_reset(self) -> None:
        """Qualifiers put on "any" are removed on its next reconcile."""
        self.ok(self.store.create(server_class("any", qualifiers={"labelSelectors": [{"zone": "west"}]})))
        self.ok(self.reconciler.reconcile("any"))
        stored = self.ok(self.store.get(SERVER_CLASS, "any"))
        self.assertEqual(stored["spec"]["qualifiers"], {})
        self.assertEqual(stored["status"]["serversAvailable"], ["a", "b"])

    def test_missing_class_is_done(self) -> None:
        """A class that does not exist is not created (only "any" is)."""
        self.assertIsNone(self.ok(self.reconciler.reconcile("gone")))
        self.failureResultOf(self.store.get(SERVER_CLASS, "gone"), errors.NotFound)

    def test_no_write_when_unchanged(self) -> None:
        """A second reconcile with nothing changed does not write."""
        self.ok(self.store.create(server_class("east", selector={"matchLabels": {"zone": "east"}})))
        self.ok(self.reconciler.reconcile("east"))
        rv = self.store.resource_version
        self.ok(self.reconciler.reconcile("east"))
        self.assertEqual(self.store.resource_version, rv)

    def test_invalid_selector_is_an_error(self) -> None:
        """An invalid selector fails the reconcile (retried with backoff), status untouched."""
        self.ok(self.store.create(server_class(
            "bad", selector={"matchExpressions": [{"key": "zone", "operator": "Bogus", "values": ["x"]}]})))
        self.failureResultOf(Deferred.fromCoroutine(self.reconciler.reconcile("bad")))
        self.assertEqual(self.status("bad"), {})


class ControllerTests(Base):
    def test_server_events_update_every_class(self) -> None:
        """Creating, cordoning and allocating Servers updates every ServerClass through the controller."""
        self.ok(self.store.create(server_class("any")))
        self.ok(self.store.create(server_class("east", selector={"matchLabels": {"zone": "east"}})))
        manager = ControllerManager(self.store, self.clock)
        make_serverclass_controller(manager, self.store)
        manager.startService()
        self.addCleanup(lambda: self.ok(manager.stopService()))
        self.clock.advance(1)
        self.assertEqual(self.status("east"), {"serversAvailable": [], "serversInUse": []})

        self.ok(self.store.create(server("x", labels={"zone": "east"})))
        self.ok(self.store.create(server("y", labels={"zone": "west"})))
        self.clock.advance(1)
        self.assertEqual(self.status("east")["serversAvailable"], ["x"])
        self.assertEqual(self.status("any")["serversAvailable"], ["x", "y"])

        self.ok(self.store.patch(SERVER, "x", {"status": {"inUse": True}}, subresource="status"))
        self.ok(self.store.patch(SERVER, "y", {"spec": {"cordoned": True}}))
        self.clock.advance(1)
        self.assertEqual(self.status("east"), {"serversAvailable": [], "serversInUse": ["x"]})
        self.assertEqual(self.status("any"), {"serversAvailable": [], "serversInUse": ["x"]})

        self.ok(self.store.delete(SERVER_CLASS, "any"))
        self.clock.advance(1)
        self.assertEqual(self.status("any"), {"serversAvailable": [], "serversInUse": ["x"]})


class MembershipTests(Base):
    """L{ClassMembership}: members kept from informer events, only changed classes enqueued."""

    def setUp(self) -> None:
        super().setUp()
        self.manager = ControllerManager(self.store, self.clock)
        self.changed: list[str] = []
        self.membership = ClassMembership(self.manager.informer(SERVER),
                                          self.manager.informer(SERVER_CLASS), self.changed.append)
        self.ok(self.store.create(server_class("east", selector={"matchLabels": {"zone": "east"}})))
        self.ok(self.store.create(server_class("west", selector={"matchLabels": {"zone": "west"}})))
        self.ok(self.store.create(server("a", labels={"zone": "east"})))
        self.ok(self.store.create(server("b", labels={"zone": "west"})))
        self.manager.startService()
        self.addCleanup(lambda: self.ok(self.manager.stopService()))
        self.clock.advance(1)
        self.changed.clear()

    def status(self, name: str) -> dict[str, Any]:  # type: ignore[override]
        cls = self.manager.informer(SERVER_CLASS).get(name)
        assert cls is not None
        status = self.membership.status_for(cls)
        assert status is not None
        return status

    def test_initial_members(self) -> None:
        self.assertEqual(self.status("east"), {"serversAvailable": ["a"], "serversInUse": []})
        self.assertEqual(self.status("west"), {"serversAvailable": ["b"], "serversInUse": []})

    def test_relabel_changes_only_the_two_classes(self) -> None:
        self.ok(self.store.patch(SERVER, "a", {"metadata": {"labels": {"zone": "west"}}}))
        self.clock.advance(1)
        self.assertEqual(sorted(self.changed), ["east", "west"])
        self.assertEqual(self.status("east")["serversAvailable"], [])
        self.assertEqual(self.status("west")["serversAvailable"], ["a", "b"])

    def test_irrelevant_change_enqueues_nothing(self) -> None:
        self.ok(self.store.patch(SERVER, "a", {"status": {"power": "on"}}, subresource="status"))
        self.clock.advance(1)
        self.assertEqual(self.changed, [])

    def test_in_use_moves_between_lists(self) -> None:
        self.ok(self.store.patch(SERVER, "b", {"status": {"inUse": True}}, subresource="status"))
        self.clock.advance(1)
        self.assertEqual(self.changed, ["west"])
        self.assertEqual(self.status("west"), {"serversAvailable": [], "serversInUse": ["b"]})

    def test_cordon_and_delete_leave(self) -> None:
        self.ok(self.store.patch(SERVER, "a", {"spec": {"cordoned": True}}))
        self.clock.advance(1)
        self.assertEqual(self.status("east")["serversAvailable"], [])
        self.ok(self.store.delete(SERVER, "b"))
        self.clock.advance(1)
        self.assertEqual(self.changed, ["east", "west"])
        self.assertEqual(self.status("west")["serversAvailable"], [])

    def test_class_spec_change_rematches(self) -> None:
        self.ok(self.store.patch(SERVER_CLASS, "east", {"spec": {"selector": None}}))
        self.clock.advance(1)
        self.assertEqual(self.changed, ["east"])
        self.assertEqual(self.status("east")["serversAvailable"], ["a", "b"])

    def test_other_spec_is_not_answered(self) -> None:
        """A class read from the store with a spec the cache does not hold yet gets None (the
        reconciler then matches the cached Servers itself)."""
        cls = self.manager.informer(SERVER_CLASS).get_copy("east")
        assert cls is not None
        cls["spec"] = {"selector": {"matchLabels": {"zone": "north"}}}
        self.assertIsNone(self.membership.status_for(cls))

    def test_invalid_selector_raises(self) -> None:
        self.ok(self.store.create(server_class(
            "bad", selector={"matchExpressions": [{"key": "zone", "operator": "Bogus", "values": ["x"]}]})))
        self.clock.advance(1)
        cls = self.manager.informer(SERVER_CLASS).get("bad")
        assert cls is not None
        self.assertRaises(SelectorError, self.membership.status_for, cls)


class CoalescingTests(Base):
    def test_status_writes_of_one_class_are_coalesced(self) -> None:
        """Changes within MIN_WRITE_INTERVAL of a status write go into one later write."""
        self.ok(self.store.create(server_class("east", selector={"matchLabels": {"zone": "east"}})))
        manager = ControllerManager(self.store, self.clock)
        make_serverclass_controller(manager, self.store, min_write_interval=0.5)
        manager.startService()
        self.addCleanup(lambda: self.ok(manager.stopService()))
        self.clock.advance(0.01)
        self.assertEqual(self.status("east")["serversAvailable"], [])
        writes: list[str] = []
        watch = self.ok(self.store.watch(SERVER_CLASS, lambda ev: writes.append(ev.type),
                                         resource_version=self.store.resource_version))
        self.addCleanup(watch.stop)
        for name in ("p", "q", "r"):
            self.ok(self.store.create(server(name, labels={"zone": "east"})))
            self.clock.advance(0.05)
        self.assertEqual(self.status("east")["serversAvailable"], [])  # not yet: just written
        self.clock.advance(0.5)
        self.assertEqual(self.status("east")["serversAvailable"], ["p", "q", "r"])
        self.assertEqual(writes, ["MODIFIED"])


class MembershipAgreesWithMatchingTests(Base):
    """Whatever happens to Servers and classes, the index says what matching every Server says."""

    def test_random_changes(self) -> None:
        import random

        from sidero.controllers.serverclass import class_status

        rng = random.Random(1234)
        manager = ControllerManager(self.store, self.clock)
        membership = ClassMembership(manager.informer(SERVER), manager.informer(SERVER_CLASS))
        manager.startService()
        self.addCleanup(lambda: self.ok(manager.stopService()))
        zones, racks = ["a", "b", "c"], ["1", "2"]

        def random_spec() -> dict[str, Any]:
            choice = rng.randrange(5)
            if choice == 0:
                return {"selector": {"matchLabels": {"zone": rng.choice(zones)}}}
            if choice == 1:
                return {"qualifiers": {"labelSelectors": [{"zone": rng.choice(zones)}, {"rack": rng.choice(racks)}]}}
            if choice == 2:
                return {"selector": {"matchLabels": {"zone": rng.choice(zones), "rack": rng.choice(racks)}},
                        "qualifiers": {"hardware": [{"system": {"manufacturer": rng.choice(["x", "y"])}}]}}
            if choice == 3:
                return {"qualifiers": {"labelSelectors": [{}]}}
            return {"selector": {"matchExpressions": [{"key": "rack", "operator": "NotIn", "values": ["1"]}]}}

        def random_labels() -> dict[str, str]:
            labels = {}
            if rng.random() < 0.8:
                labels["zone"] = rng.choice(zones)
            if rng.random() < 0.6:
                labels["rack"] = rng.choice(racks)
            return labels

        for j in range(6):
            self.ok(self.store.create(server_class(f"c{j}", **random_spec())))
        for i in range(30):
            self.ok(self.store.create(server(f"s{i:02d}", accepted=rng.random() < 0.9, labels=random_labels(),
                                             hardware={"system": {"manufacturer": rng.choice(["x", "y"])}})))
        self.clock.advance(1)
        for step in range(150):
            what = rng.randrange(4)
            if what == 0:
                self.ok(self.store.patch(SERVER, f"s{rng.randrange(30):02d}",
                                         {"metadata": {"labels": random_labels() or None}}))
            elif what == 1:
                self.ok(self.store.patch(SERVER, f"s{rng.randrange(30):02d}",
                                         {"status": {"inUse": rng.random() < 0.5}}, subresource="status"))
            elif what == 2:
                self.ok(self.store.patch(SERVER_CLASS, f"c{rng.randrange(6)}", {"spec": None}))
                self.ok(self.store.patch(SERVER_CLASS, f"c{rng.randrange(6)}", {"spec": random_spec()}))
            else:
                self.ok(self.store.patch(SERVER, f"s{rng.randrange(30):02d}",
                                         {"spec": {"cordoned": rng.random() < 0.3}}))
            self.clock.advance(0.1)
            servers = manager.informer(SERVER).list()
            for cls in manager.informer(SERVER_CLASS).list():
                self.assertEqual(membership.status_for(cls), class_status(cls, servers),
                                 f"step {step}: class {cls['metadata']['name']} {cls.get('spec')}")
