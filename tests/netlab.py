"""A throw-away network of namespaces for tests and benchmarks with real peers (REAL-CLIENTS 1).

Namespaces are named C{<prefix>-<name>} (callers put their pid in the prefix, so parallel runs
never collide). Hosts either get an C{eth0} plugged into a bridge in C{<prefix>-sw}
(L{NetLab.setup_switch}, L{NetLab.add_host}; a C{tap0} on the bridge lets QEMU join), or two
namespaces are joined directly by a veth pair (L{NetLab.add_link}). Addresses live in
10.213.<net>.0/24 (and fd00:213:<net>::/64) inside the namespaces only. Everything created
(namespaces, processes, C{/etc/netns} entries) is recorded and removed by L{NetLab.teardown},
also after a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.paths import REPO, tree_env

#: Processes get this long to exit on SIGTERM at teardown before they are killed.
STOP_TIMEOUT = 10.0


def missing_requirements(tools: Sequence[str] = ()) -> str | None:
    """Why a namespace test cannot run here (not root, or a tool missing), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and tap devices, ports 67/68/69)"
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (scripts/install-test-deps installs them)"
    return None


class NetLab:
    """Namespaces C{<prefix>-<name>}, their links, and the processes started in them."""

    def __init__(self, prefix: str, net: int, workdir: str | Path) -> None:
        self.prefix = prefix
        self.net = net
        self.workdir = Path(workdir)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.etc_dirs: list[Path] = []
        self.sw = self.ns("sw")

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def ip(self, host: int) -> str:
        return f"10.213.{self.net}.{host}"

    def ip6(self, host: int) -> str:
        return f"fd00:213:{self.net}::{host:x}"

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> str:
        """Run a command to completion; its stdout.  @raise RuntimeError: it failed."""
        res = subprocess.run(argv, capture_output=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): "
                               f"{res.stderr.decode(errors='replace')}")
        return res.stdout.decode(errors="replace")

    # -- topology -------------------------------------------------------------------------

    def add_namespace(self, name: str) -> str:
        """A namespace with only C{lo}, up."""
        ns = self.ns(name)
        self.run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self.run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def setup_switch(self, tap: bool = False) -> None:
        """The bridge C{br0} in C{<prefix>-sw} (no STP, no forwarding delay); with C{tap}, a
        C{tap0} on it for a QEMU NIC."""
        self.add_namespace("sw")
        self.run("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        self.run("ip", "-n", self.sw, "link", "set", "br0", "type", "bridge", "stp_state", "0",
                 "forward_delay", "0")
        self.run("ip", "-n", self.sw, "link", "set", "br0", "up")
        if tap:
            self.run("ip", "-n", self.sw, "tuntap", "add", "dev", "tap0", "mode", "tap")
            self.run("ip", "-n", self.sw, "link", "set", "tap0", "master", "br0")
            self.run("ip", "-n", self.sw, "link", "set", "tap0", "up")

    def add_host(self, name: str, host: int | None) -> str:
        """A namespace with C{eth0} up on the bridge, addressed 10.213.<net>.<host>/24 unless
        C{host} is None."""
        ns = self.add_namespace(name)
        port = f"p{self.prefix[-6:]}{name[:4]}"[:15]
        self.run("ip", "-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
        self.run("ip", "-n", self.sw, "link", "set", port, "master", "br0")
        self.run("ip", "-n", self.sw, "link", "set", port, "up")
        self.run("ip", "-n", ns, "link", "set", "eth0", "up")
        if host is not None:
            self.run("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
        return ns

    def add_link(self, a: str, b: str) -> None:
        """Join namespaces C{a} and C{b} directly: a veth pair, C{eth0} in each, both down."""
        self.run("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                 "netns", b)

    def private_resolv_conf(self, ns: str) -> Path:
        """The C{resolv.conf} that C{ip netns exec} bind-mounts over C{/etc/resolv.conf} in
        C{ns}: a process there writing it never touches the host's file.  Removed at teardown."""
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        self.etc_dirs.append(etc)
        resolv = etc / "resolv.conf"
        resolv.write_text("# test placeholder\n")
        return resolv

    # -- processes ------------------------------------------------------------------------

    def spawn(self, ns: str, argv: Sequence[str], log: str | Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start C{argv} inside C{ns} in a process group of its own, from the repository root;
        stdout and stderr are appended to C{log}."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=REPO, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def spawn_proxy(self, ns: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
        """Our DHCP proxy runner in C{ns} (the same module the QEMU harness uses)."""
        return self.spawn(ns, [sys.executable, "-m", "sidero.protocols.dhcp", *args], log,
                          tree_env(PYTHONUNBUFFERED="1"))

    def site_dnsmasq(self, ns: str, *, proxy_pxe: bool = False, ipv6_ra: bool = False,
                     options: Sequence[str] = (), log: str | Path | None = None,
                     ) -> subprocess.Popen[bytes]:
        """dnsmasq on C{eth0} of C{ns}, started and logging (to C{log}, by default
        C{<workdir>/<ns>.dnsmasq.log}).

        By default the site DHCP server: addresses .100-.150, no ICMP probe before offering.
        With C{proxy_pxe}, a proxyDHCP reference offering the boot files ours offers instead.
        With C{ipv6_ra}, C{ns} also gets an IPv6 address and sends router advertisements (iPXE
        waits ~13 s per DHCP without one).  C{options} are more lines of configuration.
        """
        conf = self.workdir / f"{ns}.conf"
        lines = ["port=0", "interface=eth0", "bind-interfaces", "log-dhcp",
                 f"dhcp-leasefile={self.workdir / (ns + '.leases')}"]
        if proxy_pxe:
            lines += [f"dhcp-range={self.ip(0)},proxy",
                      "pxe-service=x86PC,\"sidero\",undionly",
                      "pxe-service=X86-64_EFI,\"sidero\",snp.efi",
                      "dhcp-no-override"]
        else:
            lines += [f"dhcp-range={self.ip(100)},{self.ip(150)},255.255.255.0,1h", "no-ping"]
        if ipv6_ra:
            self.run("ip", "-n", ns, "addr", "add", f"{self.ip6(1)}/64", "dev", "eth0", "nodad")
            lines += ["enable-ra", f"dhcp-range={self.ip6(0)},ra-only"]
        lines += options
        conf.write_text("\n".join(lines) + "\n")
        log = Path(log) if log is not None else self.workdir / f"{ns}.dnsmasq.log"
        proc = self.spawn(ns, ["dnsmasq", "-C", str(conf), "-k", "--log-facility=-",
                               f"--pid-file={self.workdir / (ns + '.pid')}"], log)
        self.wait_for(log, "started, version", 10, proc)
        return proc

    @staticmethod
    def wait_for(log: Path, text: str, timeout: float, proc: subprocess.Popen[bytes] | None
                 = None) -> None:
        """Until C{text} is in C{log}.  @raise RuntimeError: not within C{timeout}, or C{proc}
        exited first."""
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
        """Signal C{proc}'s process group and wait; SIGKILL it after C{timeout}."""
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)

    def teardown(self) -> None:
        """Stop every process we started (SIGTERM to all, SIGKILL to what is left after
        L{STOP_TIMEOUT}) and delete every namespace and C{/etc/netns} entry we made.
        Idempotent."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(proc)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            self.run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        for etc in self.etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        if self.etc_dirs:
            try:
                os.rmdir("/etc/netns")  # only when empty (another test may be using it)
            except OSError:
                pass
        self.etc_dirs.clear()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)
