# -*- test-case-name: tests.management.test_cli_ops -*-
"""Recent kernel and agent log lines per server, for C{sidero logs SERVER -f} and the dashboard.

Whatever receives a machine's logs (the SideroLink log receiver for Talos's kernel logs, the
agent's console) calls L{IServerLogs.append}; readers take the lines kept so far and follow
new ones. Bounded per server and in servers, in memory, on the reactor thread.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from zope.interface import Interface, implementer

DEFAULT_PER_SERVER = 2000
DEFAULT_SERVERS = 4096
MAX_LINE = 8192


@dataclass(frozen=True)
class LogLine:
    time: float
    text: str


class IServerLogs(Interface):
    """Per-server log lines: appended by receivers, read and followed by operators."""

    def append(server: str, text: str) -> None:
        """Add one line (a trailing newline is dropped; very long lines are cut)."""

    def lines(server: str, tail: int | None = None) -> list[LogLine]:
        """The lines kept for C{server}, oldest first (the last C{tail} of them)."""

    def follow(server: str, callback: Callable[[LogLine], object]) -> Callable[[], None]:
        """Call C{callback} with each new line of C{server}; returns an unsubscribe."""


@implementer(IServerLogs)
class ServerLogs:
    def __init__(self, clock: Callable[[], float], per_server: int = DEFAULT_PER_SERVER,
                 servers: int = DEFAULT_SERVERS) -> None:
        self.clock = clock
        self.per_server = per_server
        self.servers = servers
        self._lines: OrderedDict[str, deque[LogLine]] = OrderedDict()
        self._followers: dict[str, list[Callable[[LogLine], object]]] = {}

    def append(self, server: str, text: str) -> None:
        line = LogLine(self.clock(), text.rstrip("\r\n")[:MAX_LINE])
        kept = self._lines.get(server)
        if kept is None:
            kept = self._lines[server] = deque(maxlen=self.per_server)
            while len(self._lines) > self.servers:
                self._lines.popitem(last=False)
        self._lines.move_to_end(server)
        kept.append(line)
        for callback in list(self._followers.get(server, ())):
            try:
                callback(line)
            except Exception:
                pass

    def lines(self, server: str, tail: int | None = None) -> list[LogLine]:
        kept = list(self._lines.get(server, ()))
        return kept[-tail:] if tail is not None and tail >= 0 else kept

    def follow(self, server: str, callback: Callable[[LogLine], object]) -> Callable[[], None]:
        self._followers.setdefault(server, []).append(callback)

        def unsubscribe() -> None:
            followers = self._followers.get(server, [])
            if callback in followers:
                followers.remove(callback)
            if not followers:
                self._followers.pop(server, None)

        return unsubscribe
