"""Twisted's legacy lines folded into structured events; urllib3's retries during an outage
folded into one warning and one recovery line; informers log an outage once."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from kubernetes import client as k8s_client
from twisted.internet import reactor as global_reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from sidero import logs
from sidero.api.registry import SERVER
from sidero.backoff import Backoff
from sidero.controllers.informer import Informer
from sidero.k8s import client as kc
from sidero.store.errors import Unavailable
from tests.ports import free_port
from tests.store.flaky import FlakyStore
from tests.store.inline import open_inline_store


def legacy(text: str) -> dict[str, Any]:
    return {"log_namespace": "log_legacy", "log_format": "{log_text}", "log_text": text,
            "message": (text,), "log_level": LogLevel.info, "isError": 0, "system": "-"}


class FoldEventTests(SynchronousTestCase):
    """fold_event on the shapes Twisted emits."""

    def test_listening_and_closed(self) -> None:
        """Port start and stop become events with factory/transport and port fields."""
        e = logs.fold_event(legacy("Site starting on 8081"))
        self.assertEqual((e["log_namespace"], e["factory"], e["port"], e["event"]),
                         ("twisted.internet", "Site", 8081, "listening"))
        self.assertTrue(logs.format_text(e).endswith(" [twisted.internet] Site listening on 8081\n"))
        e = logs.fold_event(legacy("(UDP Port 69 Closed)"))
        self.assertEqual((e["transport"], e["port"], e["log_level"]), ("UDP", 69, LogLevel.info))
        e = logs.fold_event(legacy("(UNIX Port /run/sidero/sidero.sock Closed)"))
        self.assertEqual(e["address"], "/run/sidero/sidero.sock")
        self.assertNotIn("log_text", e)

    def test_chatter_to_debug(self) -> None:
        """Factory and protocol start/stop and the access log drop to debug, with fields."""
        e = logs.fold_event({"log_namespace": "twisted.web.client._HTTP11ClientFactory",
                             "log_format": "Starting factory {factory!r}", "factory": object(),
                             "log_level": LogLevel.info})
        self.assertEqual(e["log_level"], LogLevel.debug)
        e = logs.fold_event(legacy("Stopping protocol <DatagramProtocol object at 0x1>"))
        self.assertEqual(e["log_level"], LogLevel.debug)
        e = logs.fold_event({
            "log_namespace": "twisted.python.log", "log_format": "{log_io}", "log_level": LogLevel.info,
            "log_io": '"10.0.0.9" - - [03/Dec/2026:09:22:27 +0000] "GET /boot.ipxe HTTP/1.1" 200 600 '
                      '"-" "iPXE/1.21.1"'})
        self.assertEqual(e["log_level"], LogLevel.debug)
        self.assertEqual((e["method"], e["uri"], e["status"], e["size"], e["remote"], e["user_agent"]),
                         ("GET", "/boot.ipxe", 200, 600, "10.0.0.9", "iPXE/1.21.1"))

    def test_other_events_unchanged(self) -> None:
        """Our own events pass through as they are; unknown legacy text keeps its words."""
        ours = {"log_namespace": "sidero.tap", "log_format": "hello {x}", "x": 1,
                "log_level": LogLevel.warn}
        self.assertIs(logs.fold_event(ours), ours)
        e = logs.fold_event(legacy("something else"))
        self.assertTrue(logs.format_text(e).endswith("INFO     [twisted] something else\n"))


class RealTwistedLinesTests(TestCase):
    """Real ports opened and closed on the reactor, through the sidero observer."""

    async def test_json_lines(self) -> None:
        """Listening/closed lines are JSON with port fields; no log_legacy namespace remains."""
        out = io.StringIO()
        observer = logs.make_observer("json", "info", out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        tcp = global_reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        udp = global_reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        ports = (tcp.getHost().port, udp.getHost().port)
        await tcp.stopListening()
        await udp.stopListening()
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertFalse([r for r in records if r["logger"] == "log_legacy"], records)
        mine = [r for r in records if r.get("port") in ports]
        self.assertEqual(sorted((r["event"], r["msg"]) for r in mine), sorted([
            ("listening", f"Site listening on {ports[0]}"),
            ("listening", f"DatagramProtocol listening on {ports[1]}"),
            ("closed", f"TCP port {ports[0]} closed"),
            ("closed", f"UDP port {ports[1]} closed"),
        ]))
        self.assertFalse([r for r in records if "Starting factory" in r["msg"]])


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"major": "1"}'


class TrackingSite(Site):
    """Remembers its connections so the test can close them (urllib3 keeps them alive)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.channels: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.append(channel)
        return channel


