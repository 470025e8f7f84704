"""Our IPMI manager against a real simulated BMC: OpenIPMI's ipmi_sim on a loopback UDP port.

ipmi_sim runs a chassis_control script for every power/boot request; ours keeps the state in
files, so each test can check what the "hardware" was told.  ipmitool (with C{-C 3}, see
REAL-CLIENTS §4) reads the same BMC as an independent client.  Needs the openipmi and
ipmitool packages; each test skips with a loud reason when they are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from sidero.power.interfaces import BMCConnectionError
from sidero.power.ipmi import (
    POOL_MAX_THREADS,
    BMCEndpoint,
    IPMIExecutor,
    IPMIPowerManager,
    make_endpoint,
)
from sidero.threads import CallTimeout, ThreadPoolService
from tests.ports import free_udp_port

reactor: Any = global_reactor

CHASSIS_CONTROL = """#!/bin/sh
# ipmi_sim calls: <prog> <mc> get power|boot ...  or  <prog> <mc> set power 1|0 | reset 1 | boot pxe|default
D="{state}"
echo "$*" >> "$D/log"
shift
op=$1; shift
if [ "$op" = get ]; then
  for w in "$@"; do
    case $w in
      power) echo "power:$(cat "$D/power" 2>/dev/null || echo 0)";;
      boot) echo "boot:$(cat "$D/boot" 2>/dev/null || echo default)";;
    esac
  done
else
  while [ $# -gt 1 ]; do
    case $1 in
      power) echo "$2" > "$D/power";;
      reset) echo reset >> "$D/resets";;
      boot) echo "$2" > "$D/boot";;
    esac
    shift 2
  done
