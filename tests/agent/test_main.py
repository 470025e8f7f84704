"""The agent program: command line, the flow of steps 6-10 with a fake API, and the CLI's
exit contract."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from sidero.agent import inventory, main
from sidero.agent.client import RetriesExhausted
from sidero.proto import agent_pb2 as pb
from tests.agent.trees import make_dev, make_sysfs
from tests.paths import REPO, tree_env

IFACE = inventory.Interface(2, "eth0", 0x11043, 1500, "52:54:00:12:34:56",
                            ("10.0.0.5/24", "fe80::1/64"))


class FakeClient:
    def __init__(self, response: pb.CreateServerResponse, fail: str | None = None) -> None:
        self.response = response
        self.fail = fail
        self.calls: list[tuple[str, object]] = []

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise RetriesExhausted(f"{name} failed after 11 attempts: UNAVAILABLE")

    def create_server(self, hardware: pb.HardwareInformation, hostname: str) -> pb.CreateServerResponse:
        self.calls.append(("CreateServer", hardware))
        self._maybe_fail("CreateServer")
        return self.response

    def reconcile_addresses(self, uuid: str, addresses: list[str]) -> None:
        self.calls.append(("ReconcileServerAddresses", (uuid, addresses)))

    def mark_wiped(self, uuid: str) -> None:
        self.calls.append(("MarkServerAsWiped", uuid))
        self._maybe_fail("MarkServerAsWiped")

    def heartbeat(self, uuid: str, timeout: float) -> None:
        self.calls.append(("Heartbeat", uuid))


class CommandLineTests(SynchronousTestCase):
    def cmdline(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_parse_cmdline(self) -> None:
        """key=value words are read; flags without = are ignored; later words win."""
        self.assertEqual(main.parse_cmdline("quiet a=1 sidero.mac=AA b=x=y a=2\n"),
                         {"a": "2", "sidero.mac": "AA", "b": "x=y"})

    def test_config_from_cmdline_and_overrides(self) -> None:
        """sidero.endpoint/sidero.mac come from the file; --endpoint/--mac override them."""
        path = self.cmdline("console=ttyS0 sidero.endpoint=10.0.0.1:8081 sidero.mac=AA:BB:CC:DD:EE:FF")
        c = main.make_config(["--cmdline", path])
        self.assertEqual((c.endpoint, c.mac, c.reboot, c.sysfs, c.dev),
                         ("10.0.0.1:8081", "aa:bb:cc:dd:ee:ff", True, "/sys", "/dev"))
        c = main.make_config(["--cmdline", path, "--endpoint", "h:1", "--mac", "11:22:33:44:55:66",
                              "--no-reboot", "--no-bmc", "--retry-interval", "2",
                              "--bmc-lan", "127.0.0.1:623:admin:pa:ss"])
        self.assertEqual((c.endpoint, c.mac, c.reboot, c.bmc, c.retry_interval, c.bmc_lan),
                         ("h:1", "11:22:33:44:55:66", False, False, 2.0,
                          ("127.0.0.1", 623, "admin", "pa:ss")))

    def test_missing_values(self) -> None:
        """No endpoint, or no MAC while networking, is fatal with a clear reason."""
        path = self.cmdline("console=ttyS0")
        with self.assertRaises(main.FatalError) as e:
            main.make_config(["--cmdline", path])
        self.assertIn("sidero.endpoint", str(e.exception))
        with self.assertRaises(main.FatalError) as e:
            main.make_config(["--cmdline", path, "--endpoint", "h:1"])
        self.assertIn("sidero.mac", str(e.exception))
        c = main.make_config(["--cmdline", self.mktemp(), "--endpoint", "h:1", "--no-network"])
        self.assertEqual(c.mac, "")

    def test_cli_fatal_exit(self) -> None:
        """With --no-reboot a fatal error exits 1 with one [sidero] fatal: line on stderr."""
        result = subprocess.run(
            [sys.executable, "-m", "sidero.agent", "--cmdline", self.cmdline(""), "--no-reboot"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env=tree_env())
        self.assertEqual(result.returncode, 1)
        fatal = [line for line in result.stderr.splitlines() if "fatal" in line]
        self.assertEqual(len(fatal), 1, result.stderr)
        self.assertTrue(fatal[0].startswith("[sidero] fatal: no sidero.endpoint="), fatal)

    def test_cli_unreachable_endpoint(self) -> None:
        """An endpoint that refuses: CreateServer retries (short here), then exit 1."""
        sysfs = make_sysfs(os.path.abspath(self.mktemp()))
        result = subprocess.run(
            [sys.executable, "-m", "sidero.agent", "--cmdline", self.cmdline(""), "--no-reboot",
             "--no-network", "--endpoint", "127.0.0.1:1", "--sysfs", sysfs,
             "--dev", os.path.abspath(self.mktemp()), "--retry-interval", "0.2", "--retry-timeout", "1"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env=tree_env())
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("[sidero] fatal: CreateServer failed after", result.stderr)
        self.assertIn("UNAVAILABLE", result.stderr)
        self.assertIn("[sidero] registering 11223344-5566-7788-99aa-bbccddeeff00", result.stderr)


class ModuleListTests(SynchronousTestCase):
    """/etc/modules: what the agent image loads after udev (ipmi_devintf for /dev/ipmi0)."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_names_comments_and_blank_lines(self) -> None:
        path = self.write("# loaded at boot\nipmi_devintf\n\n  ipmi_si  # KCS\nipmi_ssif opt=1\n")
        self.assertEqual(main.read_module_list(path), ["ipmi_devintf", "ipmi_si", "ipmi_ssif"])

    def test_missing_file_is_empty(self) -> None:
        self.assertEqual(main.read_module_list(self.mktemp()), [])

    def test_each_module_is_tried_and_failures_do_not_stop(self) -> None:
        path = self.write("ipmi_devintf\nipmi_si\n")
        calls: list[list[str]] = []

        def run(argv: list[str], check: bool) -> subprocess.CompletedProcess[str]:
            calls.append(argv)
            return subprocess.CompletedProcess(argv, 1 if argv[-1] == "ipmi_devintf" else 0)

        if main.shutil.which("modprobe") is None:
            self.patch(main.shutil, "which", lambda name: "/sbin/" + name)
        self.assertEqual(main.load_modules(path, run=run), ["ipmi_devintf", "ipmi_si"])
        self.assertEqual(calls, [["modprobe", "-q", "ipmi_devintf"], ["modprobe", "-q", "ipmi_si"]])


