# -*- test-case-name: tests.management.test_cli_ops -*-
"""Recent kernel and agent log lines per server, for C{sidero logs SERVER -f} and the dashboard.

Whatever receives a machine's logs calls L{IServerLogs.append}: the SideroLink log receiver
for Talos' kernel logs and the syslog receiver for agents, iPXE and BMCs, each for the server
its annotator found (an unknown source is written to C{--server-log} only). Readers take the
lines kept so far and follow new ones. Bounded per server and in servers, in memory, on the
reactor thread.  L{kmsg_text} and L{syslog_text} turn the receivers' records into the one
readable line kept here (the full JSON record goes to C{--server-log}); control characters
are escaped on the way in.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zope.interface import Interface, implementer

DEFAULT_PER_SERVER = 2000
DEFAULT_SERVERS = 4096
MAX_LINE = 8192


def _text(value: Any) -> str:
    return "" if value is None else str(value)


#: Control characters (C0 but tab, DEL, C1) shown escaped: a line comes from a machine nobody
#: vouches for and ends up on an operator's terminal (C{sidero logs}), where an escape
#: sequence could rewrite the screen; a newline would split one record into two lines.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _clean(line: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


def kmsg_text(record: dict[str, Any]) -> str:
    """A Talos kmsg record as one line: C{<talos-time> <facility>.<priority>: <msg>}."""
    when = _text(record.get("talos-time"))
    level = ".".join(p for p in (_text(record.get("facility")), _text(record.get("priority"))) if p)
    head = " ".join(p for p in (when, level) if p)
    msg = _text(record.get("msg"))
    return f"{head}: {msg}" if head else msg


def syslog_text(record: dict[str, Any]) -> str:
    """A syslog record as one line: C{<timestamp> <facility>.<priority> <host> <app>[<pid>]: <msg>}."""
    level = ".".join(p for p in (_text(record.get("facility")), _text(record.get("priority"))) if p)
    app = _text(record.get("app_name"))
    if app and record.get("procid"):
        app += f"[{_text(record['procid'])}]"
    head = " ".join(p for p in (_text(record.get("timestamp")), level,
                                _text(record.get("hostname")), app) if p)
    msg = _text(record.get("msg"))
    return f"{head}: {msg}" if head else msg


@dataclass(frozen=True)
class LogLine:
    time: float
    text: str


class IServerLogs(Interface):
    """Per-server log lines: appended by receivers, read and followed by operators."""

    def append(server: str, text: str) -> None:
        """Add one line (a trailing newline is dropped, control characters are escaped, very
        long lines are cut)."""

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
        line = LogLine(self.clock(), _clean(text.rstrip("\r\n"))[:MAX_LINE])
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