fi
"""

LAN_CONF = """name "sidero-test-bmc"
set_working_mc 0x20
  startlan 1
    addr {host} {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
{lan_extra}  endlan
  chassis_control "{script} 0x20"
{mc_extra}  user 2 true  "{user}" "{password}" admin  10 none md2 md5 straight
"""

BMC_EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


class SimulatedBMC:
    """One ipmi_sim process with its config, chassis_control script and state files.

    @param host: the loopback address it listens on.
    @param port: its UDP port; 0 picks a free one (retried if taken before ipmi_sim binds).
    @param chassis_control: a command to run for chassis requests instead of the state-file
        script (it gets C{0x20 get|set ...} appended).
    @param lan_extra: more lines of the C{startlan} section; C{mc_extra}: of the MC.
    @param netns: run ipmi_sim (and L{ipmitool}) in this network namespace.
    """

    def __init__(self, directory: str, user: str = "admin", password: str = "secret",
                 host: str = "127.0.0.1", port: int = 0, *, chassis_control: str | None = None,
                 lan_extra: Sequence[str] = (), mc_extra: Sequence[str] = (),
                 netns: str | None = None) -> None:
        self.chassis_control = chassis_control
        self.lan_extra = "".join(f"    {line}\n" for line in lan_extra)
        self.mc_extra = "".join(f"  {line}\n" for line in mc_extra)
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.dir = os.path.abspath(directory)
        self.state = os.path.join(self.dir, "chassis")
        self.user = user
        self.password = password
        self.host = host
        self.fixed_port = port
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Blocking: write the files, start ipmi_sim, wait until it answers (run in a thread)."""
        os.makedirs(self.state, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "simstate"), exist_ok=True)
        script = os.path.join(self.dir, "chassis_control.sh")
        with open(script, "w") as f:
            f.write(CHASSIS_CONTROL.format(state=self.state))
        os.chmod(script, 0o755)
        script = self.chassis_control or script
        with open(os.path.join(self.dir, "bmc.emu"), "w") as f:
            f.write(BMC_EMU)
        for _attempt in range(1 if self.fixed_port else 3):  # a free port may be taken before the bind
            self.port = self.fixed_port or free_udp_port()
            with open(os.path.join(self.dir, "lan.conf"), "w") as f:
                f.write(LAN_CONF.format(host=self.host, port=self.port, script=script, user=self.user,
                                        password=self.password, lan_extra=self.lan_extra,
                                        mc_extra=self.mc_extra))
            log = open(os.path.join(self.dir, "ipmi_sim.log"), "ab")
            self.process = subprocess.Popen(
                [*self.prefix, "ipmi_sim", "-c", "lan.conf", "-f", "bmc.emu", "-s", "simstate", "-n"],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.process.poll() is None:
                if self.ipmitool("mc", "info", timeout=3).returncode == 0:
                    return
                time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"ipmi_sim did not come up on {self.host}:{self.port}; "
                           f"see {self.dir}/ipmi_sim.log")

    def stop(self) -> None:
        """Stop ipmi_sim and whatever its chassis control started in its process group."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass
        self.process = None

    def ipmitool(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return self.ipmitool_as(self.user, self.password, *args, timeout=timeout)

    def ipmitool_as(self, user: str, password: str, *args: str,
                    timeout: float = 15) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, "ipmitool", "-I", "lanplus", "-C", "3", "-H", self.host, "-p",
             str(self.port), "-U", user, "-P", password, *args],
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

    def endpoint(self, password: str | None = None) -> BMCEndpoint:
        return make_endpoint(self.host, self.port, self.user,
                             self.password if password is None else password, "")


class IPMISimulatorTests(TestCase):
    """Real RMCP+ sessions from pyghmi, through our pool and locks, to ipmi_sim."""

    timeout = 120

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        missing = [tool for tool in ("ipmi_sim", "ipmitool") if shutil.which(tool) is None]
        if missing:
            raise SkipTest(
                f"REAL BMC TESTS NOT RUN: {', '.join(missing)} not installed "
                "(apt-get install openipmi ipmitool)"
            )
        self.pool = ThreadPoolService(reactor, "ipmi-test", max_threads=POOL_MAX_THREADS)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        self.executor = IPMIExecutor(reactor, self.pool.run, timeout=30)
        self.bmc = self.start_bmc("bmc")

        def started(_: object) -> None:
            self.manager = IPMIPowerManager(self.bmc.endpoint(), self.executor)

        return self.bmc_started.addCallback(started)

    def start_bmc(self, name: str) -> SimulatedBMC:
        bmc = SimulatedBMC(os.path.join(self.mktemp(), name))
        self.addCleanup(bmc.stop)  # always, even if start or the test fails
        self.bmc_started: Deferred[None] = deferToThread(bmc.start)
        return bmc

    def tool(self, *args: str) -> Deferred[subprocess.CompletedProcess[str]]:
        return deferToThread(self.bmc.ipmitool, *args)

    async def status_by_ipmitool(self) -> str:
        result = await self.tool("chassis", "power", "status")
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    async def test_power_on_and_off(self) -> None:
        """power_on/power_off change the chassis state file, and ipmitool and we both see it."""
        self.assertIs(await self.manager.is_powered_on(), False)
        await self.manager.power_on()
        self.assertEqual(self.bmc.read("power"), "1")
        self.assertIs(await self.manager.is_powered_on(), True)
        self.assertEqual(await self.status_by_ipmitool(), "Chassis Power is on")
        await self.manager.power_off()
        self.assertEqual(self.bmc.read("power"), "0")
        self.assertIs(await self.manager.is_powered_on(), False)
        self.assertEqual(await self.status_by_ipmitool(), "Chassis Power is off")

    async def test_power_state_set_by_ipmitool(self) -> None:
        """A power change made by another client (ipmitool) is what is_powered_on reports."""
        result = await self.tool("chassis", "power", "on")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIs(await self.manager.is_powered_on(), True)

    async def test_power_cycle(self) -> None:
        """power_cycle makes the BMC switch the machine off and on again."""
        await self.manager.power_on()
        await self.manager.power_cycle()
        for _ in range(100):  # ipmi_sim powers back on after a short delay of its own
            if self.bmc.log()[-1:] == ["0x20 set power 1"] and self.bmc.read("power") == "1":
                break
            await deferLater(reactor, 0.1, lambda: None)
        sets = [line for line in self.bmc.log() if " set " in line]
        self.assertEqual(sets, ["0x20 set power 1", "0x20 set power 0", "0x20 set power 1"])
        self.assertIs(await self.manager.is_powered_on(), True)
        self.assertEqual(await self.status_by_ipmitool(), "Chassis Power is on")

    async def test_set_pxe(self) -> None:
        """set_pxe (uefi and bios) makes the BMC select PXE as the next boot device."""
        await self.manager.set_pxe("uefi")
        self.assertEqual(self.bmc.read("boot"), "pxe")
        result = await self.tool("chassis", "bootparam", "get", "5")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Boot Device Selector : Force PXE", result.stdout)
        # Another client resets the boot device; bios mode sets PXE again.
        reset = await self.tool("chassis", "bootdev", "none")
        self.assertEqual(reset.returncode, 0, reset.stderr)
        self.assertEqual(self.bmc.read("boot"), "none")
        await self.manager.set_pxe("bios")
        self.assertEqual(self.bmc.read("boot"), "pxe")

    async def test_wrong_password(self) -> None:
        """A wrong password fails with a clear connection error and changes nothing."""
        manager = IPMIPowerManager(self.bmc.endpoint(password="wrong"), self.executor)
        with self.assertRaises(BMCConnectionError) as e:
            await manager.power_on()
        self.assertIn("Incorrect password provided", str(e.exception))
        self.assertIsNone(self.bmc.read("power"))

    async def test_concurrent_operations_are_serialised(self) -> None:
        """Many concurrent operations on one BMC all succeed, in order, none lost."""
        operations: list[Deferred[Any]] = [
            self.manager.power_on(), self.manager.is_powered_on(), self.manager.power_off(),
            self.manager.is_powered_on(), self.manager.set_pxe("uefi"), self.manager.power_on(),
            self.manager.is_powered_on(),
        ]
        results = await gatherResults(operations)
        self.assertEqual([results[1], results[3], results[6]], [True, False, True])
        sets = [line for line in self.bmc.log() if " set " in line]
        self.assertEqual(sets, ["0x20 set power 1", "0x20 set power 0", "0x20 set boot pxe",
                                "0x20 set power 1"])
        self.assertEqual(len(self.executor.locks), 0)

    async def test_two_bmcs_in_parallel(self) -> None:
        """Two BMCs are driven at the same time, each getting only its own requests."""
        other = self.start_bmc("other")
        await self.bmc_started
        second = IPMIPowerManager(other.endpoint(), self.executor)
        await gatherResults([self.manager.power_on(), second.set_pxe("uefi")])
        self.assertEqual((self.bmc.read("power"), self.bmc.read("boot")), ("1", None))
        self.assertEqual((other.read("power"), other.read("boot")), (None, "pxe"))

    async def test_silent_bmc_times_out_without_blocking_others(self) -> None:
        """A BMC that never answers fails with CallTimeout at our limit, while a working BMC is
        driven normally in the meantime (real threads, real pyghmi)."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))  # receives, never answers
        self.addCleanup(silent.close)
        # Our limit must sit between a working BMC's real round trips on a loaded machine
        # (seen above 1.5 s) and pyghmi's own give-up on a silent one (about 5 s): what matters
        # is that the working BMC finishes before the silent one's limit expires.
        limit = 3.0
        executor = IPMIExecutor(reactor, self.pool.run, timeout=limit)
        dead = IPMIPowerManager(make_endpoint("127.0.0.1", silent.getsockname()[1], "a", "b", ""),
                                executor)
        alive = IPMIPowerManager(self.bmc.endpoint(), executor)
        started = time.monotonic()
        hung = dead.power_on()
        await alive.power_on()
        self.assertLess(time.monotonic() - started, limit)
        self.assertEqual(self.bmc.read("power"), "1")
        with self.assertRaises(CallTimeout):
            await hung
        self.assertLess(time.monotonic() - started, limit + 2.5)

    async def test_sessions_are_logged_out(self) -> None:
        """After an operation no pyghmi session to the BMC is left behind."""
        from pyghmi.ipmi.private import session

        await self.manager.power_on()
        await self.manager.is_powered_on()
        ours = [addr for addr, handlers in session.Session.bmc_handlers.items()
                if addr[1] == self.bmc.port and handlers]
        self.assertEqual(ours, [])
