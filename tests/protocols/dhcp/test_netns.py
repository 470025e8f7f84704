"""Real peers in network namespaces: dnsmasq as the site server, our proxy, real clients.

Topology (all inside namespaces this test creates and deletes): a bridge; C{site} runs
dnsmasq handing out addresses only (10.213.71.1); C{boot} runs our proxy as a subprocess
(``python -m sidero.protocols.dhcp``, 10.213.71.2); C{cli} runs udhcpc/dhclient/perfdhcp
and tcpdump. Skips loudly only when not root or a tool is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sidero.protocols.dhcp import codec
from tests.netlab import NetLab, missing_requirements
from tests.protocols.dhcp import packets as p
from tests.protocols.dhcp.pcap import Packet, read_pcap

NET = 71
TOOLS = ("dnsmasq", "udhcpc", "tcpdump", "perfdhcp")
PXE_VENDOR = "PXEClient:Arch:00000:UNDI:002001"


def dhcp_replies(packets: list[Packet]) -> list[codec.DHCPMessage]:
    out = []
    for pkt in packets:
        if pkt.sport == 67 and pkt.dport == 68:
            out.append(codec.decode(pkt.payload))
    return out


class NamespaceTests(SynchronousTestCase):
    """Our proxy next to a real site DHCP server, seen by real clients."""

    def setUp(self) -> None:
        reason = missing_requirements(TOOLS)
        if reason is not None:
            raise SkipTest(f"NAMESPACE DHCP TESTS NOT RUN: {reason}")
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.lab = NetLab(f"sdh{os.getpid() % 100000}", NET, self.work)
        self.addCleanup(self.lab.teardown)
        self.lab.setup_switch()
        self.site = self.lab.add_host("site", 1)
        self.boot = self.lab.add_host("boot", 2)
        self.cli = self.lab.add_host("cli", None)
        self.lab.site_dnsmasq(self.site)
        self.proxy_log = self.work / "proxy.log"
        self.proxy = self.lab.spawn_proxy(
            self.boot, self.proxy_log, "--endpoint", self.lab.ip(2), "--api-port", "8081",
            "--log-level", "debug")
        self.lab.wait_for(self.proxy_log, "DHCP proxy listening on eth0", 20, self.proxy)

    def proxy_counters(self) -> dict[str, object]:
        """Stop the proxy and read the counters line it prints on SIGTERM."""
        self.lab.stop(self.proxy, signal.SIGTERM, timeout=10)
        text = self.proxy_log.read_text()
        m = re.search(r"dhcp-proxy counters (\{.*\})", text)
        assert m is not None, text[-2000:]
        result: dict[str, object] = json.loads(m.group(1))
        return result

    def capture(self) -> tuple[subprocess.Popen[bytes], Path]:
        pcap = self.work / "cli.pcap"
        log = self.work / "tcpdump.log"
        proc = self.lab.spawn(self.cli, ["tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode",
                                         "-Z", "root", "-w", str(pcap),
                                         "udp and (port 67 or port 68)"], log)
        self.lab.wait_for(log, "listening on", 10, proc)
        return proc, pcap

    def test_udhcpc_lease_and_boot_options(self) -> None:
        """udhcpc takes dnsmasq's lease while our boot OFFER for it is on the wire."""
        script = self.work / "udhcpc.sh"
        env_out = self.work / "udhcpc.env"
        script.write_text(f"#!/bin/sh\necho \"== $1\" >> {env_out}\nenv >> {env_out}\n")
        script.chmod(0o755)
        tcpdump, pcap = self.capture()
        # busybox udhcpc does not skip offers without an address: when our proxy OFFER
        # arrives before dnsmasq's it "selects" us and fails (a PXE ROM would merge the two).
        # That race is the client's; retry a few times, as a real client would.
        for _attempt in range(5):
            res = subprocess.run(
                ["ip", "netns", "exec", self.cli, "udhcpc", "-i", "eth0", "-n", "-q", "-f",
                 "-t", "3", "-T", "1", "-s", str(script), "-V", PXE_VENDOR,
                 "-O", "43", "-O", "60", "-O", "66", "-O", "67"], capture_output=True, timeout=30)
            if res.returncode == 0:
                break
        self.assertEqual(res.returncode, 0, res.stderr.decode(errors="replace"))
        time.sleep(0.3)  # let the last frames reach the capture file
        self.lab.stop(tcpdump, signal.SIGINT)

        env = env_out.read_text()
        self.assertIn("== bound", env)
        ip = re.search(r"^ip=(\S+)", env, re.M)
        assert ip is not None, env
        last = int(ip.group(1).rsplit(".", 1)[1])
        self.assertTrue(ip.group(1).startswith("10.213.71.") and 100 <= last <= 150, env)
        self.assertIn(f"serverid={self.lab.ip(1)}", env)

        replies = dhcp_replies(read_pcap(pcap))
        ours = [m for m in replies
                if m.get(codec.OPT_SERVER_ID) == bytes((10, 213, NET, 2))]
        site = [m for m in replies
                if m.get(codec.OPT_SERVER_ID) == bytes((10, 213, NET, 1))]
        self.assertTrue(ours, f"no proxy OFFER captured; replies: {replies}")
        self.assertTrue(site, "no site OFFER captured")
        offer = ours[0]
        self.assertEqual(offer.message_type, codec.DHCPOFFER)
        self.assertEqual(offer.yiaddr, "0.0.0.0")
        self.assertEqual(offer.siaddr, self.lab.ip(2))
        self.assertEqual(offer.get(codec.OPT_VENDOR_CLASS), b"PXEClient")
        self.assertEqual(offer.get(codec.OPT_BOOTFILE), b"undionly.kpxe")
        self.assertEqual(offer.get(codec.OPT_TFTP_SERVER), self.lab.ip(2).encode())
        self.assertEqual(offer.get(codec.OPT_VENDOR_SPECIFIC), b"\x06\x01\x08\xff")
        self.assertTrue(any(m.yiaddr == ip.group(1) for m in site))
        counters = self.proxy_counters()
        self.assertGreaterEqual(int(counters["offers"]), 1)  # type: ignore[call-overload]
        self.assertEqual(counters["malformed"], 0)
        ignored = counters["ignored"]
        assert isinstance(ignored, dict)
        self.assertGreaterEqual(ignored["request-for-site-server"], 1)

    def test_dhclient_unaffected(self) -> None:
        """A plain dhclient (no PXE) gets its lease and no reply from us."""
        if shutil.which("dhclient") is None:
            raise SkipTest("DHCLIENT TEST NOT RUN: dhclient missing (apt-get install "
                           "isc-dhcp-client)")
        script = self.work / "dhclient.sh"
        env_out = self.work / "dhclient.env"
        script.write_text(f"#!/bin/sh\nenv >> {env_out}\n")
        script.chmod(0o755)
        self.lab.run("ip", "netns", "exec", self.cli, "dhclient", "-1", "-v", "-sf", str(script),
                     "-lf", str(self.work / "dhclient.leases"), "-pf",
                     str(self.work / "dhclient.pid"), "eth0", timeout=30)
        # dhclient forks into the background with its lease; the child writes the pid file a
        # moment after the parent exits. Stop it either way (by its unique lease file path).
        pidfile = self.work / "dhclient.pid"
        for _ in range(40):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        pid = pidfile.read_text().strip() if pidfile.exists() else ""
        if pid:
            self.lab.run("kill", pid, check=False)
        else:
            self.lab.run("pkill", "-f", str(self.work / "dhclient.leases"), check=False)
        self.assertRegex(env_out.read_text(), r"new_ip_address=10\.213\.71\.1[0-5]\d")
        counters = self.proxy_counters()
        self.assertEqual((counters["offers"], counters["acks"]), (0, 0))
        ignored = counters["ignored"]
        assert isinstance(ignored, dict)
        self.assertGreaterEqual(ignored["not-pxe"], 1)

    def test_perfdhcp_load(self) -> None:
        """perfdhcp (as a relay) gets an OFFER for every DISCOVER at 300/s, with no errors."""
        self.lab.run("ip", "-n", self.cli, "addr", "add", f"{self.lab.ip(9)}/24", "dev", "eth0")
        out = self.lab.run(
            "ip", "netns", "exec", self.cli, "perfdhcp", "-4", "-l", self.lab.ip(9), "-r", "300",
            "-p", "5", "-R", "5000", "-i", "-W", "1000000",
            "-o", f"60,{PXE_VENDOR.encode().hex()}", "-o", "93,0000",
            self.lab.ip(2), timeout=60, check=False)
        sent = re.search(r"sent packets: (\d+)", out)
        received = re.search(r"received packets: (\d+)", out)
        assert sent is not None and received is not None, out
        self.assertGreater(int(sent.group(1)), 1000, out)
        self.assertEqual(received.group(1), sent.group(1), out)
        counters = self.proxy_counters()
        self.assertEqual(counters["offers"], int(sent.group(1)))
        self.assertEqual((counters["errors"], counters["send_errors"], counters["malformed"]),
                         (0, 0, 0))

    def test_proxy_port_request_acked(self) -> None:
        """An EDK2-style REQUEST to :4011 from another namespace gets an ACK back."""
        self.lab.run("ip", "-n", self.cli, "addr", "add", f"{self.lab.ip(9)}/24", "dev", "eth0")
        request = p.bootp(
            p.opt(53, b"\x03") + p.opt(93, b"\x00\x07") + p.opt(97, p.GUID)
            + p.opt(60, b"PXEClient:Arch:00007:UNDI:003000")
            + p.opt(43, p.opt(71, b"\x80\x00\x00\x00") + b"\xff"),
            ciaddr=bytes((10, 213, NET, 9)), flags=0)
        client = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5)\n"
            f"s.bind(({self.lab.ip(9)!r},0))\n"
            f"s.sendto(bytes.fromhex({request.hex()!r}),({self.lab.ip(2)!r},4011))\n"
            "print(s.recvfrom(2048)[0].hex())\n")
        out = self.lab.run("ip", "netns", "exec", self.cli, sys.executable, "-c", client,
                           timeout=20)
        ack = codec.decode(bytes.fromhex(out.strip()))
        self.assertEqual(ack.message_type, codec.DHCPACK)
        self.assertEqual(ack.get(codec.OPT_BOOTFILE), b"snp.efi")
        self.assertEqual(ack.get(codec.OPT_VENDOR_SPECIFIC), b"\x47\x04\x80\x00\x00\x00\xff")
        self.assertEqual(self.proxy_counters()["acks"], 1)
