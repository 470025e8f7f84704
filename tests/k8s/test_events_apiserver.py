"""Events written by L{EventRecorder} over L{KubernetesStore} on a real kube-apiserver.

What the operator sees is what counts here: C{kubectl get events} and C{kubectl describe}
must show sidero's Events on the right object, with the reason, message, type and source
the spec lists (§0.4, §2.2, §3.7); repeats bump C{count} on one Event as client-go does; the
per-object token bucket drops a flood; a failed write is counted and logged, never raised.
The Server controller and the agent API are driven against the real server to check they
emit exactly the spec's reasons and messages.

Skips loudly without the kube-apiserver binary (see L{tests.k8s.apiserver.require_binary}).
"""

from __future__ import annotations

import calendar
import json
import re
import time
import uuid
from typing import Any, cast

from twisted.internet import task, threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import ILogObserver, LogEvent, Logger, formatEvent
from twisted.trial.unittest import TestCase

from sidero.api.registry import EVENT, METAL_MACHINE, NAMESPACE, SERVER
from sidero.controllers.events import CONTROLLER_MANAGER, DEFAULT_BURST, EventRecorder
from sidero.controllers.server import ServerReconciler
from sidero.k8s.store import KubernetesStore
from sidero.power.fake import FakeFleet, FakePowerManager
from sidero.proto import agent_pb2 as pb
from sidero.protocols.grpc.server import EVENT_COMPONENT, AgentAPI
from sidero.store.interfaces import Object
from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.support import make_store, server_with_crds
from tests.k8s.test_kubectl import require_kubectl


