"""Start-up runnables (§2.4): ServerClass "any" and Environment "default"."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero import TALOS_RELEASE
from sidero.api.environment import default_environment
from sidero.api.registry import ENVIRONMENT, SERVER_CLASS, ResourceType
from sidero.controllers.runtime import ControllerManager
from sidero.controllers.startup import (
    ensure_any_server_class,
    ensure_default_environment,
    install_startup_runnables,
)
from sidero.store import errors
from sidero.store.interfaces import Object
from tests.store.inline import open_inline_store


def run(coro: Coroutine[Any, Any, Object]) -> Deferred[Object]:
    return Deferred.fromCoroutine(coro)


class AnyServerClassTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = open_inline_store(self)[0]

    def test_created_when_missing(self) -> None:
        """A missing "any" ServerClass is created with an empty spec."""
        created = self.successResultOf(run(ensure_any_server_class(self.store)))
        self.assertEqual(created["metadata"]["name"], "any")
        stored = self.successResultOf(self.store.get(SERVER_CLASS, "any"))
        self.assertEqual(stored["spec"], {})

    def test_qualifiers_reset_selector_kept(self) -> None:
        """An existing "any" gets its qualifiers emptied; selector and other fields stay."""
        self.store.create({
            "apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass", "metadata": {"name": "any"},
            "spec": {"qualifiers": {"labelSelectors": [{"a": "b"}]}, "selector": {"matchLabels": {"x": "y"}},
                     "environmentRef": {"name": "e"}},
        })
        self.successResultOf(run(ensure_any_server_class(self.store)))
        stored = self.successResultOf(self.store.get(SERVER_CLASS, "any"))
        self.assertEqual(stored["spec"], {"qualifiers": {}, "selector": {"matchLabels": {"x": "y"}},
                                          "environmentRef": {"name": "e"}})

    def test_no_write_when_already_empty(self) -> None:
        """An "any" class with empty qualifiers is left untouched (no new resourceVersion)."""
        self.successResultOf(run(ensure_any_server_class(self.store)))
        rv = self.store.resource_version
        self.successResultOf(run(ensure_any_server_class(self.store)))
        self.assertEqual(self.store.resource_version, rv)

    def test_conflict_is_retried(self) -> None:
        """A Conflict on the reset re-reads the object and tries again."""
        self.store.create({
            "apiVersion": SERVER_CLASS.api_version, "kind": "ServerClass", "metadata": {"name": "any"},
            "spec": {"qualifiers": {"hardware": [{"system": {"manufacturer": "QEMU"}}]}},
        })
        real_update = self.store.update
        conflicts = [errors.conflict("serverclasses.metal.sidero.dev", "any")]

        def update(obj: Object) -> Deferred[Object]:
            if conflicts:
                return fail(conflicts.pop())
            return real_update(obj)

        self.store.update = update  # type: ignore[method-assign]
        self.successResultOf(run(ensure_any_server_class(self.store)))
        self.assertEqual(self.successResultOf(self.store.get(SERVER_CLASS, "any"))["spec"]["qualifiers"], {})

    def test_create_race(self) -> None:
        """Losing a creation race (AlreadyExists) is not an error."""
        real_create = self.store.create

        def create(obj: Object) -> Deferred[Object]:
            real_create(obj)
            return fail(errors.already_exists("serverclasses.metal.sidero.dev", "any"))

        self.store.create = create  # type: ignore[method-assign]
        got = self.successResultOf(run(ensure_any_server_class(self.store)))
        self.assertEqual(got["metadata"]["name"], "any")


class DefaultEnvironmentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = open_inline_store(self)[0]

    def test_created_when_missing(self) -> None:
        """A missing "default" Environment is created from default_environment(TALOS_RELEASE)."""
        self.successResultOf(run(ensure_default_environment(self.store)))
        stored = self.successResultOf(self.store.get(ENVIRONMENT, "default"))
        self.assertEqual(stored["spec"], default_environment(TALOS_RELEASE)["spec"])
        self.assertIn("/v1.13.0/vmlinuz-amd64", stored["spec"]["kernel"]["url"])

    def test_never_updated(self) -> None:
        """An existing "default" Environment is left as the operator edited it."""
        env = default_environment(TALOS_RELEASE)
        env["spec"]["kernel"]["url"] = "http://mirror/vmlinuz"
        self.store.create(env)
        rv = self.store.resource_version
        self.successResultOf(run(ensure_default_environment(self.store)))
        self.assertEqual(self.store.resource_version, rv)
        self.assertEqual(self.successResultOf(self.store.get(ENVIRONMENT, "default"))
                         ["spec"]["kernel"]["url"], "http://mirror/vmlinuz")

    def test_release_required(self) -> None:
        """An empty Talos release is refused."""
        self.failureResultOf(run(ensure_default_environment(self.store, "")), ValueError)
        manager = ControllerManager(self.store, Clock())
        self.assertRaises(ValueError, install_startup_runnables, manager, self.store, "")


class InstallTests(SynchronousTestCase):
    def test_runnables_run_on_leadership(self) -> None:
        """The manager runs both runnables on start, retrying a failed one with backoff."""
        store = open_inline_store(self)[0]
        clock = Clock()
        real_get = store.get
        failures = [errors.Unavailable("store starting")]

        def get(kind: ResourceType, name: str, namespace: str | None = None) -> Deferred[Object]:
            if kind == ENVIRONMENT and failures:
                return fail(failures.pop())
            return real_get(kind, name, namespace)

        store.get = get  # type: ignore[method-assign]
        manager = ControllerManager(store, clock)
        install_startup_runnables(manager, store)
        manager.startService()
        self.addCleanup(manager.stopService)
        self.successResultOf(store.get(SERVER_CLASS, "any"))
        self.failureResultOf(store.get(ENVIRONMENT, "default"), errors.NotFound)
        clock.advance(1)
        self.successResultOf(store.get(ENVIRONMENT, "default"))
        self.assertEqual(len(self.flushLoggedErrors(errors.Unavailable)), 1)
