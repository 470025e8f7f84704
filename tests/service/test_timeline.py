"""The boot timeline: linking a machine's names, bounds, the protocols feeding it, and
C{sidero describe server} / C{sidero logs -f} against the real service tree."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid as uuid_module
from typing import Any

import treq
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero import tap
from sidero.api.registry import SERVER
from sidero.timeline import BootTimeline, normalise_mac, uuid_from_pxe_guid
from tests.management.test_cli import REPO
from tests.ports import free_tcp_port, free_udp_port
from tests.service.test_tap import settings_for

UUID = "4c4c4544-0047-4a10-8048-b4c04f4d4a32"
MAC = "52:54:00:12:34:56"


class RecorderTests(SynchronousTestCase):
    """Names learned later move earlier steps; everything is bounded."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.timeline = BootTimeline(self.clock.seconds, per_machine=5, machines=3)

    def step(self, step: str, **names: Any) -> None:
        self.clock.advance(1)
        self.timeline.record(step, source="test", **names)

    def test_names_link_up(self) -> None:
        """DHCP (MAC), TFTP and /boot.ipxe (IP), /ipxe (UUID+MAC+IP): one timeline by UUID."""
        self.step("dhcp-offer", mac=MAC)
        self.step("dhcp-ack", mac=MAC, ip="10.0.0.7")
        self.step("tftp", ip="10.0.0.7", file="ipxe.efi")
        self.step("boot-script", ip="10.0.0.7")
        self.step("ipxe-decision", uuid=UUID.upper(), mac=MAC.replace(":", "-"), ip="10.0.0.7")
        steps = [e.step for e in self.timeline.for_machine(uuid=UUID)]
        self.assertEqual(steps, ["dhcp-offer", "dhcp-ack", "tftp", "boot-script", "ipxe-decision"])
        self.assertEqual([e.step for e in self.timeline.for_machine(mac=MAC)], steps)
        self.step("agent-register", uuid=UUID)
        self.assertEqual(self.timeline.for_machine(uuid=UUID)[-1].step, "agent-register")
        self.assertEqual(len(self.timeline.for_machine(uuid=UUID)), 5)  # bounded per machine

    def test_unrelated_machines_apart(self) -> None:
        """Another MAC on another address stays out of this machine's timeline."""
        self.step("dhcp-offer", mac=MAC, uuid=UUID)
        self.step("dhcp-offer", mac="52:54:00:00:00:01")
        self.step("tftp", ip="10.0.0.8")
        self.assertEqual([e.step for e in self.timeline.for_machine(uuid=UUID)], ["dhcp-offer"])
        self.assertEqual(self.timeline.for_machine(uuid="not-a-uuid"), [])

    def test_machines_bounded(self) -> None:
        """Past the machine limit the least recently seen machine is forgotten."""
        for i in range(4):
            self.step("dhcp-offer", mac=f"52:54:00:00:00:0{i}")
        self.assertEqual(len(list(self.timeline.machines_known())), 3)
        self.assertEqual(self.timeline.for_machine(mac="52:54:00:00:00:00"), [])

    def test_details_bounded_and_never_raises(self) -> None:
        """Long values are cut; odd values are stringified; a broken subscriber is ignored."""
        self.timeline.subscribe(lambda e: 1 / 0)
        seen: list[str] = []
        self.timeline.subscribe(lambda e: seen.append(e.step))
        self.step("boot-script", ip="10.0.0.9", path="/x" * 1000, thing=object())
        (name,) = self.timeline.machines_known()
        self.assertEqual(name, "ip:10.0.0.9")  # no MAC known for that address yet
        (entry,) = self.timeline._buckets[name]
        self.assertLess(len(entry.details["path"]), 300)
        self.assertIsInstance(entry.details["thing"], str)
        self.assertEqual(seen, ["boot-script"])
        self.assertEqual(entry.as_dict()["time"], "1970-01-01T00:00:01.000Z")

    def test_pxe_guid(self) -> None:
        """Option 97 is the SMBIOS UUID with its first three fields little-endian."""
        wire = b"\x00" + uuid_module.UUID(UUID).bytes_le
        self.assertEqual(uuid_from_pxe_guid(wire), UUID)
        self.assertIsNone(uuid_from_pxe_guid(b"\x00" * 17))
        self.assertIsNone(uuid_from_pxe_guid(b"\x01" + b"\x11" * 16))
        self.assertEqual(normalise_mac(b"\x52\x54\x00\x12\x34\x56"), MAC)
        self.assertIsNone(normalise_mac("52:54:00"))


