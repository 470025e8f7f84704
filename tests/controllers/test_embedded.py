"""Informer, controllers and start-up runnables against the real EmbeddedStore (real reactor, a thread)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from sidero.api.registry import ENVIRONMENT, SERVER, SERVER_BINDING, SERVER_CLASS
from sidero.controllers.informer import Informer
from sidero.controllers.runtime import Controller, ControllerManager, Result
from sidero.controllers.startup import install_startup_runnables
from sidero.store.embedded import EmbeddedStore
from sidero.store.interfaces import Object


def server(name: str, **spec: Any) -> Object:
    return {
        "apiVersion": SERVER.api_version, "kind": "Server",
        "metadata": {"name": name}, "spec": dict(spec),
    }


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll C{predicate} on the real reactor until it holds (events arrive from the store's thread)."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


class EmbeddedInformerTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.store = EmbeddedStore(reactor, ":memory:")

        async def open_() -> None:
            await self.store.open()
            self.addCleanup(lambda: ensureDeferred(self.store.close()))

        return ensureDeferred(open_())

    async def test_sync_and_watch(self) -> None:
        """The informer lists existing Servers, then follows create/update/delete from the store."""
        await self.store.create(server("a", accepted=False))
        await self.store.create(server("b"))
        informer = Informer(self.store, SERVER, clock=reactor)
        events: list[tuple[str, str]] = []
        informer.add_handler(
            on_add=lambda o: events.append(("add", o["metadata"]["name"])),
            on_update=lambda old, new: events.append(("update", new["metadata"]["name"])),
            on_delete=lambda o: events.append(("delete", o["metadata"]["name"])),
        )
        informer.startService()
        self.addCleanup(informer.stopService)
        await informer.synced
        self.assertEqual(informer.keys(), ["a", "b"])

        await self.store.create(server("c"))
        a = informer.get_copy("a")
        assert a is not None
        a["spec"]["accepted"] = True
        await self.store.update(a)
        await self.store.delete(SERVER, "b")
        await wait_for(lambda: informer.keys() == ["a", "c"]
                       and (informer.get("a") or {}).get("spec", {}).get("accepted") is True)
        self.assertEqual(events, [("add", "a"), ("add", "b"), ("add", "c"), ("update", "a"),
                                  ("delete", "b")])
        stored = await self.store.get(SERVER, "a")
        self.assertEqual(informer.get("a"), stored)

    async def test_index_on_bindings(self) -> None:
        """A ServerBinding index by spec.metalMachineRef.name follows the store."""
        informer = Informer(self.store, SERVER_BINDING, clock=reactor)
        informer.add_index("machine", lambda o: [o["spec"]["metalMachineRef"]["name"]])
        informer.startService()
        self.addCleanup(informer.stopService)
        await informer.synced
        await self.store.create({
            "apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
            "metadata": {"name": "s1"},
            "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": "default", "name": "mm"}},
        })
        await wait_for(lambda: len(informer.by_index("machine", "mm")) == 1)

    async def test_manager_startup_and_fan_out(self) -> None:
        """Start-up runnables create "any"/"default"; a Server change reconciles every ServerClass."""
        manager = ControllerManager(self.store, reactor)
        install_startup_runnables(manager, self.store)
        calls: list[str] = []

        async def reconcile(key: str) -> Result | None:
            calls.append(key)
            return None

        controller = Controller("serverclass", SERVER_CLASS, reconcile, clock=reactor)
        controller.watches(SERVER, lambda o: controller.primary.keys())
        manager.add_controller(controller)
        manager.startService()
        self.addCleanup(manager.stopService)
        env_informer = manager.informer(ENVIRONMENT)
        await wait_for(lambda: "any" in calls and env_informer.get("default") is not None)
        default = env_informer.get("default")
        assert default is not None
        self.assertIn("talos.platform=metal", default["spec"]["kernel"]["args"])

        calls.clear()
        await self.store.create(copy.deepcopy(server("s1")))
        await wait_for(lambda: calls == ["any"])
