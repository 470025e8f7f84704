"""A private test network: namespaces on a bridge, built by the test and always torn down.

Layout (names carry a per-run prefix, so parallel runs never collide):

    <p>-sw   bridge br0 + tap0 (QEMU attaches here)
    <p>-dhcp eth0 10.213.0.1/24, fd00:213::1/64  (the site DHCP server: dnsmasq, addresses only)
    <p>-boot eth0 10.213.0.2/24                    (sidero)
    <p>-cli  eth0 (no address: DHCP clients)

Only private addresses inside these namespaces are ever used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

NETWORK = "10.213.0"
SITE_DHCP_IP = f"{NETWORK}.1"
BOOT_IP = f"{NETWORK}.2"


def why_not_runnable(tools: Sequence[str] = ()) -> str | None:
    """The reason these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, tap devices, ports 67/69)"
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-test-deps installs it)"
    return None


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=30)


class TestNetwork:
    """Create with L{setup}, always call L{teardown} (it is idempotent)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"sd{os.getpid() % 100000}"
        self.sw = f"{self.prefix}-sw"
        self.namespaces = [self.sw]
        self.processes: list[subprocess.Popen[bytes]] = []

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def setup(self, hosts: dict[str, str | None], with_tap: bool = True) -> None:
        """Create the switch and one namespace per host (role → IPv4 address or None)."""
        run("ip", "netns", "add", self.sw)
        run("ip", "-n", self.sw, "link", "set", "lo", "up")
        run("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.sw, "link", "set", "br0", "type", "bridge", "stp_state", "0",
            "forward_delay", "0")
        run("ip", "-n", self.sw, "link", "set", "br0", "up")
        for role, address in hosts.items():
            ns = self.ns(role)
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            port = f"p-{role}"[:15]
            run("ip", "-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            run("ip", "-n", self.sw, "link", "set", port, "master", "br0")
            run("ip", "-n", self.sw, "link", "set", port, "up")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            if address:
                run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        if with_tap:
            run("ip", "-n", self.sw, "tuntap", "add", "dev", "tap0", "mode", "tap")
            run("ip", "-n", self.sw, "link", "set", "tap0", "master", "br0")
            run("ip", "-n", self.sw, "link", "set", "tap0", "up")

    def spawn(self, role: str, argv: Sequence[str], log_path: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a process inside a namespace (own process group), output to C{log_path}."""
        ns = self.sw if role == "sw" else self.ns(role)
        log = open(log_path, "ab")  # the child keeps its own descriptor; ours closes below
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        log.close()
        self.processes.append(proc)
        return proc

    def teardown(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 5
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        self.namespaces = [self.sw]


def dnsmasq_site_config(work: str, interface: str = "eth0") -> str:
    """A dnsmasq config for the site DHCP server: addresses only, IPv6 RA (iPXE waits ~13 s
    per DHCP without one), no ICMP probe before offering (saves ~3 s)."""
    path = os.path.join(work, "dnsmasq.conf")
    with open(path, "w") as f:
        f.write(
            "port=0\n"
            f"interface={interface}\n"
            "bind-interfaces\n"
            f"dhcp-range={NETWORK}.100,{NETWORK}.150,255.255.255.0,1h\n"
            "log-dhcp\n"
            "no-ping\n"
            "enable-ra\n"
            "dhcp-range=fd00:213::,ra-only\n"
            f"dhcp-leasefile={os.path.join(work, 'leases')}\n"
        )
    return path
