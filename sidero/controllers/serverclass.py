# -*- test-case-name: tests.controllers.test_serverclass -*-
"""ServerClass controller (spec §2.3): keeps C{status.serversAvailable} / C{serversInUse}.

Membership depends on every Server (labels, hardware, accepted, cordoned, inUse).  Rather than
re-matching every Server against every class on every Server event (10 000 Servers and 100
classes make that a million matches per change), L{ClassMembership} keeps, from the informer
events, which cached Servers each cached class holds: a Server event matches that one Server
against each class, a class whose spec changed is matched against every Server once, and only
the classes whose status would change are enqueued.  The reconcile reads the class from the
cache (as Sidero's cached client does; the store when no cache is given) and, if the index
holds another spec for it, matches it against the cached Servers itself.
The C{any} class is re-ensured on each of its reconciles, so deleting it brings it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sidero.api.matching import (
    ANY_SERVER_CLASS,
    ServerFilter,
    qualifiers_filter,
    selector_filter,
    servers_for_class,
)
from sidero.api.registry import SERVER, SERVER_CLASS
from sidero.api.selectors import SelectorError
from sidero.controllers.informer import Informer
from sidero.controllers.runtime import Controller, ControllerManager, Result, split_key
from sidero.controllers.startup import ensure_any_server_class, qualifiers_empty
from sidero.store.errors import NotFound
from sidero.store.interfaces import IResourceStore, Object

#: Seconds between two status writes of one class: while Servers register or change by the
#: thousand, the big classes (C{any} lists every server) would otherwise be rewritten, whole,
#: once per Server event, which is quadratic in the fleet.  Changes in between are coalesced.
MIN_WRITE_INTERVAL = 0.5


def _name(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def class_status(server_class: Object, servers: Iterable[Object]) -> dict[str, list[str]]:
    """The status a ServerClass should have given all Servers (names sorted ascending)."""
    members = servers_for_class(server_class, servers)
    in_use = sorted(_name(s) for s in members if (s.get("status") or {}).get("inUse"))
    available = sorted(_name(s) for s in members if not (s.get("status") or {}).get("inUse"))
    return {"serversAvailable": available, "serversInUse": in_use}


def _in_use(server: Object) -> bool:
    return bool((server.get("status") or {}).get("inUse"))


def _eligible(server: Object) -> bool:
    """Accepted and not cordoned: what every class asks first (checked once per Server)."""
    spec = server.get("spec") or {}
    return bool(spec.get("accepted")) and not spec.get("cordoned")


Pair = tuple[str, Any]


def _label_pairs(server: Object) -> frozenset[Pair]:
    labels = (server.get("metadata") or {}).get("labels") or {}
    try:
        return frozenset(labels.items()) if isinstance(labels, dict) else frozenset()
    except TypeError:  # a value that is not a string cannot equal a selector's anyway
        return frozenset((k, v) for k, v in labels.items() if isinstance(v, str))


def _required_pairs(server_class: Object) -> tuple[Pair, ...] | None:
    """Label pairs of which every member has at least one, or None when the class does not
    say: one pair of C{selector.matchLabels} (members have all of them), else every pair of
    C{qualifiers.labelSelectors} (members have one of them; an empty map among them matches
    nothing, so no pair is no member).  Used to match a class against the servers carrying a
    pair rather than against all of them; the full match still decides."""
    spec = server_class.get("spec") or {}
    try:
        match_labels = (spec.get("selector") or {}).get("matchLabels") or {}
        if match_labels:
            first = min(match_labels.items())
            hash(first)
            return (first,)
        label_selectors = (spec.get("qualifiers") or {}).get("labelSelectors") or []
        if label_selectors:
            pairs = tuple(pair for selector in label_selectors for pair in (selector or {}).items())
            hash(pairs)
            return pairs
    except (AttributeError, TypeError, ValueError):  # not maps of strings: match everything
        return None
    return None


class _Compiled:
    """A class's selector and qualifiers as one filter, or the error its selector has."""

    def __init__(self, server_class: Object) -> None:
        self.spec = server_class.get("spec")
        self.error: SelectorError | None = None
        self._filters: tuple[ServerFilter, ...] = ()
        self.pairs = _required_pairs(server_class)
        try:
            self._filters = (selector_filter(server_class), qualifiers_filter(server_class))
        except SelectorError as e:
            self.error = e

    def matches(self, server: Object) -> bool:
        return self.error is None and all(f(server) for f in self._filters)


