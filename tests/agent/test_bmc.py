"""BMC set-up: the slot scan on a scripted link, and the whole step against OpenIPMI's
ipmi_sim over LAN, cross-checked with ipmitool logging in as the new user."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sidero.agent import bmc
from sidero.agent.main import Agent, Config
from sidero.proto import agent_pb2 as pb
from tests.power.test_ipmi_sim import SimulatedBMC


class ScriptedLink:
    """Answers Get User Name per slot (bytes, or an int completion code) and records writes."""

    def __init__(self, names: dict[int, bytes | int], max_users: int = 6) -> None:
        self.names = names
        self.max_users = max_users
        self.writes: list[tuple[int, tuple[int, ...]]] = []

    def raw(self, netfn: int, command: int, data: Sequence[int] = ()) -> bytes:
        data = tuple(data)
        if command == bmc.CMD_GET_USER_ACCESS:
            return bytes((0xC0 | self.max_users, 1, 1, 0))
        if command == bmc.CMD_GET_USER_NAME:
            answer = self.names.get(data[0], b"")
            if isinstance(answer, int):
                raise bmc.IPMIError("error", answer)
            return answer.ljust(16, b"\x00")
        self.writes.append((command, data))
        return b""


class SlotTests(SynchronousTestCase):
    def test_reuse_sidero(self) -> None:
        """An existing sidero user is reused: no Set User Name, a new password, access, enable."""
        link = ScriptedLink({2: b"admin", 3: b"", 4: b"sidero"})
        uid, password = bmc.setup_user(link, "p" * 16)
        self.assertEqual((uid, password), (4, "p" * 16))
        self.assertEqual([w[0] for w in link.writes], [
            bmc.CMD_SET_USER_PASSWORD, bmc.CMD_SET_USER_ACCESS, bmc.CMD_SET_USER_PASSWORD])
        self.assertEqual(link.writes[1][1], (0x91, 4, 0x04, 0))
        self.assertEqual(link.writes[2][1], (4, bmc.PASSWORD_OP_ENABLE))

    def test_first_free_slot(self) -> None:
        """The first slot whose name fails, is empty or "(Empty User)" gets the new user."""
        link = ScriptedLink({2: b"admin", 3: b"(Empty User)", 4: 0xCC, 5: b""})
        uid, _ = bmc.setup_user(link)
        self.assertEqual(uid, 3)
        self.assertEqual(link.writes[0], (bmc.CMD_SET_USER_NAME, (3, *b"sidero".ljust(16, b"\0"))))
        link = ScriptedLink({2: b"admin", 3: 0xCC, 4: b""})
        self.assertEqual(bmc.find_slot(link), (3, False))

    def test_no_slot(self) -> None:
        """Every slot taken: the spec's error."""
        link = ScriptedLink({i: b"u%d" % i for i in range(2, 7)})
        with self.assertRaises(bmc.IPMIError) as e:
            bmc.setup_user(link)
        self.assertEqual(str(e.exception), "no slot available for sidero user")
        self.assertEqual(link.writes, [])

    def test_password(self) -> None:
        """Passwords are 16 characters of [a-zA-Z0-9], different each time."""
        a, b = bmc.new_password(), bmc.new_password()
        self.assertEqual(len(a), 16)
        self.assertTrue(a.isalnum() and a.isascii())
        self.assertNotEqual(a, b)


class RecordingClient:
    def __init__(self) -> None:
        self.bmc: list[pb.BMCInfo] = []

    def update_bmc_info(self, uuid: str, info: pb.BMCInfo) -> None:
        self.bmc.append(info)


class IPMISimTests(TestCase):
    """Step 10 of the agent against ipmi_sim (the same helper the power tests use)."""

    timeout = 120

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        missing = [t for t in ("ipmi_sim", "ipmitool") if shutil.which(t) is None]
        if missing:
            raise SkipTest(f"LOUD SKIP: {', '.join(missing)} not installed "
                           "(apt-get install openipmi ipmitool)")
        self.sim = SimulatedBMC(os.path.join(self.mktemp(), "bmc"))
        self.addCleanup(self.sim.stop)
        return deferToThread(self.sim.start)

    def as_sidero(self, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(self.sim.port),
             "-U", "sidero", "-P", password, "user", "list", "1"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    def agent(self, client: RecordingClient) -> Agent:
        config = Config(endpoint="unused:1", mac="", network=False,
                        bmc_lan=("127.0.0.1", self.sim.port, self.sim.user, self.sim.password))
        return Agent(config, client=client)  # type: ignore[arg-type]

    async def test_setup_and_reuse(self) -> None:
        """The agent reads the BMC address, creates sidero as administrator with a working
        password (ipmitool logs in with it), and a second run reuses the slot."""
        set_ip = await deferToThread(self.sim.ipmitool, "lan", "set", "1", "ipaddr", "10.9.8.7")
        client = RecordingClient()
        self.assertIs(await deferToThread(self.agent(client).setup_bmc, "uuid-1"), True)
        address, credentials = client.bmc
        if set_ip.returncode == 0:
            self.assertEqual(address.ip, "10.9.8.7")
        self.assertEqual(address.port, 0)  # ipmi_sim has no parameter 8: the server uses 623
        self.assertEqual(credentials.user, "sidero")
        password = getattr(credentials, "pass")
        self.assertEqual(len(password), 16)
        listing = await deferToThread(self.as_sidero, password)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        rows = [line.split() for line in listing.stdout.splitlines() if " sidero " in line]
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0][-1], "ADMINISTRATOR")
        slot = rows[0][0]

        again = RecordingClient()
        self.assertIs(await deferToThread(self.agent(again).setup_bmc, "uuid-1"), True)
        new_password = getattr(again.bmc[1], "pass")
        self.assertNotEqual(new_password, password)
        old = await deferToThread(self.as_sidero, password)
        self.assertNotEqual(old.returncode, 0)
        listing = await deferToThread(self.as_sidero, new_password)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        rows = [line.split() for line in listing.stdout.splitlines() if " sidero " in line]
        self.assertEqual([r[0] for r in rows], [slot])

    async def test_unreachable_bmc_is_not_fatal(self) -> None:
        """A BMC that refuses the login makes the step report failure, not raise."""
        client = RecordingClient()
        config = Config(endpoint="unused:1", mac="", network=False,
                        bmc_lan=("127.0.0.1", self.sim.port, "admin", "wrong"))
        agent = Agent(config, client=client)  # type: ignore[arg-type]
        self.assertIs(await deferToThread(agent.setup_bmc, "uuid-1"), False)
        self.assertEqual(client.bmc, [])
