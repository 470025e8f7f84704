# -*- test-case-name: tests.dashboard.test_live -*-
"""Live updates: informer, timeline and server-log events pushed to browsers as server-sent
events (SSE: one long GET, C{EventSource} in the page; no WebSocket, no new dependency).

Everything here runs on the reactor thread from in-memory sources: informer caches (their
handlers), the boot timeline's subscribers and the server log buffer's followers; nothing
waits on the store.  Work is bounded however busy the site is:

  - changes are coalesced: an informer event only marks its row dirty, and every
    C{flush_interval} each dirty row is rendered once and sent to every browser;
  - a stream starts with a C{snapshot} of its page's sections, so a browser that reconnects
    (C{EventSource} does by itself) is whole again;
  - a browser that does not read (its TCP buffer full: Twisted pauses us as its producer) is
    disconnected rather than buffered for; it reconnects and gets a fresh snapshot;
  - streams are limited in number, log lines waiting per stream too.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from sidero.dashboard import views

Object = dict[str, Any]

#: Seconds between flushes of coalesced changes.
FLUSH_INTERVAL = 0.25
#: Seconds between keep-alive comments (proxies and browsers drop silent streams).
HEARTBEAT = 15.0
#: Streams served at once; more are answered 503.
MAX_STREAMS = 64
#: Log lines queued per stream between flushes (older ones are dropped and counted).
MAX_PENDING_LINES = 1000
#: Log lines a server page starts with.
SNAPSHOT_LINES = 500
#: Recent boot steps the overview shows.
RECENT_STEPS = 50


def sse(event: str, data: Any) -> bytes:
    """One server-sent event; JSON data holds no raw newline, so one C{data:} line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@implementer(IPushProducer)
class Stream:
    """One browser's event stream (the request's producer, so we learn when it is full)."""

    def __init__(self, hub: LiveHub, request: server.Request, server_name: str | None) -> None:
        self.hub = hub
        self.request = request
        self.server = server_name
        self.closed = False
        self.paused = False
        self.pending_lines: deque[str] = deque(maxlen=MAX_PENDING_LINES)
        self.dropped_lines = 0
        self.unfollow: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.paused:
            self.hub.counters["slow_streams"] += 1
            self.close()
            return
        try:
            self.request.write(data)
        except Exception:  # finished or gone under us: never let one browser stop a flush
            self.gone()

    def line(self, line: Any) -> None:
        """A new line of this page's server (a L{sidero.serverlogs.LogLine})."""
        if len(self.pending_lines) == self.pending_lines.maxlen:
            self.dropped_lines += 1
        self.pending_lines.append(str(line.text))
        self.hub.schedule()

    def flush_lines(self) -> None:
        if not self.pending_lines:
            return
        lines = list(self.pending_lines)
        self.pending_lines.clear()
        if self.dropped_lines:
            lines.insert(0, f"[dashboard: {self.dropped_lines} lines skipped]")
            self.dropped_lines = 0
        self.write(sse("log", {"lines": lines}))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.hub.forget(self)
        try:
            self.request.unregisterProducer()
            self.request.finish()
        except Exception:  # the connection may already be gone
            pass

    def gone(self, _: object = None) -> None:
        """The browser went away (or we finished)."""
        self.closed = True
        self.hub.forget(self)

    # IPushProducer
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.gone()