class ClassMembership:
    """Which cached Servers each cached ServerClass holds, kept from informer events.

    C{on_change(class_name)} is called when a class's status would change (a Server joined or
    left it, a member's C{inUse} flipped, its spec changed).  Reads are synchronous and cost
    nothing but the sort of the answer.
    """

    log = Logger()

    def __init__(self, servers: Informer, classes: Informer,
                 on_change: Callable[[str], object] = lambda _name: None) -> None:
        self.servers = servers
        self.classes = classes
        self.on_change = on_change
        self._compiled: dict[str, _Compiled] = {}
        self._members: dict[str, set[str]] = {}
        self._classes_of: dict[str, set[str]] = {}
        self._in_use: set[str] = set()
        # Label pair -> classes requiring it (see _required_pairs); classes that do not.
        self._classes_by_pair: dict[Pair, set[str]] = {}
        self._unindexed: set[str] = set()
        # Label pair -> servers carrying it, and each server's pairs.
        self._servers_by_pair: dict[Pair, set[str]] = {}
        self._pairs_of: dict[str, frozenset[Pair]] = {}
        classes.add_handler(on_add=self._class_changed,
                            on_update=lambda old, new: self._class_changed(new, old),
                            on_delete=self._class_deleted)
        servers.add_handler(on_add=self._server_changed, on_update=self._server_updated,
                            on_delete=self._server_deleted)

    # -- reads ---------------------------------------------------------------------------

    def status_for(self, server_class: Object) -> dict[str, list[str]] | None:
        """The status of C{server_class} from the index, or None when the index holds another
        spec for it (or none): the caller then matches the cached Servers itself.

        @raise SelectorError: the class's selector is invalid.
        """
        compiled = self._compiled.get(_name(server_class))
        if compiled is None or compiled.spec != server_class.get("spec"):
            return None
        if compiled.error is not None:
            raise compiled.error
        members = sorted(self._members.get(_name(server_class), ()))
        in_use = self._in_use
        return {"serversAvailable": [m for m in members if m not in in_use],
                "serversInUse": [m for m in members if m in in_use]}

    # -- maintenance (informer handlers, reactor thread) ------------------------------------

    def _class_changed(self, server_class: Object, old: Object | None = None) -> None:
        name = _name(server_class)
        if (old is not None and name in self._compiled
                and self._compiled[name].spec == server_class.get("spec")):
            return  # a status write: membership is the same
        self._unregister_class(name)
        compiled = self._compiled[name] = _Compiled(server_class)
        if compiled.pairs is None:
            self._unindexed.add(name)
        else:
            for pair in compiled.pairs:
                self._classes_by_pair.setdefault(pair, set()).add(name)
        previous = self._members.get(name, set())
        members = set()
        if compiled.error is None:
            if compiled.pairs is None:
                candidates: Iterable[Object] = self.servers.list()
            else:
                names = set().union(*(self._servers_by_pair.get(p, ()) for p in compiled.pairs))
                found = (self.servers.get(n) for n in sorted(names))
                candidates = [c for c in found if c is not None]
            for server in candidates:
                if _eligible(server) and compiled.matches(server):
                    members.add(_name(server))
        for gone in previous - members:
            self._classes_of.get(gone, set()).discard(name)
        for joined in members - previous:
            self._classes_of.setdefault(joined, set()).add(name)
        self._members[name] = members
        self.on_change(name)

    def _unregister_class(self, name: str) -> None:
        old = self._compiled.pop(name, None)
        self._unindexed.discard(name)
        for pair in (old.pairs or ()) if old is not None else ():
            classes = self._classes_by_pair.get(pair)
            if classes is not None:
                classes.discard(name)
                if not classes:
                    del self._classes_by_pair[pair]

    def _class_deleted(self, server_class: Object) -> None:
        name = _name(server_class)
        self._unregister_class(name)
        for member in self._members.pop(name, set()):
            self._classes_of.get(member, set()).discard(name)

    def _server_updated(self, old: Object, new: Object) -> None:
        """Most Server updates are status writes: labels and spec (all that matching reads)
        unchanged means the same classes, and only C{inUse} can matter."""
        if ((old.get("metadata") or {}).get("labels") == (new.get("metadata") or {}).get("labels")
                and old.get("spec") == new.get("spec")):
            self._server_changed(new, rematch=False)
        else:
            self._server_changed(new)

    def _server_changed(self, server: Object, rematch: bool = True) -> None:
        name = _name(server)
        before = self._classes_of.get(name, set())
        after: set[str] = set()
        pairs = self._index_server(name, server) if rematch else frozenset()
        if not rematch:
            after = set(before)
        elif _eligible(server):
            candidates = set(self._unindexed)
            for pair in pairs:
                candidates |= self._classes_by_pair.get(pair, set())
            for class_name in candidates:
                compiled = self._compiled[class_name]
                try:
                    if compiled.matches(server):
                        after.add(class_name)
                except Exception:  # a matching bug must not stop the informer's handlers
                    self.log.failure("matching server {server} against {cls} failed",
                                     server=name, cls=class_name)
        was_in_use = name in self._in_use
        now_in_use = _in_use(server)
        if now_in_use:
            self._in_use.add(name)
        else:
            self._in_use.discard(name)
        changed = before ^ after
        if was_in_use != now_in_use:
            changed |= after
        for class_name in before - after:
            self._members.get(class_name, set()).discard(name)
        for class_name in after - before:
            self._members.setdefault(class_name, set()).add(name)
        if after:
            self._classes_of[name] = after
        else:
            self._classes_of.pop(name, None)
        for class_name in sorted(changed):
            self.on_change(class_name)

    def _index_server(self, name: str, server: Object) -> frozenset[Pair]:
        """Keep the label index of C{server}; its label pairs."""
        pairs = _label_pairs(server)
        old = self._pairs_of.get(name, frozenset())
        if pairs != old:
            self._unindex_server(name, old - pairs)
            for pair in pairs - old:
                self._servers_by_pair.setdefault(pair, set()).add(name)
            self._pairs_of[name] = pairs
        return pairs

    def _unindex_server(self, name: str, pairs: Iterable[Pair]) -> None:
        for pair in pairs:
            servers = self._servers_by_pair.get(pair)
            if servers is not None:
                servers.discard(name)
                if not servers:
                    del self._servers_by_pair[pair]

    def _server_deleted(self, server: Object) -> None:
        name = _name(server)
        self._unindex_server(name, self._pairs_of.pop(name, frozenset()))
        self._in_use.discard(name)
        for class_name in sorted(self._classes_of.pop(name, set())):
            self._members.get(class_name, set()).discard(name)
            self.on_change(class_name)


