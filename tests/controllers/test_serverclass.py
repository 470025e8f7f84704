"""ServerClass controller (§2.3) on the real embedded store (SQLite inline, fake clock)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from sidero.api.registry import SERVER, SERVER_CLASS
from sidero.controllers.runtime import ControllerManager
from sidero.controllers.serverclass import ServerClassReconciler, make_serverclass_controller
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
