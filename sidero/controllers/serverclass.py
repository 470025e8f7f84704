# -*- test-case-name: tests.controllers.test_serverclass -*-
"""ServerClass controller (spec §2.3): keeps C{status.serversAvailable} / C{serversInUse}.

Membership depends on every Server (labels, hardware, accepted, cordoned, inUse), so every
Server event enqueues every ServerClass; the reconcile is cheap because Servers are read from
the shared informer cache.  The C{any} class is re-ensured on each of its reconciles, so
deleting it brings it back.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sidero.api.matching import ANY_SERVER_CLASS, servers_for_class
from sidero.api.registry import SERVER, SERVER_CLASS
from sidero.controllers.informer import Informer
from sidero.controllers.runtime import Controller, ControllerManager, Result, split_key
from sidero.controllers.startup import ensure_any_server_class
from sidero.store.errors import NotFound
from sidero.store.interfaces import IResourceStore, Object


def _name(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def class_status(server_class: Object, servers: Iterable[Object]) -> dict[str, list[str]]:
    """The status a ServerClass should have given all Servers (names sorted ascending)."""
    members = servers_for_class(server_class, servers)
    in_use = sorted(_name(s) for s in members if (s.get("status") or {}).get("inUse"))
    available = sorted(_name(s) for s in members if not (s.get("status") or {}).get("inUse"))
    return {"serversAvailable": available, "serversInUse": in_use}


class ServerClassReconciler:
    """Reconcile one ServerClass by name.

    @param servers: the Server informer to read from; None reads the store (tests, tools).
    """

    log = Logger()

    def __init__(self, store: IResourceStore, servers: Informer | None = None) -> None:
        self.store = store
        self.servers = servers

    async def _all_servers(self) -> list[Object]:
        if self.servers is not None and self.servers.has_synced:
            return self.servers.list()
        return (await self.store.list(SERVER)).items

    async def reconcile(self, key: str) -> Result | None:
        _, name = split_key(key)
        if name == ANY_SERVER_CLASS:
            await ensure_any_server_class(self.store)
        try:
            server_class = await self.store.get(SERVER_CLASS, name)
        except NotFound:
            return None
        if (server_class.get("metadata") or {}).get("deletionTimestamp"):
            return None
        wanted = class_status(server_class, await self._all_servers())
        current = server_class.get("status") or {}
        if all(current.get(k) == v for k, v in wanted.items()):
            return None
        await self.store.patch(SERVER_CLASS, name, {"status": wanted}, subresource="status")
        self.log.info(
            "ServerClass {name}: {available} available, {in_use} in use",
            name=name, available=len(wanted["serversAvailable"]), in_use=len(wanted["serversInUse"]),
        )
        return None


def make_serverclass_controller(
    manager: ControllerManager, store: IResourceStore, clock: IReactorTime | None = None
) -> Controller:
    """Build the ServerClass controller, register it with C{manager} and return it."""
    reconciler = ServerClassReconciler(store, manager.informer(SERVER))
    controller = Controller("serverclass", SERVER_CLASS, reconciler.reconcile,
                            clock=clock if clock is not None else manager.clock)
    controller.watches(SERVER, lambda _server: controller.primary.keys())
    manager.add_controller(controller)
    return controller
