"""Pieces of the Server lifecycle end-to-end test: the real service, machines, BMCs, power API.

Everything here talks to the real C{twistd sidero} over its real interfaces, on loopback only:

  - L{SideroProcess}: the whole service (embedded store) as a child process, with the
    management CLI (a real C{sidero} subprocess) and the management API client.
  - L{Machine}: a bare-metal machine's SMBIOS tables, sysfs and disk; L{run_agent} is its PXE
    boot: the real agent (C{python -m sidero.agent}) registering, wiping and exiting.
  - L{LoopbackBMC}: OpenIPMI's ipmi_sim as the machine's BMC, on its own loopback address and
    the standard port 623 (the agent's UpdateBMCInfo resets the port to 623, spec 3.7 quirk).
  - L{PowerAPI}: the simple HTTP power API of spec 3.12, served by the test for one machine;
    a power-on or reboot with "PXE boot once" set boots that machine's agent.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

import grpc
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sidero.api.registry import SERVER_CLASS, ResourceType
from sidero.management.client import ManagementClient
from sidero.proto import agent_pb2 as pb
from sidero.proto import agent_pb2_grpc as pb_grpc
from tests.agent.trees import BlockDev, make_dev, make_sysfs
from tests.paths import REPO, RUN_SIDERO, json_log_lines, tree_env
from tests.ports import free_tcp_port
from tests.power.test_ipmi_sim import SimulatedBMC


def tail(path: str, lines: int = 60) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(missing)"


# --- the service ---------------------------------------------------------------------------------


class SideroProcess:
    """C{twistd sidero} on loopback with the embedded store; L{stop} is idempotent."""

    def __init__(self, work: str, *extra: str, reboot_timeout: str = "6s") -> None:
        self.work = work
        self.state = os.path.join(work, "state")
        self.log_path = os.path.join(work, "sidero.log")
        # trial's temporary paths can be longer than a unix socket path may be.
        self.socket_dir = tempfile.mkdtemp(prefix="sd-lc-")
        self.socket = os.path.join(self.socket_dir, "m.sock")
        self.port = free_tcp_port()
        self.args = [
            "--store", "embedded", "--state-dir", self.state,
            "--api-endpoint", "127.0.0.1", "--listen-address", "127.0.0.1",
            "--api-port", str(self.port), "--http-port", str(self.port),
            "--disable-dhcp-proxy", "--disable-tftp", "--disable-siderolink", "--disable-syslog",
            "--metrics-port", str(free_tcp_port()), "--health-port", str(free_tcp_port()),
            "--dashboard-port", str(free_tcp_port()),
            "--talos-assets-url", "http://127.0.0.1:1",
            "--no-enable-leader-election", "--server-reboot-timeout", reboot_timeout,
            "--management-socket", self.socket, "--log-format", "json", *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.client = ManagementClient(self.socket, timeout=10)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(RUN_SIDERO), *self.args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=tree_env(), cwd=self.work,
        )
        log.close()

    def ready(self) -> bool:
        """The HTTP port answers /readyz and the management socket lists ServerClasses."""
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"sidero exited ({self.exit_status()}):\n{tail(self.log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                if b" 200 " not in s.recv(200):
                    return False
            self.client.list(SERVER_CLASS)
        except Exception:
            return False
        return True

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: nothing is flushed or closed) and reap it."""
        proc, self.process = self.process, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def log(self) -> str:
        return tail(self.log_path, 200)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The management CLI as a user runs it (a separate process)."""
        return subprocess.run(
            [sys.executable, "-m", "sidero.management.cli", "--socket", self.socket, *args],
            input=stdin, capture_output=True, text=True, timeout=30, cwd=REPO,
            env=tree_env(),
        )

    def log_events(self) -> list[dict[str, Any]]:
        return json_log_lines(self.log_path)

    def get(self, kind: ResourceType, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.client.get(kind, name, namespace)

    def items(self, kind: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]:
        return list(self.client.list(kind, namespace).get("items") or [])


# --- machines ------------------------------------------------------------------------------------

#: The recorded SMBIOS tables every simulated machine starts from (tests/agent/data).
DMI_RECORDING = "qemu-pc"
DISK_SECTORS = 8192  # 4 MiB
AGENT_TIMEOUT = 60.0


def set_smbios_uuid(table: bytes, uuid: str) -> bytes:
    """The SMBIOS structure table with the System Information (type 1) UUID replaced.

    Each structure is a formatted area (type, length, handle, fields) followed by its strings,
    which end with a double NUL; the UUID is at offset 8 of type 1, its first three fields
    little-endian (SMBIOS 2.6+), which is exactly C{UUID.bytes_le}.
    """
    data = bytearray(table)
    offset = 0
    while offset + 4 <= len(data):
        kind, length = data[offset], data[offset + 1]
        if kind == 1 and length >= 0x19:
            data[offset + 8:offset + 24] = uuidlib.UUID(uuid).bytes_le
            return bytes(data)
        if kind == 127:
            break
        end = data.find(b"\0\0", offset + length)
        if end < 0:
            break
        offset = end + 2
    raise ValueError("no System Information structure in the SMBIOS table")


@dataclass
class AgentRun:
    """What one agent boot was told (from its log) and printed."""

    wipe: bool
    insecure_wipe: bool
    setup_bmc: bool
    reboot_timeout: float
    output: str = ""

    @property
    def wiped(self) -> bool:
        return "disks wiped:" in self.output


@dataclass
class Machine:
    """A bare-metal machine: recorded SMBIOS tables with its own UUID, one disk (a file under
    C{dev/}) and a sysfs tree saying so; the real agent reads exactly these."""

    uuid: str
    index: int
    work: str
    runs: list[AgentRun] = field(default_factory=list)

    @property
    def sysfs(self) -> str:
        return os.path.join(self.work, "sys")

    @property
    def disk(self) -> str:
        return os.path.join(self.work, "dev", "sda")

    def make(self) -> None:
        """Write the sysfs tree and the disk full of "old data"."""
        disk = BlockDev("sda", DISK_SECTORS, "0", attrs={
            "device/model": "Lifecycle Disk", "device/serial": f"DISK-{self.index:04d}"})
        make_sysfs(self.sysfs, DMI_RECORDING, (disk,))
        tables = os.path.join(self.sysfs, "firmware", "dmi", "tables", "DMI")
        with open(tables, "rb") as f:
            table = f.read()
        with open(tables, "wb") as f:
            f.write(set_smbios_uuid(table, self.uuid))
        with open(os.path.join(self.sysfs, "class", "dmi", "id", "product_uuid"), "w") as f:
            f.write(self.uuid + "\n")
        make_dev(os.path.join(self.work, "dev"), (disk,), fill=b"\xa5")

    def disk_head_is_zero(self) -> bool:
        with open(self.disk, "rb") as f:
            return f.read(1 << 20) == bytes(1 << 20)

    def disk_is_untouched(self) -> bool:
        with open(self.disk, "rb") as f:
            return f.read() == b"\xa5" * (DISK_SECTORS * 512)


_REGISTERED = re.compile(
    r"registered: wipe=(True|False) insecure=(True|False) setup_bmc=(True|False) "
    r"reboot_timeout=([0-9.]+)")


def run_agent(machine: Machine, endpoint: str, retry_timeout: float = 30.0) -> AgentRun:
    """One PXE boot of C{machine}: the real agent (C{python -m sidero.agent}); blocking.

    No network set-up (the endpoint is on loopback), no BMC, and exit instead of rebooting.
    The kernel command line carries the endpoint, as iPXE passes it.
    """
    cmdline = os.path.join(machine.work, "cmdline")
    with open(cmdline, "w") as f:
        f.write(f"console=ttyS0 sidero.endpoint={endpoint} sidero.mac=52:54:00:00:00:{machine.index:02x}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sidero.agent", "--cmdline", cmdline, "--sysfs", machine.sysfs,
         "--dev", os.path.join(machine.work, "dev"), "--no-network", "--no-bmc", "--no-reboot",
         "--retry-interval", "0.5", "--retry-timeout", str(retry_timeout)],
        capture_output=True, text=True, timeout=AGENT_TIMEOUT + 2 * max(0.0, retry_timeout - 30.0), stdin=subprocess.DEVNULL,
        cwd=REPO, env=tree_env(),
    )
    output = proc.stdout + proc.stderr
    with open(os.path.join(machine.work, "agent.log"), "a") as f:
        f.write(output + f"--- exit status {proc.returncode}\n")
    if proc.returncode != 0:
        raise AssertionError(f"the agent of {machine.uuid} failed ({proc.returncode}):\n{output}")
    found = _REGISTERED.search(output)
    if found is None:
        raise AssertionError(f"the agent of {machine.uuid} did not say what it was told:\n{output}")
    run = AgentRun(wipe=found[1] == "True", insecure_wipe=found[2] == "True",
                   setup_bmc=found[3] == "True", reboot_timeout=float(found[4]), output=output)
    machine.runs.append(run)
    return run


def boot_agent(machine: Machine, endpoint: str) -> Deferred[AgentRun]:
    """L{run_agent} in a thread."""
    return deferToThread(run_agent, machine, endpoint)


def update_bmc_info(endpoint: str, uuid: str, ip: str = "", port: int = 0, user: str = "",
                    password: str = "") -> None:
    """UpdateBMCInfo as the agent sends it (spec 4 step 10); blocking."""
    info = pb.BMCInfo(ip=ip, port=port, user=user)
    setattr(info, "pass", password)
    with grpc.insecure_channel(endpoint) as channel:
        pb_grpc.AgentStub(channel).UpdateBMCInfo(pb.UpdateBMCInfoRequest(uuid=uuid, bmc_info=info),
                                                 timeout=10)


# --- a BMC on its own loopback address -----------------------------------------------------------


class LoopbackBMC(SimulatedBMC):
    """ipmi_sim listening on C{host}:623 (the port the agent's UpdateBMCInfo always reports),
    on a private loopback address per run so parallel runs differ."""

    PORT = 623

    def __init__(self, directory: str, user: str = "admin", password: str = "secret") -> None:
        host = f"127.62.{random.randint(1, 254)}.{random.randint(1, 254)}"
        super().__init__(directory, user, password, host=host, port=self.PORT)


# --- the HTTP power API of one machine -----------------------------------------------------------


class PowerAPI(Resource):
    """Spec 3.12's VM power API for one L{Machine}; booting with "PXE once" runs its agent.

    The agent reboots when it is done; the reboot is a boot from disk (the PXE flag was used
    up), so nothing more happens until the controller powers the machine off.
    """

    isLeaf = True

    def __init__(self, machine: Machine, sidero_endpoint: str, powered: bool,
                 follow_ipxe: bool = False) -> None:
        super().__init__()
        #: ask sidero's /ipxe what a PXE boot runs, as the firmware's chain script does: the
        #: agent environment runs the agent, a Talos environment fetches its talos.config URL
        #: (recorded in L{talos_configs}); otherwise every PXE boot runs the agent.
        self.follow_ipxe = follow_ipxe
        self.talos_configs: list[tuple[int, bytes]] = []
        self.machine = machine
        self.sidero_endpoint = sidero_endpoint
        self.powered = powered
        self.endpoint = ""  # host:port once served (serve_power_api)
        self.pxe_once = False
        self.requests: list[str] = []
        self.agent_boots = 0
        self.errors: list[str] = []
        self._booting: Deferred[Any] | None = None

    def render_GET(self, request: Request) -> bytes:
        if request.path != b"/status":
            request.setResponseCode(404)
            return b"not found"
        self.requests.append("status")
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"PoweredOn": self.powered}).encode()

    def render_POST(self, request: Request) -> bytes:
        op = request.path.decode().lstrip("/")
        self.requests.append(op)
        if op == "poweron":
            if not self.powered:
                self.powered = True
                self._boot()
        elif op == "poweroff":
            self.powered = False
        elif op == "reboot":
            self.powered = True
            self._boot()
        elif op == "pxeboot":
            self.pxe_once = True
        else:
            request.setResponseCode(404)
            return b"not found"
        return b"{}"

    def _boot(self) -> None:
        if not self.pxe_once:
            return  # boots from its (wiped or not) disk: nothing sidero sees
        self.pxe_once = False
        if self._booting is not None:
            return  # the agent is already running; a real reset would restart it, same effect
        d = deferToThread(self._pxe_boot)

        def done(result: Any) -> None:
            self._booting = None
            if not isinstance(result, AgentRun | bytes):
                self.errors.append(str(result))

        self._booting = d.addBoth(done)

    def _pxe_boot(self) -> AgentRun | bytes:
        """One network boot (blocking, in a thread)."""
        if self.follow_ipxe:
            mac = f"52-54-00-00-00-{self.machine.index:02x}"
            url = f"http://{self.sidero_endpoint}/ipxe?uuid={self.machine.uuid}&mac={mac}&arch=x86_64"
            with urllib.request.urlopen(url, timeout=10) as response:
                script = response.read()
            if b"/env/agent-" not in script:
                found = re.search(rb"talos\.config=(\S+)", script)
                if found is None:
                    raise AssertionError(f"/ipxe answered neither the agent nor Talos: {script!r}")
                # Talos fills in an empty uuid= with its SMBIOS UUID (spec 8).
                config_url = found[1].decode()
                if config_url.endswith("uuid="):
                    config_url += self.machine.uuid
                try:
                    with urllib.request.urlopen(config_url, timeout=10) as response:
                        self.talos_configs.append((response.status, response.read()))
                except urllib.error.HTTPError as e:
                    self.talos_configs.append((e.code, e.read()))
                return script
        self.agent_boots += 1
        return run_agent(self.machine, self.sidero_endpoint)

    def idle(self) -> Deferred[Any] | None:
        return self._booting


def serve_talos_assets(reactor: Any) -> tuple[Any, str]:
    """A tiny Talos release mirror on loopback (an Environment's kernel and initrd URLs point
    at it); returns the listening port and its base URL."""
    from twisted.web.static import Data

    root = Resource()
    root.putChild(b"vmlinuz", Data(b"kernel" * 100, "application/octet-stream"))
    root.putChild(b"initramfs.xz", Data(b"initrd" * 100, "application/octet-stream"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


def talos_environment(name: str, base_url: str) -> dict[str, Any]:
    """An Environment serving the assets of L{serve_talos_assets}."""
    return {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Environment", "metadata": {"name": name},
            "spec": {"kernel": {"url": f"{base_url}/vmlinuz", "args": ["console=ttyS0"]},
                     "initrd": {"url": f"{base_url}/initramfs.xz"}}}


def serve_power_api(reactor: Any, api: PowerAPI) -> Any:
    """Listen on a loopback ephemeral port; returns the listening port."""
    site = Site(api)
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1")
