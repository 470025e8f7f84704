"""End to end: the discovery agent against the real sidero service, in namespaces.

Two namespaces joined by a veth pair (10.213.<n>.0/24 inside them only; L{tests.netlab}):

    <p>-srv  eth0 10.213.<n>.1/24: dnsmasq (the site DHCP server) and the real
             C{twistd sidero} (embedded store, API port 8081)
    <p>-agt  eth0 with a fixed MAC and no address: C{python -m sidero.agent --no-reboot}

The agent reads a kernel command line file, finds its NIC by MAC, DHCPs its address (with
hostname, DNS and MTU options), registers with the inventory of a recorded sysfs tree, reports
its addresses, and — once the Server is accepted and not clean — wipes the files standing in
for its disks and marks the Server clean.  The Server is read back through sidero's own
management socket.  Everything is torn down, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.agent.trees import DEFAULT_DISKS, make_dev, make_sysfs
from tests.netlab import NetLab, missing_requirements
from tests.paths import REPO, RUN_SIDERO, tree_env

MAC = "52:54:00:5e:1d:e0"
UUID = "11223344-5566-7788-99aa-bbccddeeff00"  # of the recorded qemu-pc tables
HOSTNAME = "metal-node-7"
MIB = 1 << 20


class AgentNetnsTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        reason = missing_requirements(("dnsmasq", "unshare"))
        if reason is not None:
            raise SkipTest(f"LOUD SKIP: the agent netns test cannot run: {reason}")
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.lab = NetLab(f"sa{os.getpid() % 100000}", 200 + os.getpid() % 50, self.work)
        self.addCleanup(self.lab.teardown)
        self.net = f"10.213.{self.lab.net}"
        self.server_ip = self.lab.ip(1)
        self.srv, self.agt = self.lab.add_namespace("srv"), self.lab.add_namespace("agt")
        self.lab.add_link(self.srv, self.agt)
        self.lab.run("ip", "-n", self.agt, "link", "set", "eth0", "address", MAC)
        self.lab.run("ip", "-n", self.srv, "addr", "add", f"{self.server_ip}/24", "dev", "eth0")
        self.lab.run("ip", "-n", self.srv, "link", "set", "eth0", "up")
        # The agent writes resolv.conf; this keeps the write away from the host's file.
        self.resolv = str(self.lab.private_resolv_conf(self.agt))
        self.start_dnsmasq()
        self.start_sidero()

    def start_dnsmasq(self) -> None:
        self.dnsmasq_log = os.path.join(self.work, "dnsmasq.log")
        self.lab.site_dnsmasq(self.srv, log=self.dnsmasq_log, options=[
            f"dhcp-host={MAC},{self.net}.123,{HOSTNAME}",
            f"dhcp-option=option:dns-server,{self.server_ip}",
            "dhcp-option=option:mtu,1400",
            "dhcp-option=option:classless-static-route,"
            f"10.99.0.0/16,{self.server_ip},0.0.0.0/0,{self.server_ip}",
        ])

    def start_sidero(self) -> None:
        # trial's temp paths can exceed the 107-byte limit of a unix socket path.
        socket_dir = tempfile.mkdtemp(prefix="sa-")
        self.addCleanup(shutil.rmtree, socket_dir, True)
        self.socket = os.path.join(socket_dir, "m.sock")
        self.sidero_log = os.path.join(self.work, "sidero.log")
        self.sidero = self.lab.spawn(self.srv, [
            sys.executable, str(RUN_SIDERO),
            "--api-endpoint", self.server_ip, "--api-port", "8081", "--http-port", "8081",
            "--state-dir", os.path.join(self.work, "state"), "--store", "embedded",
            "--talos-assets-url", "http://127.0.0.1:1", "--disable-dhcp-proxy",
            "--disable-tftp", "--disable-siderolink", "--disable-syslog", "--no-enable-leader-election",
            "--management-socket", self.socket, "--insecure-wipe",
            "--server-reboot-timeout", "30s",
        ], self.sidero_log, env=tree_env())

    def tail(self, path: str, lines: int = 40) -> str:
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(missing)"

    async def wait_for(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await deferToThread(predicate):
                return
            await deferLater(reactor, 0.25, lambda: None)
        self.fail(f"timed out after {timeout:g}s waiting for {what}; sidero exit status "
                  f"{self.sidero.poll()}\n--- sidero log:\n{self.tail(self.sidero_log)}")

    def manage(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import sys; from sidero.management.cli import main; "
             "sys.exit(main())", "--socket", self.socket, *args],
            capture_output=True, text=True, timeout=30, cwd=REPO, input=input,
            env=tree_env())

    def sidero_ready(self) -> bool:
        return self.manage("get", "servers").returncode == 0

    def get_server(self) -> dict[str, Any]:
        result = self.manage("get", "server", UUID, "-o", "json")
        self.assertEqual(result.returncode, 0, result.stderr)
        server: dict[str, Any] = json.loads(result.stdout)
        return server

    def run_agent(self, sysfs: str, dev: str) -> Deferred[subprocess.CompletedProcess[str]]:
        cmdline = os.path.join(self.work, "cmdline")
        with open(cmdline, "w") as f:
            f.write(f"console=ttyS0 panic=30 sidero.endpoint={self.server_ip}:8081 "
                    f"sidero.mac={MAC.upper()} ip=dhcp\n")
        argv = ["ip", "netns", "exec", self.agt, "unshare", "--uts", sys.executable, "-m",
                "sidero.agent", "--cmdline", cmdline, "--no-reboot", "--no-bmc",
                "--sysfs", sysfs, "--dev", dev, "--retry-interval", "1", "--retry-timeout", "60"]
        return deferToThread(subprocess.run, argv, capture_output=True, text=True, timeout=150,
                             cwd=REPO, env=tree_env())

    def keep(self, name: str, text: str) -> None:
        with open(os.path.join(self.work, name), "w") as f:
            f.write(text)

    async def test_register_accept_wipe(self) -> None:
        """The agent DHCPs, registers the recorded inventory and its address; once accepted, it
        wipes the disk files (insecure mode) and the Server becomes clean."""
        await self.wait_for("sidero's management socket", self.sidero_ready, 60)
        sysfs = make_sysfs(os.path.join(self.work, "sys"))
        dev = make_dev(os.path.join(self.work, "dev"))

        first = await self.run_agent(sysfs, dev)
        self.keep("agent-1.log", first.stderr)
        self.assertEqual(first.returncode, 0, first.stderr[-3000:] + self.tail(self.sidero_log))
        self.assertIn("[sidero] registering " + UUID, first.stderr)
        server = self.get_server()
        spec = server["spec"]
        self.assertIs(spec["accepted"], False)
        self.assertEqual(spec["hostname"], HOSTNAME)  # option 12 applied, then reported
        hw = spec["hardware"]
        self.assertEqual(hw["system"], {
            "uuid": UUID, "manufacturer": "Acme Compute", "productName": "Rack R1",
            "serialNumber": "ACME-SN-0001", "skuNumber": "SKU-R1", "family": "Rack"})
        self.assertEqual(hw["compute"]["processorCount"], 2)
        self.assertEqual(hw["compute"]["processors"][0]["productName"], "Acme X 3000")
        self.assertEqual(hw["memory"]["totalSize"], "2 GB")
        self.assertEqual(hw["memory"]["modules"][0]["productName"], "MEM-PART-1")
        self.assertEqual([d["deviceName"] for d in hw["storage"]["devices"]],
                         ["/dev/mmcblk0", "/dev/nvme0n1", "/dev/sda", "/dev/vdb", "/dev/xvda"])
        self.assertEqual(hw["storage"]["devices"][1]["type"], "NVMe")
        interfaces = hw["network"]["interfaces"]
        self.assertEqual([i["mac"] for i in interfaces], [MAC])
        self.assertEqual(interfaces[0]["mtu"], 1400)
        self.assertIn(f"{self.net}.123/24", interfaces[0]["addresses"])
        self.assertIn("up", interfaces[0]["flags"].split("|"))
        self.assertEqual(server.get("status", {}).get("addresses"),
                         [{"type": "InternalIP", "address": f"{self.net}.123"}])
        with open(self.resolv) as f:
            self.assertEqual(f.read(), f"nameserver {self.server_ip}\n")
        routes = self.lab.run("ip", "-n", self.agt, "route", "show", "proto", "boot")
        self.assertIn(f"default via {self.server_ip} dev eth0", routes)
        self.assertIn(f"10.99.0.0/16 via {self.server_ip} dev eth0", routes)
        # Not accepted: nothing destructive happened.
        with open(os.path.join(dev, "sda"), "rb") as f:
            self.assertEqual(f.read(16), b"\xaa" * 16)

        server["spec"]["accepted"] = True
        applied = self.manage("apply", "-f", "-", input=json.dumps(server))
        self.assertEqual(applied.returncode, 0, applied.stderr)

        second = await self.run_agent(sysfs, dev)
        self.keep("agent-2.log", second.stderr)
        self.assertEqual(second.returncode, 0, second.stderr[-3000:] + self.tail(self.sidero_log))
        self.assertIn("disks wiped", second.stderr)
        server = self.get_server()
        self.assertIs(server["status"]["isClean"], True)
        power_cycle = [c for c in server["status"].get("conditions", [])
                       if c["type"] == "PowerCycle"]
        self.assertEqual([c["status"] for c in power_cycle], ["True"])
        sizes = {d.name: d.sectors * 512 for d in DEFAULT_DISKS}
        for name in ("sda", "nvme0n1", "mmcblk0", "xvda"):
            with open(os.path.join(dev, name), "rb") as f:
                data = f.read()
            self.assertEqual(len(data), sizes[name])
            self.assertEqual(data[:MIB], bytes(MIB), f"{name}: first MiB not zeroed")
            if sizes[name] >= 2 * MIB:
                self.assertEqual(data[-MIB:], bytes(MIB), f"{name}: last MiB not zeroed")
            if sizes[name] > 2 * MIB:
                self.assertEqual(set(data[MIB:-MIB]), {0xAA}, f"{name}: insecure wipe went "
                                 "beyond the first and last MiB")
        for name in ("vdb", "sr0", "loop0", "dm-0", "md127", "ram0", "sg0"):  # ro or excluded
            with open(os.path.join(dev, name), "rb") as f:
                self.assertEqual(set(f.read()), {0xAA}, f"{name} must not be wiped")