class ProtocolFeedTests(SynchronousTestCase):
    """DHCP and TFTP report their steps."""

    def test_dhcp_offer_recorded(self) -> None:
        """A PXE DISCOVER answered: an offer with the firmware and boot file, by MAC."""
        from tests.protocols.dhcp import packets as p
        from tests.protocols.dhcp.test_protocol import make

        proto, _, clock = make()
        timeline = BootTimeline(clock.seconds)
        proto.timeline = timeline
        proto.datagramReceived(p.EDK2_UEFI_DISCOVER, ("0.0.0.0", 68))
        (name,) = timeline.machines_known()
        entries = timeline._buckets[name]
        self.assertEqual(entries[0].step, "dhcp-offer")
        self.assertIn("efi", entries[0].details["arch"])
        self.assertTrue(entries[0].details["boot_file"])

    def test_tftp_transfer_recorded(self) -> None:
        """A finished TFTP transfer: file, outcome and bytes, by the client's address."""
        from tests.protocols.tftp.test_protocol import Harness

        h = Harness({"f": b"x" * 100})
        timeline = BootTimeline(h.clock.seconds)
        h.protocol.timeline = timeline
        h.rrq("f")
        h.sent()
        h.ack(1)
        (name,) = timeline.machines_known()
        (entry,) = timeline._buckets[name]
        self.assertEqual((entry.step, entry.details["file"], entry.details["outcome"],
                          entry.details["bytes"]), ("tftp", "f", "complete", 100))


