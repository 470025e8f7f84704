# -*- test-case-name: tests.controllers.test_runtime -*-
"""Leader election seam: controllers and start-up runnables run only on the leader.

Informers (and the protocols reading them) run on every replica; only writers are gated.
The embedded single-host mode has exactly one replica, so L{AlwaysLeader} is the leader from
the start.  A Lease-based elector (Kubernetes mode) implements the same interface elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

from zope.interface import Interface, implementer

Callback = Callable[[], object]


class ILeaderElector(Interface):
    """Who leads, and notifications when that changes."""

    def is_leader() -> bool:
        """True while this process holds leadership."""

    def subscribe(on_gain: Callback, on_loss: Callback) -> Callable[[], None]:
        """Call C{on_gain} when leadership is acquired and C{on_loss} when it is lost
        (on the reactor thread).  Returns a function that unsubscribes.  A subscriber that
        arrives while already leader is not called back: it checks L{is_leader} itself."""


@implementer(ILeaderElector)
class AlwaysLeader:
    """The single-host elector: always the leader, never changes."""

    def is_leader(self) -> bool:
        return True

    def subscribe(self, on_gain: Callback, on_loss: Callback) -> Callable[[], None]:
        return lambda: None


@implementer(ILeaderElector)
class ManualLeader:
    """An elector driven by hand: for tests, and a base for real electors (call L{gain} /
    L{lose} when the lease is acquired or lost)."""

    def __init__(self, leader: bool = False) -> None:
        self._leader = leader
        self._subscribers: list[tuple[Callback, Callback]] = []

    def is_leader(self) -> bool:
        return self._leader

    def subscribe(self, on_gain: Callback, on_loss: Callback) -> Callable[[], None]:
        entry = (on_gain, on_loss)
        self._subscribers.append(entry)

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

        return unsubscribe

    def gain(self) -> None:
        if not self._leader:
            self._leader = True
            for on_gain, _ in list(self._subscribers):
                on_gain()

    def lose(self) -> None:
        if self._leader:
            self._leader = False
            for _, on_loss in list(self._subscribers):
                on_loss()
