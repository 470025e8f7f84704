"""Pieces of the Server lifecycle end-to-end test: the real service, machines, BMCs, power API.

Everything here talks to the real C{twistd sidero} over its real interfaces, on loopback only:

  - L{SideroProcess}: the whole service (embedded store) as a child process, with the
    management CLI (a real C{sidero} subprocess) and the management API client.
  - L{Machine}: what a bare-metal machine does when it PXE-boots the agent.  It runs the real
    agent (C{python -m sidero.agent}) when this tree has one, else the same RPC sequence
    through the generated gRPC client on the real API port (L{agent_available}).
  - L{LoopbackBMC}: OpenIPMI's ipmi_sim as the machine's BMC, on its own loopback address and
    the standard port 623 (the agent's UpdateBMCInfo resets the port to 623, spec 3.7 quirk).
  - L{PowerAPI}: the simple HTTP power API of spec 3.12, served by the test for one machine;
    a power-on or reboot with "PXE boot once" set boots that machine's agent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sidero.agent.proto import agent_pb2 as pb
from sidero.agent.proto import agent_pb2_grpc as pb_grpc
from sidero.api.registry import SERVER_CLASS, ResourceType
from sidero.management.client import ManagementClient
from tests.power.test_ipmi_sim import BMC_EMU, CHASSIS_CONTROL, LAN_CONF

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT_MAIN = os.path.join(REPO, "sidero", "agent", "__main__.py")


def agent_available() -> bool:
    """Whether this tree has the real agent (C{python -m sidero.agent})."""
    return os.path.isfile(AGENT_MAIN)


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
            "--disable-dhcp-proxy", "--disable-tftp",
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
            [sys.executable, os.path.join(REPO, "tests", "integration", "run_sidero.py"), *self.args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=REPO), cwd=self.work,
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
            env=dict(os.environ, PYTHONPATH=REPO),
        )

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    out.append(event)
        return out

    def get(self, kind: ResourceType, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.client.get(kind, name, namespace)

    def items(self, kind: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]:
        return list(self.client.list(kind, namespace).get("items") or [])


# --- machines ------------------------------------------------------------------------------------


@dataclass
class AgentRun:
    """What one agent boot saw and did."""

    response: pb.CreateServerResponse
    wiped: bool
    output: str = ""


@dataclass
class Machine:
    """A bare-metal machine: SMBIOS identity, a disk (a file the agent wipes) and a NIC."""

    uuid: str
    hostname: str
    index: int
    work: str
    runs: list[AgentRun] = field(default_factory=list)

    @property
    def disk(self) -> str:
        return os.path.join(self.work, "disk.img")

    def make_disk(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        with open(self.disk, "wb") as f:
            f.write(b"\xa5" * (4 << 20))  # 4 MiB of "old data"

    def disk_head_is_zero(self) -> bool:
        with open(self.disk, "rb") as f:
            return f.read(1 << 20) == bytes(1 << 20)

    def create_request(self) -> pb.CreateServerRequest:
        hw = pb.HardwareInformation()
        hw.system.uuid = self.uuid
        hw.system.manufacturer = "Sidero Test"
        hw.system.product_name = "Lifecycle Box"
        hw.system.serial_number = f"LC-{self.index:04d}"
        hw.system.family = "test"
        hw.compute.total_core_count = 4
        hw.compute.total_thread_count = 8
        hw.compute.processor_count = 1
        cpu = hw.compute.processors.add()
        cpu.manufacturer = "QEMU"
        cpu.product_name = "Virtual CPU"
        cpu.speed = 2000
        cpu.core_count = 4
        cpu.thread_count = 8
        hw.memory.total_size = 8192
        hw.memory.module_count = 1
        dimm = hw.memory.modules.add()
        dimm.manufacturer = "QEMU"
        dimm.type = "DDR4"
        dimm.size = 8192
        dimm.speed = 3200
        hw.storage.total_size = 4 << 20
        hw.storage.device_count = 1
        dev = hw.storage.devices.add()
        dev.type = pb.SSD
        dev.size = 4 << 20
        dev.model = "Lifecycle Disk"
        dev.serial = f"DISK-{self.index:04d}"
        dev.device_name = "/dev/sda"
        dev.name = "sda"
        hw.network.interface_count = 1
        nic = hw.network.interfaces.add()
        nic.index = 2
        nic.name = "eth0"
        nic.flags = "up|broadcast|multicast|running"
        nic.mtu = 1500
        nic.mac = self.mac
        nic.addresses.append(self.address + "/24")
        return pb.CreateServerRequest(hardware=hw, hostname=self.hostname)

    @property
    def mac(self) -> str:
        return f"52:54:00:00:{self.index // 256:02x}:{self.index % 256:02x}"

    @property
    def address(self) -> str:
        # Only ever a string in the Server's status (TEST-NET-1 documentation range): no
        # packet goes to it.
        return f"192.0.2.{self.index % 250 + 1}"


def _retry(call: Callable[[], Any], deadline: float, what: str) -> Any:
    """The agent retries each RPC until its deadline (30 s / 5 min in Sidero; short here)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return call()
        except grpc.RpcError as e:
            last = e
            time.sleep(0.3)
    raise AssertionError(f"{what} kept failing: {last}")


