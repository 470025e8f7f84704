# -*- test-case-name: tests.agent.test_main -*-
"""The discovery agent program (spec §4): register, report addresses, wipe, set up the BMC.

In the agent initramfs it runs as PID 1 with C{--early-userspace}; in tests it runs as an
ordinary process with C{--no-reboot}, a recorded sysfs tree (C{--sysfs}) and a directory of
files standing in for the disks (C{--dev}).  It is a one-shot program, so it blocks: threads
only for the heartbeat and for wiping disks in parallel.

Exit (with C{--no-reboot}): 0 after a successful run, 1 after a fatal error, which is logged
as one line C{[sidero] fatal: <reason>}.  Without it, the machine reboots in both cases.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.logger import ILogObserver, Logger, formatEvent, globalLogBeginner
from zope.interface import implementer

from sidero.agent import bmc, inventory, network, smbios, wipe
from sidero.agent.client import AgentClient, Heartbeat, RetriesExhausted
from sidero.proto import agent_pb2 as pb

log = Logger()

PREFIX = "[sidero]"
PATH = "/sbin:/bin:/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin"
REBOOT_COUNTDOWN = 10
LINUX_REBOOT_CMD_RESTART = 0x01234567


class FatalError(Exception):
    """Ends the run (reboot, or exit 1 with --no-reboot)."""


@dataclass
class Config:
    endpoint: str
    mac: str
    sysfs: str = "/sys"
    dev: str = "/dev"
    network: bool = True
    bmc: bool = True
    reboot: bool = True
    early_userspace: bool = False
    retry_interval: float | None = None
    retry_timeout: float | None = None
    bmc_lan: tuple[str, int, str, str] | None = None
    resolv_conf: str = "/etc/resolv.conf"


def parse_cmdline(text: str) -> dict[str, str]:
    """C{key=value} words of a kernel command line (later words win)."""
    out: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


def parse_bmc_lan(value: str) -> tuple[str, int, str, str]:
    host, port, user, password = value.split(":", 3)
    return host, int(port), user, password


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidero.agent",
                                description="Sidero discovery agent (spec §4).")
    p.add_argument("--cmdline", default="/proc/cmdline",
                   help="kernel command line file with sidero.endpoint= and sidero.mac=")
    p.add_argument("--endpoint", help="HOST:PORT of the API (overrides sidero.endpoint=)")
    p.add_argument("--mac", help="MAC of the boot NIC (overrides sidero.mac=)")
    p.add_argument("--sysfs", default="/sys", help="sysfs root (SMBIOS tables, block devices)")
    p.add_argument("--dev", default="/dev", help="directory holding the disks' device nodes")
    p.add_argument("--no-network", action="store_true", help="do not configure the boot NIC")
    p.add_argument("--no-bmc", action="store_true", help="never touch the BMC")
    p.add_argument("--no-reboot", action="store_true",
                   help="exit (0 on success, 1 on a fatal error) instead of rebooting")
    p.add_argument("--early-userspace", action="store_true",
                   help="as PID 1: mount /dev, /proc, /sys, /run, /tmp and start udev")
    p.add_argument("--retry-interval", type=float, metavar="S",
                   help="seconds between retries of API calls and DHCP (30 / 10)")
    p.add_argument("--retry-timeout", type=float, metavar="S",
                   help="seconds before API calls and DHCP give up (300)")
    p.add_argument("--bmc-lan", type=parse_bmc_lan, metavar="HOST:PORT:USER:PASSWORD",
                   help="reach the BMC over IPMI LAN instead of /dev/ipmi0")
    return p


def make_config(argv: Sequence[str]) -> Config:
    """Options plus the kernel command line; L{FatalError} when endpoint or MAC is missing."""
    args = build_parser().parse_args(list(argv))
    try:
        with open(args.cmdline) as f:
            cmdline = parse_cmdline(f.read())
    except OSError as e:
        if not (args.endpoint and (args.mac or args.no_network)):
            raise FatalError(f"cannot read {args.cmdline}: {e.strerror}") from e
        cmdline = {}
    endpoint = args.endpoint or cmdline.get("sidero.endpoint", "")
    mac = (args.mac or cmdline.get("sidero.mac", "")).lower()
    if not endpoint:
        raise FatalError("no sidero.endpoint= on the kernel command line (or --endpoint)")
    if not mac and not args.no_network:
        raise FatalError("no sidero.mac= on the kernel command line (or --mac)")
    return Config(
        endpoint=endpoint, mac=mac, sysfs=args.sysfs, dev=args.dev,
        network=not args.no_network, bmc=not args.no_bmc, reboot=not args.no_reboot,
        early_userspace=args.early_userspace, retry_interval=args.retry_interval,
        retry_timeout=args.retry_timeout, bmc_lan=args.bmc_lan,
    )


# --- early userspace (PID 1 only) ---------------------------------------------------------------

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), flags,
                     data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def early_userspace() -> None:
    """Step 2: the directories and pseudo file systems an initramfs /init must provide."""
    for d in ("/etc", "/dev", "/proc", "/run", "/sys", "/tmp"):
        os.makedirs(d, exist_ok=True)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV)
    mount("sysfs", "/sys", "sysfs")
    mount("tmpfs", "/run", "tmpfs")
    mount("tmpfs", "/tmp", "tmpfs")
    os.environ["PATH"] = PATH


def start_udev() -> None:
    """Step 3, when the image has udev: populate /dev and load drivers, then settle."""
    udevd = shutil.which("systemd-udevd") or ("/lib/systemd/systemd-udevd"
                                              if os.path.exists("/lib/systemd/systemd-udevd")
                                              else None)
    if udevd is None or shutil.which("udevadm") is None:
        log.warn("udev is not in this image; devices are what devtmpfs shows")
        return
    subprocess.run(["udevadm", "hwdb", "--update"], check=False)
    subprocess.Popen([udevd, "--resolve-names=never"])
    deadline = time.monotonic() + 60
    while not os.path.exists("/run/udev/control") and time.monotonic() < deadline:
        time.sleep(0.1)
    while time.monotonic() < deadline + 60:
        if subprocess.run(["udevadm", "control", "--start-exec-queue"]).returncode == 0:
            break
        time.sleep(1)
    for kind in ("devices", "subsystems"):
        subprocess.run(["udevadm", "trigger", f"--type={kind}", "--action=add"], check=False)
    subprocess.run(["udevadm", "settle", "--timeout=50"], check=False)


def read_module_list(path: str = "/etc/modules") -> list[str]:
    """Module names of a Debian C{/etc/modules} file (one per line, C{#} comments)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    names = []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words:
            names.append(words[0])
    return names


def load_modules(path: str = "/etc/modules",
                 run: Callable[..., Any] = subprocess.run) -> list[str]:
    """Load the modules no device asks for (the agent image lists C{ipmi_devintf}, which
    makes C{/dev/ipmi0} for the BMC set-up); a module that does not load is only logged.
    Returns the names tried."""
    names = read_module_list(path)
    if not names or shutil.which("modprobe") is None:
        return []
    for name in names:
        result = run(["modprobe", "-q", name], check=False)
        if result.returncode != 0:
            log.info("module {name} not loaded (modprobe exit {code})", name=name,
                     code=result.returncode)
    return names


# --- the flow -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a run did (for tests and the last log lines)."""

    uuid: str = ""
    registered: bool = False
    wiped: dict[str, str] | None = None
    bmc_configured: bool = False


class Agent:
    """Steps 4-10 with their collaborators injectable (tests fake the client or the BMC)."""

    def __init__(
        self, config: Config, *, client: AgentClient | None = None,
        bmc_link: Callable[[], bmc.IPMILink] | None = None,
        interfaces: Callable[[], list[inventory.Interface]] = inventory.list_interfaces,
    ) -> None:
        self.config = config
        self._client = client
        self._bmc_link = bmc_link
        self.interfaces = interfaces

    def retry_kwargs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.config.retry_interval is not None:
            out["retry_interval"] = self.config.retry_interval
            out["call_timeout"] = max(self.config.retry_interval, 1.0)
        if self.config.retry_timeout is not None:
            out["retry_timeout"] = self.config.retry_timeout
        return out

    @property
    def client(self) -> AgentClient:
        if self._client is None:
            self._client = AgentClient.connect(self.config.endpoint, **self.retry_kwargs())
        return self._client

    def setup_network(self) -> None:
        c = self.config
        dhcp: dict[str, float] = {}
        if c.retry_interval is not None:
            dhcp["retry_interval"] = c.retry_interval
            dhcp["attempt_timeout"] = max(min(30.0, c.retry_interval * 3), 1.0)
            dhcp["retransmit"] = max(min(4.0, c.retry_interval), 0.5)
        if c.retry_timeout is not None:
            dhcp["overall_timeout"] = c.retry_timeout
        try:
            network.configure(c.mac, resolv_conf=c.resolv_conf, dhcp=dhcp)
        except (network.DHCPError, network.InterfaceNotFound, OSError) as e:
            raise FatalError(f"network setup failed: {e}") from e

    def read_smbios(self) -> smbios.SMBIOS | None:
        info, error = smbios.read_with_fallback(self.config.sysfs)
        if error:
            log.warn("SMBIOS table is malformed ({error}); using class/dmi/id", error=error)
        if info is None:
            log.warn("no SMBIOS information: only storage is reported")
        else:
            if info.baseboard is not None:
                b = info.baseboard
                # The API has no field for the baseboard; the log keeps it.
                log.info("baseboard: {manufacturer} {product} {version} serial {serial} "
                         "asset {asset}", manufacturer=b.manufacturer, product=b.product,
                         version=b.version, serial=b.serial_number, asset=b.asset_tag)
        return info

    def run(self) -> Outcome:
        c = self.config
        outcome = Outcome()
        if c.network:
            self.setup_network()
        info = self.read_smbios()
        outcome.uuid = uuid = info.system.uuid if info and info.system else ""
        disks = inventory.list_disks(c.sysfs)
        try:
            interfaces = self.interfaces()
        except Exception as e:
            log.warn("cannot enumerate interfaces: {error}", error=e)
            interfaces = []
        hardware = inventory.build_hardware(info, disks, interfaces)
        hostname = socket.gethostname()
        log.info("registering {uuid} ({disks} disks, hostname {hostname}) with {endpoint}",
                 uuid=uuid, disks=len(disks), hostname=hostname, endpoint=c.endpoint)
        try:
            response = self.client.create_server(hardware, hostname)
        except RetriesExhausted as e:
            raise FatalError(str(e)) from e
        outcome.registered = True
        log.info("registered: wipe={wipe} insecure={insecure} setup_bmc={bmc} "
                 "reboot_timeout={timeout}", wipe=response.wipe,
                 insecure=response.insecure_wipe, bmc=response.setup_bmc,
                 timeout=response.reboot_timeout)

        addresses = inventory.reportable_addresses(interfaces)
        try:
            self.client.reconcile_addresses(uuid, addresses)
        except RetriesExhausted as e:
            raise FatalError(str(e)) from e

        if response.wipe:
            outcome.wiped = self.wipe(uuid, disks, response)
        if response.setup_bmc and c.bmc:
            outcome.bmc_configured = self.setup_bmc(uuid)
        return outcome

    def wipe(self, uuid: str, disks: list[inventory.Disk],
             response: pb.CreateServerResponse) -> dict[str, str]:
        interval = response.reboot_timeout / 3 if response.reboot_timeout > 0 else 30.0
        heartbeat = Heartbeat(self.client, uuid, interval).start()
        try:
            targets = [wipe.Target(d.name, os.path.join(self.config.dev, d.name), d.read_only)
                       for d in disks]
            try:
                results = wipe.wipe_all(targets, response.insecure_wipe)
            except wipe.WipeError as e:
                raise FatalError(str(e)) from e
            try:
                self.client.mark_wiped(uuid)
            except RetriesExhausted as e:
                raise FatalError(str(e)) from e
            log.info("disks wiped: {results}", results=results)
            return results
        finally:
            heartbeat.stop()

    def setup_bmc(self, uuid: str) -> bool:
        """Step 10; every failure is logged and the run goes on."""
        try:
            link = self._bmc_link() if self._bmc_link else self.default_bmc_link()
        except Exception as e:
            log.warn("BMC not reachable: {error}", error=e)
            return False
        try:
            try:
                address = bmc.read_address(link)
            except bmc.IPMIError as e:
                log.warn("cannot read the BMC address: {error}", error=e)
                return False
            self.client.update_bmc_info(uuid, pb.BMCInfo(ip=address.ip, port=address.port))
            _uid, password = bmc.setup_user(link)
            credentials = pb.BMCInfo(user=bmc.USER_NAME)
            setattr(credentials, "pass", password)  # a Python keyword, so no keyword argument
            self.client.update_bmc_info(uuid, credentials)
            log.info("BMC {ip} set up with user {user}", ip=address.ip, user=bmc.USER_NAME)
            return True
        except (bmc.IPMIError, RetriesExhausted) as e:
            log.warn("BMC setup failed: {error}", error=e)
            return False
        finally:
            close = getattr(link, "close", None)
            if callable(close):
                close()

    def default_bmc_link(self) -> bmc.IPMILink:
        if self.config.bmc_lan is not None:
            host, port, user, password = self.config.bmc_lan
            return bmc.PyghmiLink.lan(host, port, user, password)
        return bmc.PyghmiLink.local()


# --- logging and the end of the run -------------------------------------------------------------

@implementer(ILogObserver)
class LineObserver:
    """Twisted log events as C{[sidero] <text>} lines on stderr (and /dev/kmsg as PID 1)."""

    def __init__(self, stream: IO[str], kmsg: IO[bytes] | None = None) -> None:
        self.stream = stream
        self.kmsg = kmsg

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}"
        line = f"{PREFIX} {text}"
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass
        if self.kmsg is not None:
            try:
                self.kmsg.write(line.encode("utf-8", "replace")[:1000] + b"\n")
            except OSError:
                pass


def reboot() -> None:
    os.sync()
    if _libc().reboot(LINUX_REBOOT_CMD_RESTART) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"reboot: {os.strerror(err)}")