class TrackingRecorder(EventRecorder):
    """An EventRecorder that remembers every write, so a test can wait for fire-and-forget ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list[Deferred[Object | None]] = []

    def event(self, obj: Object, type_: str, reason: str, message: str) -> Deferred[Object | None]:
        d = super().event(obj, type_, reason, message)
        self.pending.append(d)
        return d

    async def settle(self) -> list[Object | None]:
        pending, self.pending = self.pending, []
        return list(await gatherResults(pending))


class EventsOnAPIServerTests(TestCase):
    """EventRecorder's Events as the real API server stores them and kubectl shows them."""

    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        self.server: KubeAPIServer = await server_with_crds()
        require_kubectl()
        self.store: KubernetesStore = await make_store(self, self.server)
        from twisted.internet import reactor

        self.reactor = reactor

    async def make_server(self, **spec: Any) -> Object:
        """A fresh Server (deleted at cleanup, with its Events)."""
        name = str(uuid.uuid4())
        obj: Object = await self.store.create({
            "apiVersion": SERVER.api_version, "kind": "Server", "metadata": {"name": name},
            "spec": {"accepted": False, **spec},
        })
        self.addCleanup(self._forget, name)
        return obj

    async def _forget(self, name: str) -> None:
        await self.kubectl_ok("delete", "events", "-A", "--field-selector",
                              f"involvedObject.name={name}", "--ignore-not-found")
        await self.kubectl_ok("patch", "server", name, "--type=merge", "-p",
                              '{"metadata":{"finalizers":null}}')
        await self.kubectl_ok("delete", "server", name, "--ignore-not-found", "--wait=true")

    async def make_namespace(self) -> str:
        name = f"ev-{uuid.uuid4().hex[:8]}"
        await self.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        # The API server finalizes the namespace (and its Events) on its own.
        self.addCleanup(lambda: self.store.delete(NAMESPACE, name))
        return name

    async def kubectl_ok(self, *args: str) -> str:
        result = await threads.deferToThread(self.server.kubectl, *args)
        self.assertEqual(result.returncode, 0, f"kubectl {' '.join(args)}: {result.stderr}")
        return str(result.stdout)

    async def events_about(self, name: str, namespace: str = "default") -> list[Object]:
        listing = await self.store.list(EVENT, namespace, field_selector=f"involvedObject.name={name}")
        return list(listing.items)

    def past_clock(self, seconds_ago: float = 120.0) -> task.Clock:
        """A clock a little in the past, so the Events' times are plausible to kubectl."""
        clock = task.Clock()
        clock.advance(int(time.time() - seconds_ago))
        return clock

    # -- shape --------------------------------------------------------------------------------

    async def test_event_fields_on_the_server(self) -> None:
        """The stored Event names the Server and carries type, reason, message, source and count 1."""
        server = await self.make_server()
        name = server["metadata"]["name"]
        recorder = EventRecorder(self.store, self.reactor)
        written = await recorder.warning(server, "Server Management", "Failed to power on: boom.")
        assert written is not None
        [event] = await self.events_about(name)
        self.assertEqual(event["metadata"]["name"], written["metadata"]["name"])
        self.assertEqual(event["metadata"]["namespace"], "default")
        self.assertEqual(event["involvedObject"], {
            "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server", "name": name,
            "uid": server["metadata"]["uid"], "resourceVersion": server["metadata"]["resourceVersion"],
        })
        self.assertEqual((event["type"], event["reason"], event["message"], event["count"]),
                         ("Warning", "Server Management", "Failed to power on: boom.", 1))
        self.assertEqual(event["source"], {"component": CONTROLLER_MANAGER})
        self.assertEqual(event["reportingComponent"], CONTROLLER_MANAGER)
        self.assertEqual(event["firstTimestamp"], event["lastTimestamp"])
        self.assertEqual((recorder.failed, recorder.dropped), (0, 0))

    async def test_kubectl_get_events_and_describe(self) -> None:
        """kubectl get events lists the Event on server/<name>; kubectl describe server shows it."""
        server = await self.make_server()
        name = server["metadata"]["name"]
        recorder = EventRecorder(self.store, self.reactor)
        await recorder.normal(server, "Server Management", "Server powered off.")
        out = await self.kubectl_ok("get", "events", "-n", "default", "--field-selector",
                                    f"involvedObject.name={name}")
        [header, row] = out.splitlines()
        self.assertRegex(header, r"^LAST SEEN\s+TYPE\s+REASON\s+OBJECT\s+MESSAGE$")
        self.assertRegex(row, rf"^\S+\s+Normal\s+Server Management\s+server/{name}\s+Server powered off\.$")
        wide = await self.kubectl_ok("get", "events", "-n", "default", "-o", "wide", "--field-selector",
                                     f"involvedObject.name={name}")
        # SOURCE is the component alone (client-go leaves the instance empty without a host).
        self.assertRegex(wide.splitlines()[1], rf"server/{name}\s+{CONTROLLER_MANAGER}\s+Server powered off\.")
        described = await self.kubectl_ok("describe", "server", name)
        events = described.split("\nEvents:\n", 1)[1]
        self.assertRegex(events, rf"Normal\s+Server Management\s+\S+\s+{CONTROLLER_MANAGER}\s+"
                                 r"Server powered off\.")

    # -- de-duplication -------------------------------------------------------------------------

    async def test_repeat_bumps_count_on_one_event(self) -> None:
        """The same event again patches count and lastTimestamp of the one Event (describe: x3)."""
        server = await self.make_server()
        name = server["metadata"]["name"]
        clock = self.past_clock()
        recorder = EventRecorder(self.store, clock)
        first = await recorder.warning(server, "Server Management", "Failed to power off: timeout.")
        clock.advance(30)
        await recorder.warning(server, "Server Management", "Failed to power off: timeout.")
        clock.advance(31)
        third = await recorder.warning(server, "Server Management", "Failed to power off: timeout.")
        assert first is not None and third is not None
        [event] = await self.events_about(name)
        self.assertEqual(event["metadata"]["uid"], first["metadata"]["uid"])
        self.assertEqual(event["count"], 3)
        self.assertEqual(event["firstTimestamp"], first["firstTimestamp"])
        self.assertEqual(_seconds(event["lastTimestamp"]) - _seconds(event["firstTimestamp"]), 61)
        self.assertEqual(third["count"], 3)
        described = await self.kubectl_ok("describe", "server", name)
        # kubectl: "<age of lastTimestamp> (x<count> over <age of firstTimestamp>)".
        self.assertRegex(described, r"Warning\s+Server Management\s+\S+ \(x3 over \S+\)\s+"
                                    rf"{CONTROLLER_MANAGER}\s+Failed to power off: timeout\.")
        # A different message is another Event.
        await recorder.warning(server, "Server Management", "Failed to power off: refused.")
        self.assertEqual(len(await self.events_about(name)), 2)

    async def test_concurrent_repeats_land_in_one_event(self) -> None:
        """Repeats recorded at once (writes in flight together) end in one Event with the full count."""
        server = await self.make_server()
        recorder = EventRecorder(self.store, self.reactor)
        results = await gatherResults([
            recorder.normal(server, "Server Allocation", "Server marked as unallocated.") for _ in range(6)
        ])
        self.assertNotIn(None, results)
        [event] = await self.events_about(server["metadata"]["name"])
        self.assertEqual(event["count"], 6)

    async def test_deleted_event_is_recreated(self) -> None:
        """If the Event being counted was deleted (TTL or by hand), the repeat creates a new one."""
        server = await self.make_server()
        name = server["metadata"]["name"]
        recorder = EventRecorder(self.store, self.reactor)
        first = await recorder.normal(server, "Server Wipe", "Server wiped via agent.")
        assert first is not None
        await self.kubectl_ok("delete", "event", "-n", "default", first["metadata"]["name"])
        again = await recorder.normal(server, "Server Wipe", "Server wiped via agent.")
        assert again is not None
        self.assertEqual(again["count"], 1)
        [event] = await self.events_about(name)
        self.assertNotEqual(event["metadata"]["uid"], first["metadata"]["uid"])
        self.assertEqual(recorder.failed, 0)

    # -- rate limit -----------------------------------------------------------------------------

    async def test_burst_of_25_then_dropped_per_object(self) -> None:
        """A 26th..30th distinct event of one object is dropped and counted; another object is unaffected."""
        noisy = await self.make_server()
        quiet = await self.make_server()
        recorder = EventRecorder(self.store, self.past_clock())
        results = []
        for i in range(DEFAULT_BURST + 5):
            results.append(await recorder.warning(noisy, "Server Management", f"Failed to power on: try {i}."))
        self.assertEqual(sum(r is not None for r in results), DEFAULT_BURST)
        self.assertEqual(results[DEFAULT_BURST:], [None] * 5)
        self.assertEqual(recorder.dropped, 5)
        self.assertEqual(recorder.failed, 0)
        stored = await self.events_about(noisy["metadata"]["name"])
        self.assertEqual(len(stored), DEFAULT_BURST)
        self.assertNotIn("Failed to power on: try 25.", {e["message"] for e in stored})
        self.assertIsNotNone(await recorder.normal(quiet, "Server Management", "Server powered off."))
        self.assertEqual(len(await self.events_about(quiet["metadata"]["name"])), 1)

    # -- namespaces and failures ----------------------------------------------------------------

    async def test_namespaced_object_event_in_its_namespace(self) -> None:
        """An Event about a MetalMachine goes to its namespace and kubectl describe metalmachine shows it."""
        namespace = await self.make_namespace()
        machine = await self.store.create({
            "apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": "worker-0", "namespace": namespace},
            "spec": {"serverClassRef": {"kind": "ServerClass", "name": "any"}},
        })
        recorder = EventRecorder(self.store, self.reactor, component="caps-controller-manager")
        await recorder.normal(machine, "ProviderSet", "Provider ID set.")
        [event] = await self.events_about("worker-0", namespace)
        self.assertEqual(event["metadata"]["namespace"], namespace)
        self.assertEqual(event["involvedObject"]["namespace"], namespace)
        self.assertEqual(event["involvedObject"]["kind"], "MetalMachine")
        self.assertEqual(await self.events_about("worker-0", "default"), [])
        described = await self.kubectl_ok("describe", "metalmachine", "-n", namespace, "worker-0")
        self.assertRegex(described, r"Normal\s+ProviderSet\s+\S+\s+caps-controller-manager\s+Provider ID set\.")

    async def test_write_failure_is_logged_and_counted(self) -> None:
        """An Event for a missing namespace fails on the server: counted, one warning logged, nothing raised."""
        logged: list[LogEvent] = []
        recorder = EventRecorder(self.store, self.reactor)
        recorder.log = Logger(observer=cast(ILogObserver, logged.append))
        ghost: dict[str, Any] = {
            "apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": "ghost", "namespace": f"missing-{uuid.uuid4().hex[:8]}", "uid": "u-1"},
        }
        result = await recorder.warning(ghost, "Server Management", "x")
        self.assertIsNone(result)
        self.assertEqual((recorder.failed, recorder.dropped), (1, 0))
        failures = [e for e in logged if e["log_level"].name == "warn"]
        self.assertEqual(len(failures), 1)
        text = formatEvent(failures[0])
        self.assertIn("ghost", text)
        self.assertIn(f'namespaces "{ghost["metadata"]["namespace"]}" not found', text)
        self.assertEqual(self.flushLoggedErrors(), [])

    # -- what the controllers emit (spec §2.2, §3.7) --------------------------------------------

    async def test_server_controller_events(self) -> None:
        """The Server controller's wipe power-on and a broken management client give the spec's events."""
        server = await self.make_server(accepted=True)
        name = server["metadata"]["name"]
        recorder = TrackingRecorder(self.store, self.reactor)
        fleet = FakeFleet(report_state=True)  # the machine is off and obeys
        power = FakePowerManager(name, fleet, is_fake=False)  # a real BMC: events are emitted

        async def power_for(obj: Object) -> FakePowerManager:
            return power

        reconciler = ServerReconciler(self.store, power_for, recorder, self.reactor, pxe_mode="bios")
        await reconciler.reconcile(name)
        await recorder.settle()
        self.assertEqual(fleet.machine(name).operations, ["set_pxe:bios", "power_on"])

        async def broken(obj: Object) -> FakePowerManager:
            raise ValueError('secret key "user" is missing in secret "x-bmc"')

        await ServerReconciler(self.store, broken, recorder, self.reactor).reconcile(name)
        await recorder.settle()
        got = sorted((e["type"], e["reason"], e["message"], e["source"]["component"])
                     for e in await self.events_about(name))
        self.assertEqual(got, [
            ("Normal", "Server Management", "Server powered on and set to PXE boot once.", CONTROLLER_MANAGER),
            ("Warning", "Server Management",
             'Failed to initialize management client: secret key "user" is missing in secret "x-bmc".',
             CONTROLLER_MANAGER),
        ])
        stored = await self.store.get(SERVER, name)
        cycle = [c for c in stored["status"]["conditions"] if c["type"] == "PowerCycle"]
        self.assertRegex(cycle[0]["message"], r"^Server power cycled for wiping at \S+Z\.$")

    async def test_agent_api_events(self) -> None:
        """The agent API's register, wipe and BMC calls give the spec's events from sidero-server."""
        name = str(uuid.uuid4())
        self.addCleanup(self._forget, name)
        self.addCleanup(lambda: self.kubectl_ok("delete", "secret", "-n", "default", f"{name}-bmc",
                                                "--ignore-not-found"))
        recorder = TrackingRecorder(self.store, self.reactor, component=EVENT_COMPONENT)
        api = AgentAPI(self.store, self.reactor, auto_accept_servers=True, auto_bmc_setup=True,
                       insecure_wipe=False, server_reboot_timeout=1200.0, events=recorder)
        hardware = pb.HardwareInformation(system=pb.SystemInformation(uuid=name))
        response = await api.create_server(pb.CreateServerRequest(hardware=hardware, hostname="node-1"))
        self.assertTrue(response.wipe)
        await api.mark_server_as_wiped(pb.MarkServerAsWipedRequest(uuid=name))
        await api.update_bmc_info(pb.UpdateBMCInfoRequest(
            uuid=name, bmc_info=pb.BMCInfo(ip="10.5.0.20", port=623, user="admin", **{"pass": "pw"})))
        await recorder.settle()
        got = sorted((e["reason"], e["message"], e["type"], e["source"]["component"])
                     for e in await self.events_about(name))
        self.assertEqual(got, [
            ("BMC Update", "BMC info updated via API.", "Normal", EVENT_COMPONENT),
            ("Server Registration", "Server auto-registered via API.", "Normal", EVENT_COMPONENT),
            ("Server Wipe", "Server wiped via agent.", "Normal", EVENT_COMPONENT),
        ])
        self.assertEqual(EVENT_COMPONENT, "sidero-server")
        out = json.loads(await self.kubectl_ok("get", "events", "-n", "default", "-o", "json",
                                               "--field-selector", f"involvedObject.name={name}"))
        self.assertEqual({e["involvedObject"]["kind"] for e in out["items"]}, {"Server"})


def _seconds(stamp: str) -> int:
    m = re.fullmatch(r"(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)Z", stamp)
    assert m is not None, stamp
    y, mo, d, h, mi, s = (int(g) for g in m.groups())
    return calendar.timegm((y, mo, d, h, mi, s))