class OutageTests(TestCase):
    """The official client against a port that refuses, then answers."""

    timeout = 60

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.bridge = logs.StdlibBridge(publisher=self.events.append, min_level=logging.INFO)
        pool = logging.getLogger("urllib3.connectionpool")
        self.addCleanup(pool.setLevel, pool.level)
        self.addCleanup(setattr, pool, "propagate", pool.propagate)
        pool.setLevel(logging.DEBUG)
        pool.propagate = False
        pool.addHandler(self.bridge)
        self.addCleanup(pool.removeHandler, self.bridge)

    def lines(self) -> list[tuple[str, str]]:
        from twisted.logger import formatEvent

        return [(e["log_level"].name, formatEvent(e)) for e in self.events]

    async def test_one_warning_per_outage(self) -> None:
        """Six failing calls (18 urllib3 retries) log one warning; a success logs recovery."""
        port = free_port()
        configuration = k8s_client.Configuration()
        configuration.host = f"http://127.0.0.1:{port}"
        api = k8s_client.ApiClient(configuration)
        self.addCleanup(api.close)

        def call() -> str:
            try:
                kc.request(api, "GET", "/version", timeout=(2.0, 5.0))
                return "ok"
            except Unavailable:
                return "down"

        for _ in range(6):
            self.assertEqual(await deferToThread(call), "down")
        lines = self.lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(lines[0][0], "warn")
        self.assertIn(f"API server 127.0.0.1:{port} is not answering (Failed to establish a new"
                      " connection: [Errno 111] Connection refused)", lines[0][1])
        site = TrackingSite(Hello())
        listening = global_reactor.listenTCP(port, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.assertEqual(await deferToThread(call), "ok")
        self.assertEqual(await deferToThread(call), "ok")
        lines = self.lines()
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(lines[1][0], "info")
        self.assertIn(f"API server 127.0.0.1:{port} answers again after", lines[1][1])
        self.assertIn("(17 retries not logged)", lines[1][1])
        # A second outage is reported again (drop the kept-alive connection first).
        api.rest_client.pool_manager.clear()
        await listening.stopListening()
        for channel in site.channels:
            channel._channel.transport.abortConnection()  # the wrapped HTTPChannel
        await deferLater(global_reactor, 0.05, lambda: None)
        self.assertEqual(await deferToThread(call), "down")
        self.assertEqual(len(self.lines()), 3)


class InformerOutageTests(SynchronousTestCase):
    """An informer logs an error when its watch starts failing, not at every retry."""

    def test_once_per_outage(self) -> None:
        """Five failed retries: one error, debug lines after it, one info on reconnect."""
        clock = Clock()
        store = FlakyStore(open_inline_store(self)[0])
        informer = Informer(store, SERVER, clock=clock, backoff=Backoff(1, 2, 8, 0.5),
                            random=lambda: 0.0)
        with capturedLogs() as events:
            informer.startService()
            self.addCleanup(informer.stopService)
            store.fail_watches = [Unavailable("down")] * 4
            store.end_watches(Unavailable("down"))
            for _ in range(5):
                clock.advance(8)
        levels = [(e["log_level"], e.get("log_format", "")) for e in events
                  if e.get("informer") == informer.name]
        errors = [f for level, f in levels if level == LogLevel.error]
        self.assertEqual(len(errors), 1, levels)
        self.assertEqual(len([f for level, f in levels if level == LogLevel.debug and "still" in f]), 4)
        self.assertEqual([f for level, f in levels if level == LogLevel.info],
                         ["informer {informer} reconnected after {seconds:.1f}s"])