def main(argv: Sequence[str] | None = None) -> int:
    pid1 = os.getpid() == 1
    argv = sys.argv[1:] if argv is None else argv
    early = "--early-userspace" in argv
    if early and pid1:
        early_userspace()
    kmsg: IO[bytes] | None = None
    if pid1:
        try:
            kmsg = open("/dev/kmsg", "wb", buffering=0)
        except OSError:
            kmsg = None
    globalLogBeginner.beginLoggingTo([LineObserver(sys.stderr, kmsg)],
                                     redirectStandardIO=False, discardBuffer=True)
    if early and pid1:
        start_udev()
        load_modules()
    config: Config | None = None
    error: str | None = None
    try:
        config = make_config(argv)
        outcome = Agent(config).run()
        log.info("done: {uuid} registered={registered} wiped={wiped} bmc={bmc}",
                 uuid=outcome.uuid, registered=outcome.registered, wiped=outcome.wiped,
                 bmc=outcome.bmc_configured)
    except FatalError as e:
        error = str(e)
    except Exception as e:  # a bug: still one clear line, and still the reboot
        error = f"unexpected {type(e).__name__}: {e}"
    if error is not None:
        log.error("fatal: {error}", error=error)
    if config is not None and not config.reboot:
        return 1 if error else 0
    if config is None and "--no-reboot" in argv:
        return 1
    for remaining in range(REBOOT_COUNTDOWN, 0, -1):
        log.info("rebooting in {n} seconds", n=remaining)
        time.sleep(1)
    try:
        reboot()
    except OSError as e:
        log.error("reboot failed: {error}", error=e)
    return 1