class FlowTests(SynchronousTestCase):
    def agent(self, response: pb.CreateServerResponse, dmi: str | None = "qemu-pc",
              fail: str | None = None) -> tuple[main.Agent, FakeClient, str]:
        sysfs = make_sysfs(self.mktemp(), dmi=dmi)
        dev = make_dev(self.mktemp())
        config = main.Config(endpoint="h:1", mac="", sysfs=sysfs, dev=dev, network=False,
                             reboot=False)
        client = FakeClient(response, fail)
        return main.Agent(config, client=client, interfaces=lambda: [IFACE]), client, dev  # type: ignore[arg-type]

    def test_registration_only(self) -> None:
        """Not accepted: register (with SMBIOS UUID) and report global addresses, nothing else."""
        agent, client, dev = self.agent(pb.CreateServerResponse())
        outcome = agent.run()
        self.assertEqual([c[0] for c in client.calls], ["CreateServer", "ReconcileServerAddresses"])
        self.assertEqual(client.calls[1][1], ("11223344-5566-7788-99aa-bbccddeeff00", ["10.0.0.5"]))
        self.assertIsNone(outcome.wiped)
        with open(os.path.join(dev, "sda"), "rb") as f:
            self.assertEqual(f.read(4), b"\xaa" * 4)

    def test_no_smbios(self) -> None:
        """Without SMBIOS the agent still registers, sending only storage."""
        agent, client, _ = self.agent(pb.CreateServerResponse(), dmi=None)
        self.assertEqual(agent.run().uuid, "")
        hw = client.calls[0][1]
        assert isinstance(hw, pb.HardwareInformation)
        self.assertEqual(hw.storage.device_count, 5)
        self.assertFalse(hw.HasField("network"))

    def test_wipe(self) -> None:
        """wipe: heartbeat first, disks wiped (secure → zeros on files), then MarkServerAsWiped."""
        agent, client, dev = self.agent(pb.CreateServerResponse(wipe=True, reboot_timeout=30))
        outcome = agent.run()
        names = [c[0] for c in client.calls]
        self.assertEqual(names[:3], ["CreateServer", "ReconcileServerAddresses", "Heartbeat"])
        self.assertEqual(names[-1], "MarkServerAsWiped")
        self.assertEqual(outcome.wiped, {"sda": "write-zeros", "nvme0n1": "write-zeros",
                                         "mmcblk0": "write-zeros", "xvda": "write-zeros",
                                         "vdb": "skipped"})
        with open(os.path.join(dev, "nvme0n1"), "rb") as f:
            self.assertEqual(set(f.read()), {0})

    def test_fatal_errors(self) -> None:
        """CreateServer or MarkServerAsWiped exhausting its retries is fatal."""
        agent, _, _ = self.agent(pb.CreateServerResponse(), fail="CreateServer")
        self.assertRaises(main.FatalError, agent.run)
        agent, _, _ = self.agent(pb.CreateServerResponse(wipe=True, insecure_wipe=True,
                                                         reboot_timeout=30),
                                 fail="MarkServerAsWiped")
        with self.assertRaises(main.FatalError) as e:
            agent.run()
        self.assertIn("MarkServerAsWiped", str(e.exception))
