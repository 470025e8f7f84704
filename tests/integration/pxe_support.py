"""The PXE lab the end-to-end boot tests share: namespaces, the site DHCP server, the real sidero.

L{PXELabTestCase.start_lab} builds, in namespaces of its own (L{tests.netlab}):

    <p>-sw    the bridge br0 and tap0, where a QEMU NIC joins
    <p>-dhcp  eth0 10.213.<n>.1: dnsmasq, the site DHCP server (addresses, IPv6 RAs)
    <p>-boot  eth0 10.213.<n>.2: the whole C{twistd sidero} (DHCP proxy, TFTP, HTTP, embedded store)

and tears it all down after the test, also on failure.  Images come from
C{scripts/build-e2e-images} (L{e2e_images}) or C{scripts/build-agent-image} (L{agent_images}).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.netlab import NetLab
from tests.paths import REPO, RUN_SIDERO, json_log_lines, tree_env

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
#: Set (by scripts/test, when it built the images) to make a missing agent image a failure.
REQUIRE_AGENT_IMAGE = "SIDERO_REQUIRE_AGENT_IMAGE"


def cache_dir() -> str:
    return os.environ.get("SIDERO_CACHE_DIR", "/var/cache/sidero-test")


def e2e_images() -> str:
    """Directory with vmlinuz and initramfs.xz (scripts/build-e2e-images), or SkipTest."""
    path = os.environ.get("SIDERO_E2E_IMAGES") or os.path.join(cache_dir(), "e2e-images")
    if not (os.path.isfile(os.path.join(path, "vmlinuz"))
            and os.path.isfile(os.path.join(path, "initramfs.xz"))):
        raise SkipTest(f"LOUD SKIP: no e2e kernel/initramfs in {path}; run scripts/build-e2e-images")
    return path


def agent_images(arch: str = "amd64") -> str:
    """The agent image directory C{agent-<arch>} (vmlinuz, initramfs.xz) that
    C{scripts/build-agent-image} built: C{$SIDERO_AGENT_IMAGES}, else C{.agent-image-path}.

    Missing: a loud skip, or a failure when C{$SIDERO_REQUIRE_AGENT_IMAGE=1} (CI builds it).
    """
    root = os.environ.get("SIDERO_AGENT_IMAGES", "")
    dot = REPO / ".agent-image-path"
    if not root and dot.is_file():
        root = dot.read_text().strip()
    path = os.path.join(root, f"agent-{arch}") if root else ""
    if path and all(os.path.isfile(os.path.join(path, f)) for f in ("vmlinuz", "initramfs.xz")):
        return path
    why = (f"no agent image in {path!r}" if path else
           "no agent image ($SIDERO_AGENT_IMAGES and .agent-image-path unset)")
    message = f"{why}; run scripts/build-agent-image (scripts/install-test-deps does, as root)"
    if os.environ.get(REQUIRE_AGENT_IMAGE) == "1":
        raise AssertionError(f"{REQUIRE_AGENT_IMAGE}=1 but {message}")
    raise SkipTest(f"LOUD SKIP: {message}")


def sidero_command(*args: str) -> list[str]:
    """Run the service tree from this source tree (see tests/integration/run_sidero.py)."""
    return [sys.executable, str(RUN_SIDERO), *args]


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(missing)"


class PXELabTestCase(TestCase):
    """A test case that runs sidero and the site DHCP server in a lab of namespaces."""

    #: 10.213.<NET>.0/24 inside the namespaces only.
    NET = 0
    #: Where a failure message looks for more to show (set by tests: a serial console...).
    extra_logs: list[tuple[str, str, int]]

    def start_lab(self, agent_dir: str, prefix: str, *sidero_args: str,
                  site_options: Sequence[str] = ()) -> None:
        """Build the lab and start sidero; C{agent_dir} is served as C{agent-amd64}.
        C{site_options} are more dnsmasq lines for the site DHCP server (C{{sidero}} stands
        for sidero's address)."""
        self.extra_logs = []
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.state = os.path.join(self.work, "state")
        agent = os.path.join(self.state, "env", "agent-amd64")
        os.makedirs(agent)
        for name in ("vmlinuz", "initramfs.xz"):
            shutil.copy(os.path.join(agent_dir, name), os.path.join(agent, name))
        self.net = NetLab(f"{prefix}{os.getpid() % 100000}", self.NET, self.work)
        self.addCleanup(self.net.teardown)
        self.net.setup_switch(tap=True)
        site = self.net.add_host("dhcp", 1)
        self.boot = self.net.add_host("boot", 2)
        self.boot_ip = self.net.ip(2)
        self.dnsmasq_log = os.path.join(self.work, "dnsmasq.log")
        self.net.site_dnsmasq(site, ipv6_ra=True, log=self.dnsmasq_log,
                              options=[o.format(sidero=self.net.ip(2)) for o in site_options])
        self.sidero_log = os.path.join(self.work, "sidero.log")
        # trial's temp paths can exceed the 107-byte limit of a unix socket path.
        socket_dir = tempfile.mkdtemp(prefix="sd-")
        self.addCleanup(shutil.rmtree, socket_dir, True)
        self.socket = os.path.join(socket_dir, "m.sock")
        self.sidero_proc = self.net.spawn(self.boot, sidero_command(
            "--api-endpoint", self.boot_ip, "--api-port", "8081", "--state-dir", self.state,
            "--talos-assets-url", "http://127.0.0.1:1",
            "--dhcp-interface", "eth0", "--log-format", "json", "--no-enable-leader-election",
            "--management-socket", self.socket, *sidero_args,
        ), self.sidero_log, env=tree_env())

    def failure_context(self) -> str:
        """What a failed wait shows: sidero's and dnsmasq's logs and every L{extra_logs}."""
        text = (f"sidero exit status {self.sidero_proc.poll()}\n--- sidero log tail:\n"
                + tail(self.sidero_log) + "\n--- dnsmasq log tail:\n" + tail(self.dnsmasq_log, 10))
        for title, path, lines in self.extra_logs:
            text += f"\n--- {title} ({path}):\n" + tail(path, lines)
        return text

    async def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float,
                       interval: float = 0.25, thread: bool = False) -> Any:
        """Poll C{predicate} (in a thread when it may block) until it returns a truthy value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await deferToThread(predicate) if thread else predicate()
            if value:
                return value
            await deferLater(reactor, interval, lambda: None)
        self.fail(f"timed out after {timeout:g}s waiting for {what}; " + self.failure_context())

    def sidero_ready(self) -> bool:
        probe = subprocess.run(
            ["ip", "netns", "exec", self.boot, "curl", "-sf", "-m", "1",
             f"http://{self.boot_ip}:8081/readyz"], capture_output=True)
        return probe.returncode == 0

    def read_events(self) -> list[dict[str, Any]]:
        """sidero's JSON log lines (--log-format json)."""
        return json_log_lines(self.sidero_log)

    def http_requests(self) -> list[dict[str, Any]]:
        return [e for e in self.read_events()
                if str(e.get("msg", "")).startswith("HTTP ") and "uri" in e]


def bios_nic(mac: str) -> list[str]:
    """SeaBIOS network boot through Debian's iPXE ROM on an e1000 on the lab's tap0."""
    return ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={mac}"]


def uefi_firmware(work: str) -> list[str]:
    """OVMF with a private copy of its variable store (the machine's NVRAM)."""
    vars_copy = os.path.join(work, "OVMF_VARS.fd")
    if not os.path.exists(vars_copy):
        shutil.copy(OVMF_VARS, vars_copy)
    return ["-machine", "q35",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}"]


def uefi_nic(mac: str, bootindex: int = 1) -> list[str]:
    """OVMF's own EDK2 PXE client (virtio-net, no option ROM) on the lab's tap0."""
    return ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex={bootindex}"]


def qemu_base(console: str, memory: int, smbios: Sequence[str]) -> list[str]:
    """TCG, no display, the serial console appended to C{console}."""
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory), "-smp", "1",
            "-nographic", "-vga", "none", "-nodefaults",
            "-chardev", f"file,id=console,path={console},append=on", "-serial", "chardev:console",
            *[a for s in smbios for a in ("-smbios", s)]]
