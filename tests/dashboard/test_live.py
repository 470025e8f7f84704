"""The dashboard's pure views (escaping, state, readiness) and the live hub: coalescing,
snapshots, per-server logs and timeline steps, slow and excess streams."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sidero.dashboard import views
from sidero.dashboard.live import MAX_PENDING_LINES, LiveHub
from sidero.serverlogs import ServerLogs
from sidero.timeline import BootTimeline

UUID = "4c4c4544-0047-4a10-8048-b4c04f4d4a32"


def server(name: str = UUID, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"accepted": False, **spec}, "status": {}}


class FakeInformer:
    """What the hub uses of an informer: handlers, list, get (cluster-scoped names)."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.items = {views.name_of(o): o for o in objects}
        self.handlers: list[tuple[Any, Any, Any]] = []

    def add_handler(self, on_add: Any = None, on_update: Any = None, on_delete: Any = None) -> None:
        self.handlers.append((on_add, on_update, on_delete))
        for obj in list(self.items.values()):
            on_add(obj)

    def list(self) -> list[dict[str, Any]]:
        return [self.items[k] for k in sorted(self.items)]

    def get(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self.items.get(name)

    def put(self, obj: dict[str, Any]) -> None:
        old = self.items.get(views.name_of(obj))
        self.items[views.name_of(obj)] = obj
        for on_add, on_update, _ in self.handlers:
            on_add(obj) if old is None else on_update(old, obj)

    def remove(self, name: str) -> None:
        obj = self.items.pop(name)
        for _, _, on_delete in self.handlers:
            on_delete(obj)


class FakeRequest:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.finished = False
        self.producer: Any = None
        self._finish: Deferred[None] = Deferred()

    def write(self, data: bytes) -> None:
        assert not self.finished
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        return self._finish

    def finish(self) -> None:
        self.finished = True
        self._finish.callback(None)

    def events(self) -> list[tuple[str, Any]]:
        out = []
        for chunk in b"".join(self.written).split(b"\n\n"):
            lines = chunk.decode().splitlines()
            event = next((line[7:] for line in lines if line.startswith("event: ")), None)
            data = next((line[6:] for line in lines if line.startswith("data: ")), None)
            if event is not None:
                out.append((event, json.loads(data or "null")))
        return out


class ViewTests(SynchronousTestCase):
    def test_everything_escaped(self) -> None:
        """Names, hostnames and inventory from machines are escaped wherever they appear."""
        evil = '<script>alert("x")</script>'
        s = server(hostname=evil, hardware={"system": {"manufacturer": evil},
                                            "network": {"interfaces": [{"mac": evil}]}})
        s["status"] = {"addresses": [{"type": "InternalIP", "address": evil}]}
        for html in (views.server_row(s, None, [evil]), views.server_details(s, None, [evil])):
            self.assertNotIn("<script>", html)
            self.assertIn("&lt;script&gt;", html)

    def test_state(self) -> None:
        """A binding means allocated even before the controller set inUse; power defaults
        to unknown."""
        s = server(accepted=True, cordoned=True)
        self.assertEqual(views.server_state(s, None), {"accepted": True, "clean": False,
                                                      "allocated": False, "cordoned": True,
                                                      "power": "unknown"})
        self.assertTrue(views.server_state(s, {"metadata": {"name": UUID}})["allocated"])
        self.assertIn("cordoned", views.state_badges(views.server_state(s, None)))

    def test_asset_readiness(self) -> None:
        """Each asset's condition is found by its URL; a mismatch says why."""
        env = {"metadata": {"name": "default"},
               "spec": {"kernel": {"url": "http://x/k"}, "initrd": {"url": "http://x/i"}},
               "status": {"conditions": [
                   {"type": "Ready", "status": "True", "url": "http://x/k"},
                   {"type": "Ready", "status": "False", "url": "http://x/i",
                    "reason": "Sha512Mismatch", "message": "sha512 abc != def"}]}}
        self.assertEqual(views.asset_readiness(env), [("kernel", True, ""),
                                                      ("initrd", False, "sha512 abc != def")])
        self.assertIn("sha512 abc != def", views.environment_row(env))
        self.assertEqual(views.asset_readiness({"metadata": {"name": "e"}, "spec": {}})[0],
                         ("kernel", False, "no URL"))

    def test_classes_of_servers(self) -> None:
        classes = [{"metadata": {"name": "a"}, "status": {"serversAvailable": ["s1"], "serversInUse": ["s2"]}},
                   {"metadata": {"name": "b"}, "status": {"serversAvailable": ["s1"]}}]
        self.assertEqual(views.classes_of_servers(classes), {"s1": ["a", "b"], "s2": ["a"]})
        self.assertIn("<td class=num>2</td>", views.class_row(classes[0]))


class HubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.servers = FakeInformer(server("a"))
        self.bindings = FakeInformer()
        self.classes = FakeInformer({"metadata": {"name": "any"},
                                     "status": {"serversAvailable": ["a"], "serversInUse": []}})
        self.environments = FakeInformer()
        self.timeline = BootTimeline(self.clock.seconds)
        self.logs = ServerLogs(self.clock.seconds)
        self.hub = LiveHub(self.clock, self.servers, self.bindings, self.classes, self.environments,
                           timeline=self.timeline, server_logs=self.logs, max_streams=2)
        self.hub.start()
        self.addCleanup(self.hub.stop)

    def test_snapshot_then_coalesced_rows(self) -> None:
        """A stream starts whole; many changes to one server between flushes are one row."""
        request = FakeRequest()
        self.hub.open(request, None)  # type: ignore[arg-type]
        (event, data), = request.events()
        self.assertEqual(event, "snapshot")
        self.assertIn('id="server:a"', data["sections"]["servers"])
        self.assertIn("any", data["sections"]["servers"])  # its class
        for i in range(50):
            self.servers.put(server("a", hostname=f"h{i}"))
        self.servers.put(server("b"))
        self.assertEqual(len(request.events()), 1)  # nothing before the flush
        self.clock.advance(0.25)
        rows = [d for e, d in request.events() if e == "row"]
        self.assertEqual(sorted(d["id"] for d in rows), ["server:a", "server:b"])
        self.assertIn("h49", next(d["html"] for d in rows if d["id"] == "server:a"))
        self.servers.remove("b")
        self.clock.advance(0.25)
        self.assertEqual(request.events()[-1], ("row", {"section": "servers", "id": "server:b",
                                                        "key": "b", "html": None}))

    def test_rows_rendered_once_per_change(self) -> None:
        """Page loads reuse rendered rows until their object (or its class) changes."""
        self.assertIn("<td>any</td>", self.hub.overview_sections()["servers"])
        self.servers.items["a"] = server("a", hostname="changed behind the hub's back")
        self.assertNotIn("changed", self.hub.overview_sections()["servers"])
        self.servers.put(server("a", hostname="told"))
        self.assertIn("told", self.hub.overview_sections()["servers"])
        self.classes.put({"metadata": {"name": "any"}, "status": {"serversAvailable": [],
                                                                   "serversInUse": []}})
        self.assertNotIn("<td>any</td>", self.hub.overview_sections()["servers"])

    def test_server_page_logs_and_steps(self) -> None:
        """A server's page gets its kept lines, then new ones batched, and its boot steps;
        another server's are not sent; too many waiting lines are counted, not kept."""
        self.logs.append("a", "old line")
        request = FakeRequest()
        self.hub.open(request, "a")  # type: ignore[arg-type]
        self.assertEqual(request.events()[0][1]["lines"], ["old line"])
        self.logs.append("a", "new line")
        self.logs.append("b", "not mine")
        self.timeline.record("agent-register", source="grpc", uuid=UUID)
        self.servers.put(server("a", hostname="renamed"))
        self.clock.advance(0.25)
        kinds = {e: d for e, d in request.events()[1:]}
        self.assertEqual(kinds["log"], {"lines": ["new line"]})
        self.assertNotIn("step", kinds)  # that step is another machine's
        self.assertIn("renamed", kinds["html"]["html"])
        for i in range(MAX_PENDING_LINES + 10):
            self.logs.append("a", f"flood {i}")
        self.clock.advance(0.25)
        lines = request.events()[-1][1]["lines"]
        self.assertEqual(lines[0], "[dashboard: 10 lines skipped]")
        self.assertEqual(lines[-1], f"flood {MAX_PENDING_LINES + 9}")
        self.assertEqual(len(lines), MAX_PENDING_LINES + 1)

    def test_steps_to_overview(self) -> None:
        request = FakeRequest()
        self.hub.open(request, None)  # type: ignore[arg-type]
        self.timeline.record("dhcp-offer", source="dhcp", mac="52:54:00:12:34:56", arch="efi")
        self.clock.advance(0.25)
        event, data = request.events()[-1]
        self.assertEqual(event, "step")
        self.assertIn("dhcp-offer", data["html"])
        self.assertIn("arch=efi", data["html"])

    def test_slow_and_excess_streams(self) -> None:
        """A stream whose buffer is full is closed (it reconnects to a fresh snapshot); past
        the limit a stream is refused; a closed one stops following its server's logs."""
        slow, fine = FakeRequest(), FakeRequest()
        stream = self.hub.open(slow, "a")  # type: ignore[arg-type]
        self.hub.open(fine, None)  # type: ignore[arg-type]
        self.assertIsNone(self.hub.open(FakeRequest(), None))  # type: ignore[arg-type]
        self.assertEqual(self.hub.counters["rejected"], 1)
        assert stream is not None
        slow.producer.pauseProducing()
        self.logs.append("a", "line")
        self.servers.put(server("a", hostname="x"))
        self.clock.advance(0.25)
        self.assertTrue(slow.finished)
        self.assertEqual(self.hub.counters["slow_streams"], 1)
        self.assertEqual(len(self.hub.streams), 1)
        self.assertEqual(self.logs._followers, {})
        self.assertIn("row", [e for e, _ in fine.events()])
        self.clock.advance(15)
        self.assertTrue(fine.written[-1].startswith(b": keep-alive"))

    def test_browser_gone(self) -> None:
        """A browser that disconnects is forgotten at once."""
        request = FakeRequest()
        self.hub.open(request, "a")  # type: ignore[arg-type]
        request._finish.errback(Exception("connection lost"))
        self.assertEqual(self.hub.streams, [])
        self.assertEqual(self.logs._followers, {})