def grpc_agent_boot(machine: Machine, endpoint: str, timeout: float = 30.0) -> AgentRun:
    """The agent's RPC sequence (spec 4 steps 7-9) through the generated client; blocking.

    Used while the tree has no real agent: the RPCs are the agent's, only the hardware
    discovery and the disk wipe are done here (the "disk" is the machine's image file).
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.AgentStub(channel)
        response = _retry(lambda: stub.CreateServer(machine.create_request(), timeout=10),
                          deadline, "CreateServer")
        address = pb.Address(type="InternalIP", address=machine.address)
        _retry(lambda: stub.ReconcileServerAddresses(
            pb.ReconcileServerAddressesRequest(uuid=machine.uuid, address=[address]), timeout=10),
            deadline, "ReconcileServerAddresses")
        wiped = False
        if response.wipe:
            _retry(lambda: stub.Heartbeat(pb.HeartbeatRequest(uuid=machine.uuid), timeout=10),
                   deadline, "Heartbeat")
            with open(machine.disk, "r+b") as f:  # insecure wipe: first and last MiB
                f.write(bytes(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                f.write(bytes(1 << 20))
            _retry(lambda: stub.MarkServerAsWiped(
                pb.MarkServerAsWipedRequest(uuid=machine.uuid), timeout=10),
                deadline, "MarkServerAsWiped")
            wiped = True
    run = AgentRun(response=response, wiped=wiped)
    machine.runs.append(run)
    return run


def boot_agent(machine: Machine, endpoint: str) -> Deferred[AgentRun]:
    """One PXE boot of the agent on C{machine} (in a thread: gRPC calls block)."""
    return deferToThread(grpc_agent_boot, machine, endpoint)


def update_bmc_info(endpoint: str, uuid: str, ip: str = "", port: int = 0, user: str = "",
                    password: str = "") -> None:
    """UpdateBMCInfo as the agent sends it (spec 4 step 10); blocking."""
    info = pb.BMCInfo(ip=ip, port=port, user=user)
    setattr(info, "pass", password)
    with grpc.insecure_channel(endpoint) as channel:
        pb_grpc.AgentStub(channel).UpdateBMCInfo(pb.UpdateBMCInfoRequest(uuid=uuid, bmc_info=info),
                                                 timeout=10)


# --- a BMC on its own loopback address -----------------------------------------------------------


class LoopbackBMC:
    """ipmi_sim listening on C{host}:623, with the power/boot state in files."""

    PORT = 623

    def __init__(self, directory: str, user: str = "admin", password: str = "secret") -> None:
        self.dir = os.path.abspath(directory)
        self.state = os.path.join(self.dir, "chassis")
        self.user = user
        self.password = password
        # A private loopback address per run: port 623 is the BMC port, parallel runs differ.
        self.host = f"127.62.{random.randint(1, 254)}.{random.randint(1, 254)}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Blocking: write the files, start ipmi_sim, wait until ipmitool gets an answer."""
        os.makedirs(self.state, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "simstate"), exist_ok=True)
        script = os.path.join(self.dir, "chassis_control.sh")
        with open(script, "w") as f:
            f.write(CHASSIS_CONTROL.format(state=self.state))
        os.chmod(script, 0o755)
        with open(os.path.join(self.dir, "bmc.emu"), "w") as f:
            f.write(BMC_EMU)
        conf = LAN_CONF.replace("addr 127.0.0.1 {port}", "addr {host} {port}")
        with open(os.path.join(self.dir, "lan.conf"), "w") as f:
            f.write(conf.format(host=self.host, port=self.PORT, script=script, user=self.user,
                                password=self.password))
        log = open(os.path.join(self.dir, "ipmi_sim.log"), "ab")
        self.process = subprocess.Popen(
            ["ipmi_sim", "-c", "lan.conf", "-f", "bmc.emu", "-s", "simstate", "-n"],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.ipmitool("mc", "info", timeout=3).returncode == 0:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ipmi_sim did not come up on {self.host}:{self.PORT}; "
                           f"see {self.dir}/ipmi_sim.log")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def ipmitool(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ipmitool", "-I", "lanplus", "-C", "3", "-H", self.host, "-p", str(self.PORT),
             "-U", self.user, "-P", self.password, *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.state, name)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def log(self) -> list[str]:
        return (self.read("log") or "").splitlines()


# --- the HTTP power API of one machine -----------------------------------------------------------


class PowerAPI(Resource):
    """Spec 3.12's VM power API for one L{Machine}; booting with "PXE once" runs its agent.

    The agent reboots when it is done; the reboot is a boot from disk (the PXE flag was used
    up), so nothing more happens until the controller powers the machine off.
    """

    isLeaf = True

    def __init__(self, machine: Machine, sidero_endpoint: str, powered: bool) -> None:
        super().__init__()
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
        self.agent_boots += 1
        d = boot_agent(self.machine, self.sidero_endpoint)

        def done(result: Any) -> None:
            self._booting = None
            if not isinstance(result, AgentRun):
                self.errors.append(str(result))

        self._booting = d.addBoth(done)

    def idle(self) -> Deferred[Any] | None:
        return self._booting


def serve_power_api(reactor: Any, api: PowerAPI) -> Any:
    """Listen on a loopback ephemeral port; returns the listening port."""
    site = Site(api)
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1")