class LiveHub:
    """Fans cache, timeline and log changes out to the open L{Stream}s (see the module)."""

    log = Logger()

    def __init__(self, clock: Any, servers: Any, bindings: Any, classes: Any, environments: Any,
                 timeline: Any = None, server_logs: Any = None, *,
                 flush_interval: float = FLUSH_INTERVAL, heartbeat: float = HEARTBEAT,
                 max_streams: int = MAX_STREAMS) -> None:
        self.clock = clock
        self.servers = servers
        self.bindings = bindings
        self.classes = classes
        self.environments = environments
        self.timeline = timeline
        self.server_logs = server_logs
        self.flush_interval = flush_interval
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self.streams: list[Stream] = []
        self.recent: deque[Any] = deque(maxlen=RECENT_STEPS)
        self._dirty: dict[tuple[str, str], None] = {}
        #: Rendered rows by (section, name), dropped when their object changes: a page load
        #: or snapshot joins strings instead of rendering every row again.
        self._rows: dict[tuple[str, str], str] = {}
        self._steps: list[Any] = []
        self._flush_call: IDelayedCall | None = None
        self._beat_call: IDelayedCall | None = None
        self._running = False
        self._unsubscribe: Callable[[], None] | None = None
        self.counters = {"streams": 0, "rejected": 0, "slow_streams": 0, "rows": 0}

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self.servers.add_handler(*self._handlers("server"))
        self.bindings.add_handler(*self._handlers("server"))
        self.classes.add_handler(*self._handlers("class"))
        self.environments.add_handler(*self._handlers("environment"))
        if self.timeline is not None:
            self._unsubscribe = self.timeline.subscribe(self._step)
        self._beat_call = self.clock.callLater(self.heartbeat, self._beat)

    def stop(self) -> None:
        self._running = False
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for call in (self._flush_call, self._beat_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._beat_call = None
        self._rows.clear()
        for stream in list(self.streams):
            stream.close()

    def _handlers(self, section: str) -> tuple[Callable[..., None], ...]:
        def added(obj: Object) -> None:
            self._changed(section, obj)

        def updated(old: Object, new: Object) -> None:
            self._changed(section, new, old)

        return added, updated, added

    def _changed(self, section: str, obj: Object, old: Object | None = None) -> None:
        if not self._running:
            return
        keys = [(section, views.name_of(obj))]
        if section == "class":
            # A class's members show it in their row.
            keys += [("server", member) for o in (obj, old or {})
                     for member in views.classes_of_servers([o])]
        for key in keys:
            self._rows.pop(key, None)
            if self.streams:
                self._dirty[key] = None
        if self.streams:
            self.schedule()

    def _step(self, entry: Any) -> None:
        self.recent.append(entry)
        if self._running and self.streams:
            self._steps.append(entry)
            del self._steps[:-RECENT_STEPS]
            self.schedule()

    # -- streams ----------------------------------------------------------------------

    def open(self, request: server.Request, server_name: str | None) -> Stream | None:
        """Start a stream on C{request} (None when too many are open: answer 503)."""
        if len(self.streams) >= self.max_streams:
            self.counters["rejected"] += 1
            return None
        stream = Stream(self, request, server_name)
        self.streams.append(stream)
        self.counters["streams"] += 1
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(stream.gone)
        request.write(b"retry: 2000\n\n")
        stream.write(sse("snapshot", self.snapshot(server_name)))
        if server_name is not None and self.server_logs is not None:
            stream.unfollow = self.server_logs.follow(server_name, stream.line)
        return stream

    def forget(self, stream: Stream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
        if stream.unfollow is not None:
            stream.unfollow()
            stream.unfollow = None

    # -- what the pages show ----------------------------------------------------------

    def membership(self) -> dict[str, list[str]]:
        return views.classes_of_servers(self.classes.list())

    def row(self, section: str, name: str, membership: dict[str, list[str]]) -> str | None:
        """The row of one object (cached until it changes), or None when it is gone."""
        key = (section, name)
        html = self._rows.get(key)
        if html is not None:
            return html
        if section == "server":
            obj = self.servers.get(name)
            html = (views.server_row(obj, self.bindings.get(name), membership.get(name, []))
                    if obj is not None else None)
        elif section == "class":
            obj = self.classes.get(name)
            html = views.class_row(obj) if obj is not None else None
        else:
            obj = self.environments.get(name)
            html = views.environment_row(obj) if obj is not None else None
        if html is not None and self._running:
            self._rows[key] = html
        return html

    def overview_sections(self) -> dict[str, str]:
        membership = self.membership()
        known = {views.name_of(s) for s in self.servers.list()}

        def rows(section: str, informer: Any) -> str:
            return "".join(self.row(section, views.name_of(o), membership) or ""
                           for o in informer.list())

        return {
            "servers": rows("server", self.servers),
            "serverclasses": rows("class", self.classes),
            "environments": rows("environment", self.environments),
            "timeline": "".join(views.timeline_row(e, known) for e in reversed(self.recent)),
        }

    def server_sections(self, name: str) -> dict[str, Any]:
        membership = views.classes_of_servers(self.classes.list())
        details = views.server_details(self.servers.get(name), self.bindings.get(name),
                                       membership.get(name, []))
        steps = self.timeline.for_machine(uuid=name) if self.timeline is not None else []
        lines = ([line.text for line in self.server_logs.lines(name, SNAPSHOT_LINES)]
                 if self.server_logs is not None else [])
        return {"details": details, "steps": steps, "lines": lines}

    def snapshot(self, server_name: str | None) -> dict[str, Any]:
        if server_name is None:
            return {"sections": self.overview_sections()}
        s = self.server_sections(server_name)
        return {"sections": {"details": s["details"],
                             "timeline": "".join(views.timeline_row(e) for e in reversed(s["steps"]))},
                "lines": s["lines"]}

    # -- flushing ---------------------------------------------------------------------

    def schedule(self) -> None:
        if self._flush_call is None and self._running:
            self._flush_call = self.clock.callLater(self.flush_interval, self.flush)

    def flush(self) -> None:
        self._flush_call = None
        dirty, self._dirty = list(self._dirty), {}
        steps, self._steps = self._steps, []
        if not self.streams:
            return
        overview = [s for s in self.streams if s.server is None]
        membership = self.membership() if dirty else {}
        for section, name in dirty:
            event = self._row(section, name, membership)
            for stream in overview:
                stream.write(event)
            if section == "server":
                pages = [s for s in self.streams if s.server == name]
                if pages:
                    details = views.server_details(self.servers.get(name), self.bindings.get(name),
                                                   membership.get(name, []))
                    data = sse("html", {"id": "details", "html": details})
                    for stream in pages:
                        stream.write(data)
            self.counters["rows"] += 1
        if steps:
            known = {views.name_of(s) for s in self.servers.list()} if overview else set()
            for entry in steps:
                if overview:
                    data = sse("step", {"html": views.timeline_row(entry, known)})
                    for stream in overview:
                        stream.write(data)
                pages = [s for s in self.streams if s.server is not None and s.server == entry.uuid]
                if pages:
                    data = sse("step", {"html": views.timeline_row(entry)})
                    for stream in pages:
                        stream.write(data)
        for stream in list(self.streams):
            stream.flush_lines()

    _SECTIONS = {"server": ("servers", "server:"), "class": ("serverclasses", "class:"),
                 "environment": ("environments", "environment:")}

    def _row(self, section: str, name: str, membership: dict[str, list[str]]) -> bytes:
        body, prefix = self._SECTIONS[section]
        return sse("row", {"section": body, "id": prefix + name, "key": name,
                           "html": self.row(section, name, membership)})

    def _beat(self) -> None:
        self._beat_call = self.clock.callLater(self.heartbeat, self._beat)
        for stream in list(self.streams):
            stream.write(b": keep-alive\n\n")


class StreamResource(Resource):
    """C{GET /events[?server=NAME]}: the page's event stream."""

    isLeaf = True

    def __init__(self, hub: LiveHub, server_name: str | None) -> None:
        super().__init__()
        self.hub = hub
        self.server_name = server_name

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        if self.hub.open(request, self.server_name) is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"too many dashboard streams\n"
        return server.NOT_DONE_YET
