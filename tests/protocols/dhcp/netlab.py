"""A throw-away network of namespaces for DHCP tests and benchmarks (REAL-CLIENTS 1).

One namespace holds a bridge; every other namespace gets an C{eth0} veth plugged into
it. Addresses live in 10.213.<n>.0/24 inside the namespaces only. Everything created is
recorded and removed by L{NetLab.teardown}, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.paths import REPO, tree_env

TOOLS = ("ip", "dnsmasq", "udhcpc", "tcpdump", "perfdhcp")


def missing_requirements(tools: Sequence[str] = TOOLS) -> str | None:
    """Why a namespace test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, ports 67/68)"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install iproute2 dnsmasq " \
               "udhcpc tcpdump kea-admin)"
    return None


@dataclass
class Packet:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def read_pcap(path: Path) -> list[Packet]:
    """UDP/IPv4 packets from a classic pcap file with Ethernet frames (tcpdump -w)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    out: list[Packet] = []
    i = 24
    while i + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[i + 8 : i + 12])[0]
        frame = data[i + 16 : i + 16 + incl]
        i += 16 + incl
        if linktype == 1:
            if len(frame) < 14 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
        elif linktype == 113:  # Linux cooked capture
            if len(frame) < 16 or frame[14:16] != b"\x08\x00":
                continue
            ip = frame[16:]
        else:
            continue
        if len(ip) < 20 or ip[9] != 17:
            continue
        ihl = (ip[0] & 0x0F) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport, length = struct.unpack("!HHH", udp[:6])
        out.append(Packet(".".join(map(str, ip[12:16])), sport, ".".join(map(str, ip[16:20])),
                          dport, udp[8:length]))
    return out


class NetLab:
    """Namespaces C{<prefix>-<name>} on a bridge in C{<prefix>-sw}."""

    def __init__(self, prefix: str, net: int, workdir: Path) -> None:
        self.prefix = prefix
        self.net = net
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sw = self.ns("sw")

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def ip(self, host: int) -> str:
        return f"10.213.{self.net}.{host}"

    def run(self, *argv: str, timeout: float = 15, check: bool = True) -> str:
        res = subprocess.run(argv, capture_output=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                               f"{res.stderr.decode(errors='replace')}")
        return res.stdout.decode(errors="replace")

    def setup_switch(self) -> None:
        self._add_ns(self.sw)
        self.run("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        self.run("ip", "-n", self.sw, "link", "set", "br0", "type", "bridge", "stp_state", "0",
                 "forward_delay", "0")
        self.run("ip", "-n", self.sw, "link", "set", "br0", "up")

    def _add_ns(self, ns: str) -> None:
        self.run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self.run("ip", "-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str, host: int | None) -> str:
        """A namespace with eth0 on the bridge, optionally addressed 10.213.<net>.<host>/24."""
        ns = self.ns(name)
        self._add_ns(ns)
        port = f"p{self.prefix[-6:]}{name[:4]}"[:15]
        self.run("ip", "-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
        self.run("ip", "-n", self.sw, "link", "set", port, "master", "br0")
        self.run("ip", "-n", self.sw, "link", "set", port, "up")
        self.run("ip", "-n", ns, "link", "set", "eth0", "up")
        if host is not None:
            self.run("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
        return ns

    def spawn(self, ns: str, argv: Sequence[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start C{argv} inside C{ns}; stdout+stderr go to C{log}."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=REPO, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def spawn_proxy(self, ns: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
        """Our DHCP proxy runner in C{ns} (the same module the QEMU harness uses)."""
        env = tree_env(PYTHONUNBUFFERED="1")
        return self.spawn(ns, [sys.executable, "-m", "sidero.protocols.dhcp", *args], log, env)

    @staticmethod
    def wait_for(log: Path, text: str, timeout: float, proc: subprocess.Popen[bytes] | None
                 = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text(errors="replace"):
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.05)
        body = log.read_text(errors="replace") if log.exists() else "<no log>"
        raise RuntimeError(f"{text!r} not seen in {log.name} within {timeout}s:\n{body[-3000:]}")

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)

    def teardown(self) -> None:
        """Stop every process we started and delete every namespace we made."""
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            self.run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def site_dnsmasq(self, ns: str, *, proxy_pxe: bool = False) -> subprocess.Popen[bytes]:
        """dnsmasq in C{ns}: the site server (addresses only, no-ping) or, with
        C{proxy_pxe}, a proxyDHCP reference offering the same boot file as ours."""
        conf = self.workdir / f"{ns}.conf"
        lines = ["port=0", "interface=eth0", "bind-interfaces", "log-dhcp",
                 f"dhcp-leasefile={self.workdir / (ns + '.leases')}"]
        if proxy_pxe:
            lines += [f"dhcp-range={self.ip(0)},proxy",
                      "pxe-service=x86PC,\"sidero\",undionly",
                      "pxe-service=X86-64_EFI,\"sidero\",snponly.efi",
                      "dhcp-no-override"]
        else:
            lines += [f"dhcp-range={self.ip(100)},{self.ip(150)},255.255.255.0,1h", "no-ping"]
        conf.write_text("\n".join(lines) + "\n")
        log = self.workdir / f"{ns}.dnsmasq.log"
        proc = self.spawn(ns, ["dnsmasq", "-C", str(conf), "-k", "--log-facility=-",
                               f"--pid-file={self.workdir / (ns + '.pid')}"], log)
        self.wait_for(log, "started, version", 10, proc)
        return proc