class ServerClassReconciler:
    """Reconcile one ServerClass by name.

    @param servers: the Server informer to read from; None reads the store (tests, tools).
    @param membership: the index of class members (with C{servers}); None matches every
        Server on each reconcile.
    @param classes: the ServerClass informer to read classes from once synced; None reads the
        store.
    """

    log = Logger()

    def __init__(self, store: IResourceStore, servers: Informer | None = None,
                 membership: ClassMembership | None = None, clock: IReactorTime | None = None,
                 min_write_interval: float = 0.0, classes: Informer | None = None) -> None:
        self.store = store
        self.servers = servers
        self.classes = classes
        self.membership = membership
        self.clock = clock
        self.min_write_interval = min_write_interval
        self._written: dict[str, float] = {}

    async def _all_servers(self) -> list[Object]:
        if self.servers is not None and self.servers.has_synced:
            return self.servers.list()
        return (await self.store.list(SERVER)).items

    async def reconcile(self, key: str) -> Result | None:
        _, name = split_key(key)
        if self.clock is not None and self.min_write_interval > 0:
            since = self.clock.seconds() - self._written.get(name, float("-inf"))
            if since < self.min_write_interval:
                # Coalesce: the changes of the meantime go into one write when it is due.
                return Result(requeue_after=self.min_write_interval - since)
        cached: Object | None = None
        if self.classes is not None and self.classes.has_synced:
            # As Sidero's cached client: the status is derived, a stale copy is corrected by the
            # event that follows it, and one request fewer per write counts under a QPS limit.
            cached = self.classes.get(name)
            if cached is None and name != ANY_SERVER_CLASS:
                return None
        if name == ANY_SERVER_CLASS and (cached is None or not qualifiers_empty(cached)):
            cached = await ensure_any_server_class(self.store)
        if cached is not None:
            server_class = cached
        else:
            try:
                server_class = await self.store.get(SERVER_CLASS, name)
            except NotFound:
                return None
        if (server_class.get("metadata") or {}).get("deletionTimestamp"):
            return None
        wanted: dict[str, list[str]] | None = None
        if self.membership is not None and self.servers is not None and self.servers.has_synced:
            wanted = self.membership.status_for(server_class)
        if wanted is None:
            wanted = class_status(server_class, await self._all_servers())
        current = server_class.get("status") or {}
        if all(current.get(k) == v for k, v in wanted.items()):
            return None
        await self.store.patch(SERVER_CLASS, name, {"status": wanted}, subresource="status")
        if self.clock is not None:
            self._written[name] = self.clock.seconds()
            if len(self._written) > 10_000:
                self._written.clear()  # a bound; forgetting only allows one early write
        self.log.info(
            "ServerClass {name}: {available} available, {in_use} in use",
            name=name, available=len(wanted["serversAvailable"]), in_use=len(wanted["serversInUse"]),
        )
        return None


def make_serverclass_controller(
    manager: ControllerManager, store: IResourceStore, clock: IReactorTime | None = None,
    min_write_interval: float = MIN_WRITE_INTERVAL,
) -> Controller:
    """Build the ServerClass controller, register it with C{manager} and return it.

    Server events reach it through L{ClassMembership} (only the classes they change); the
    controller still watches Servers so it starts once their cache has synced.
    """
    clock = clock if clock is not None else manager.clock
    servers = manager.informer(SERVER)
    controller = Controller("serverclass", SERVER_CLASS, lambda key: reconciler.reconcile(key),
                            clock=clock)
    classes = manager.informer(SERVER_CLASS)
    membership = ClassMembership(servers, classes, controller.enqueue)
    reconciler = ServerClassReconciler(store, servers, membership, clock, min_write_interval, classes)
    controller.watches(SERVER, _no_keys)
    manager.add_controller(controller)
    return controller


def _no_keys(_obj: Any) -> list[str]:
    return []