class ServiceTreeTimelineTests(TestCase):
    """A boot's HTTP steps through the real tree, then the CLI reads them."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.api_port = free_tcp_port()
        self.settings = settings_for(
            os.path.abspath(self.mktemp()), "disable_dhcp_proxy", "disable_siderolink", "disable_syslog",
            api_port=str(self.api_port), http_port=str(self.api_port), metrics_port=str(free_tcp_port()), health_port=str(free_tcp_port()),
            tftp_port=str(free_udp_port()), listen_address="127.0.0.1",
            server_log=os.path.join(os.path.abspath(self.mktemp()), "servers.log"))
        self.root = tap.build_service(self.settings, global_reactor)
        self.root.exit_on_start_failure = False
        self.root.startService()
        self.addCleanup(self.root.stopService)
        await self.root.when_started()

    def cli(self, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=REPO, SIDERO_MANAGEMENT_SOCKET=self.settings.management_socket)
        env.pop("KUBECONFIG", None)
        return subprocess.Popen([sys.executable, "-m", "sidero.management.cli", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    async def run_cli(self, *args: str) -> tuple[str, str, int]:
        proc = self.cli(*args)
        out, err = await deferToThread(proc.communicate, timeout=60)
        return out, err, proc.returncode

    async def test_describe_shows_boot(self) -> None:
        """/boot.ipxe, /ipxe (decision and why) and an agent registration appear in describe."""
        base = f"http://127.0.0.1:{self.api_port}"
        for path in ("/boot.ipxe", f"/ipxe?uuid={UUID}&mac={MAC}&arch=x86_64"):
            for _ in range(50):  # /ipxe fails (500) until the caches have synced
                response = await treq.get(base + path, persistent=False)
                await response.content()
                if response.code != 500:
                    break
        from sidero.agent import client as agent_client
        from sidero.proto import agent_pb2 as pb

        def register() -> None:
            c = agent_client.AgentClient.connect(f"127.0.0.1:{self.api_port}")
            try:
                hw = pb.HardwareInformation(system=pb.SystemInformation(uuid=UUID))
                c.create_server(hw, hostname="node-1")
            finally:
                c.close()

        await deferToThread(register)
        self.assertIsNotNone(await self.root.context.store.get(SERVER, UUID))
        out, err, code = await self.run_cli("describe", "server", UUID)
        self.assertEqual(code, 0, err)
        timeline = out[out.index("Boot Timeline:"):out.index("Events:")].splitlines()
        steps = [line.split()[1] for line in timeline[3:]]
        self.assertEqual(steps[:3], ["boot-script", "ipxe-decision", "agent-register"], out)
        decision = next(line for line in timeline if "ipxe-decision" in line)
        self.assertIn("decision=agent (", decision)  # the decision says why
        self.assertIn("arch=amd64", decision)

    async def test_logs_follow(self) -> None:
        """sidero logs -f prints the kept lines, then a line appended later, live."""
        store = self.root.context.store
        await store.create({"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                            "metadata": {"name": UUID}, "spec": {}})
        logs = self.root.context.server_logs
        logs.append(UUID, "[    0.000000] Linux version 6.1.0")
        proc = self.cli("logs", UUID, "-f")
        self.addCleanup(proc.kill)
        assert proc.stdout is not None
        first = await deferToThread(proc.stdout.readline)
        self.assertEqual(first, "[    0.000000] Linux version 6.1.0\n")
        logs.append(UUID, "[    1.234567] talos: booting")
        second = await deferToThread(proc.stdout.readline)
        self.assertEqual(second, "[    1.234567] talos: booting\n")
        proc.kill()
        await deferToThread(proc.wait)
        out, err, code = await self.run_cli("logs", UUID, "--tail", "1")
        self.assertEqual((out, code), ("[    1.234567] talos: booting\n", 0), err)
        out, err, code = await self.run_cli("logs", "no-such-server")
        self.assertEqual(code, 1)
        self.assertIn("not found", err)

    async def test_siderolink_and_talos_steps_through_the_tree(self) -> None:
        """The tree's log receiver and event sink feed the server's log buffer and timeline:
        C{sidero describe server} shows the SideroLink and Talos steps, C{sidero logs} the
        kernel line (the tunnel itself is tested in tests/siderolink/test_netns.py)."""
        from twisted.internet.defer import Deferred
        from twisted.internet.task import deferLater

        from sidero.proto import machine_pb2
        from tests.siderolink.support import TUNNEL, binding
        from tests.siderolink.test_eventsink import request

        context = self.root.context
        await context.store.create({"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                                    "metadata": {"name": UUID}, "spec": {"accepted": True}})
        await context.store.create(binding(UUID))
        assert context.siderolink_annotator is not None and context.log_receiver_factory is not None
        assert context.event_sink is not None
        for _ in range(200):
            if context.siderolink_annotator.for_tunnel_ip(TUNNEL) is not None:
                break
            await deferLater(global_reactor, 0.02, lambda: None)
        context.log_receiver_factory.emit(TUNNEL, {
            "msg": "Linux version 6.12.40-talos", "facility": "kern", "priority": "notice",
            "talos-time": "2025-08-04T09:12:01.018245617Z"}, first=True)
        await Deferred.fromCoroutine(context.event_sink.publish(
            f"ipv6:%5B{TUNNEL}%5D:43210",
            request(machine_pb2.SequenceEvent(sequence="boot", action=machine_pb2.SequenceEvent.START))))
        out, err, code = await self.run_cli("describe", "server", UUID)
        self.assertEqual(code, 0, err)
        timeline = out[out.index("Boot Timeline:"):out.index("Events:")]
        self.assertIn("siderolink-logs", timeline)
        sequence_line = next(line for line in timeline.splitlines() if "talos-sequence" in line)
        self.assertIn("sequence=boot", sequence_line)
        self.assertIn("action=START", sequence_line)
        out, err, code = await self.run_cli("logs", UUID)
        self.assertEqual((out, code), ("2025-08-04T09:12:01.018245617Z kern.notice: Linux version"
                                       " 6.12.40-talos\n", 0), err)
