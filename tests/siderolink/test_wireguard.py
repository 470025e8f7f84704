"""The WireGuard devices: the UAPI codec, the kernel/userspace choice, and the userspace device
against the real wireguard-go in a network namespace, read back with wireguard-tools' C{wg}."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sidero.siderolink.config import generate_private_key, key_hex, public_key
from sidero.siderolink.wireguard import (
    KernelDevice,
    KernelUnsupported,
    UserspaceDevice,
    WireGuardError,
    open_device,
    parse_uapi,
    peers_from_uapi,
    uapi_peer,
    uapi_remove,
    uapi_set,
)
from tests.netlab import missing_requirements
from tests.paths import REPO, tree_env

K1 = public_key(generate_private_key())
HELPER = REPO / "tests" / "siderolink" / "device_helper.py"


class UAPITests(SynchronousTestCase):
    def test_set_request(self) -> None:
        """Device keys go as hex, peers as blocks; the request ends with a blank line."""
        priv = generate_private_key()
        net = ipaddress.IPv6Network("fd00::5/128")
        request = uapi_set(private_key=priv, listen_port=51821, replace_peers=True,
                           peers=[uapi_peer(K1, net), uapi_remove(K1)])
        hex_pub = base64.b64decode(K1).hex()
        self.assertEqual(request.decode(), (
            f"set=1\nprivate_key={base64.b64decode(priv).hex()}\nlisten_port=51821\n"
            f"replace_peers=true\npublic_key={hex_pub}\nreplace_allowed_ips=true\n"
            f"allowed_ip=fd00::5/128\npublic_key={hex_pub}\nremove=true\n\n"))

    def test_parse_response(self) -> None:
        """errno=0 answers its pairs; any other errno or a garbled line is an error."""
        get = (f"private_key={'11' * 32}\nlisten_port=51821\npublic_key={key_hex(K1)}\n"
               "allowed_ip=fd00::5/128\nallowed_ip=fd00::6/128\nerrno=0\n\n").encode()
        self.assertEqual(peers_from_uapi(parse_uapi(get)), {K1: ["fd00::5/128", "fd00::6/128"]})
        self.assertEqual(parse_uapi(b"errno=0\n\n"), [])
        with self.assertRaisesRegex(WireGuardError, "errno=-22"):
            parse_uapi(b"errno=-22\n\n")
        with self.assertRaisesRegex(WireGuardError, "without errno"):
            parse_uapi(b"listen_port=1\n\n")
        with self.assertRaisesRegex(WireGuardError, "unreadable"):
            parse_uapi(b"garbage\nerrno=0\n\n")


class FakeNetlink:
    def __init__(self, create_error: Exception | None) -> None:
        self.create_error = create_error
        self.calls: list[str] = []

    def delete(self, name: str) -> bool:
        self.calls.append(f"delete {name}")
        return False

    def create_wireguard(self, name: str) -> None:
        self.calls.append(f"create {name}")
        if self.create_error is not None:
            raise self.create_error


class Inline:
    def run(self, f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return succeed(f(*args, **kwargs))


class ChoiceTests(SynchronousTestCase):
    def open(self, mode: str, error: Exception | None, wg_go: str | None = "/usr/bin/wireguard-go") -> Any:
        netlink = FakeNetlink(error)
        d = Deferred.fromCoroutine(open_device(Clock(), mode, "sl0", Inline(), netlink=netlink,  # type: ignore[arg-type]
                                               wireguard_go=lambda: wg_go))
        return d, netlink

    def test_auto_prefers_the_kernel(self) -> None:
        """With the module, auto creates a kernel wireguard link."""
        d, netlink = self.open("auto", None)
        self.assertIsInstance(self.successResultOf(d), KernelDevice)
        self.assertEqual(netlink.calls, ["delete sl0", "create sl0"])

    def test_auto_falls_back_to_wireguard_go(self) -> None:
        """EOPNOTSUPP from the kernel (no module, as on these machines): wireguard-go."""
        d, _ = self.open("auto", KernelUnsupported("the kernel has no WireGuard"))
        device = self.successResultOf(d)
        self.assertIsInstance(device, UserspaceDevice)
        self.assertEqual(device.binary, "/usr/bin/wireguard-go")

    def test_forced_choices(self) -> None:
        """kernel never falls back; userspace never asks the kernel; a missing wireguard-go or
        another netlink error is a clear error."""
        d, _ = self.open("kernel", KernelUnsupported("the kernel has no WireGuard"))
        self.failureResultOf(d, KernelUnsupported)
        d, netlink = self.open("userspace", None)
        self.assertIsInstance(self.successResultOf(d), UserspaceDevice)
        self.assertEqual(netlink.calls, [])
        d, _ = self.open("auto", KernelUnsupported("no"), wg_go=None)
        self.assertIn("wireguard-go is not installed", str(self.failureResultOf(d, WireGuardError).value))
        d, _ = self.open("auto", WireGuardError("cannot create sl0: (1, 'Operation not permitted')"))
        self.assertIn("not permitted", str(self.failureResultOf(d, WireGuardError).value))


class Helper:
    """The device helper in a namespace: one command, one JSON answer."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HELPER)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=tree_env(), cwd=str(REPO),
            start_new_session=True)

    def __call__(self, *argv: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((" ".join(argv) + "\n").encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"device helper exited ({self.proc.poll()}) on {argv[0]}")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class UserspaceDeviceNetnsTests(SynchronousTestCase):
    """wireguard-go in namespaces the test creates; interface names are unique per run
    because wireguard-go's socket directory is shared by every namespace."""

    def setUp(self) -> None:
        reason = missing_requirements(("wireguard-go", "wg"))
        if reason is not None:
            raise SkipTest(f"LOUD SKIP: the wireguard-go device test cannot run: {reason}")
        self.tag = f"{os.getpid() % 100000}"
        self.name = f"slt{self.tag}"
        self.namespaces: list[str] = []
        self.helpers: list[Helper] = []
        self.addCleanup(self.teardown)

    def netns(self, suffix: str) -> str:
        ns = f"slwg{self.tag}{suffix}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.namespaces.append(ns)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        return ns

    def helper(self, ns: str) -> Helper:
        h = Helper(ns)
        self.helpers.append(h)
        return h

    def teardown(self) -> None:
        for h in self.helpers:
            h.kill()
        for ns in self.namespaces:
            subprocess.run(["ip", "-n", ns, "link", "del", self.name], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sock = f"/var/run/wireguard/{self.name}.sock"
        deadline = time.monotonic() + 5
        while os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.1)

    def wg_dump(self, ns: str) -> tuple[list[str], dict[str, str]]:
        """wg's view: the interface line, then public key -> allowed IPs."""
        out = subprocess.run(["ip", "netns", "exec", ns, "wg", "show", self.name, "dump"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        device = out[0].split("\t")
        return device, {line.split("\t")[0]: line.split("\t")[3] for line in out[1:]}

    def test_device_lifecycle(self) -> None:
        """up gives wg's view the key, port, address /64 and MTU 1280; peers are set, replaced
        and removed (removing twice is fine); down removes the interface and wireguard-go."""
        ns = self.netns("a")
        h = self.helper(ns)
        priv = generate_private_key()
        self.assertEqual(h("open", "auto", self.name), {"backend": "userspace"})
        self.assertEqual(h("up", priv, "51901", "fd77:1:2:3::1/64"), {"ok": True})
        device, peers = self.wg_dump(ns)
        self.assertEqual((device[0], device[2]), (priv, "51901"))
        self.assertEqual(peers, {})
        link = subprocess.run(["ip", "-n", ns, "-j", "addr", "show", self.name], capture_output=True,
                              text=True, check=True).stdout
        info = json.loads(link)[0]
        self.assertEqual(info["mtu"], 1280)
        self.assertIn("UP", info["flags"])
        self.assertEqual([(a["local"], a["prefixlen"]) for a in info["addr_info"]
                          if a.get("scope") == "global"],
                         [("fd77:1:2:3::1", 64)])

        k2 = public_key(generate_private_key())
        self.assertEqual(h("set", K1, "fd77:1:2:3::a/128"), {"ok": True})
        self.assertEqual(h("set", k2, "fd77:1:2:3::b/128"), {"ok": True})
        self.assertEqual(h("set", K1, "fd77:1:2:3::c/128"), {"ok": True})
        self.assertEqual(self.wg_dump(ns)[1], {K1: "fd77:1:2:3::c/128", k2: "fd77:1:2:3::b/128"})
        self.assertEqual(h("peers"), {K1: ["fd77:1:2:3::c/128"], k2: ["fd77:1:2:3::b/128"]})
        self.assertEqual(h("remove", k2), {"ok": True})
        self.assertEqual(h("remove", k2), {"ok": True})
        self.assertEqual(self.wg_dump(ns)[1], {K1: "fd77:1:2:3::c/128"})

        pid = h("pid")["pid"]
        self.assertEqual(h("down"), {"ok": True})
        gone = subprocess.run(["ip", "-n", ns, "link", "show", self.name], capture_output=True)
        self.assertNotEqual(gone.returncode, 0)
        self.assertFalse(os.path.exists(f"/proc/{pid}") and
                         open(f"/proc/{pid}/stat").read().split()[2] != "Z")

    def test_stale_interface_is_replaced_and_names_are_guarded(self) -> None:
        """A process killed with SIGKILL leaves wireguard-go and its interface behind: the next
        start replaces both.  The same name in another namespace is refused, not clobbered."""
        ns = self.netns("a")
        first = self.helper(ns)
        first("open", "userspace", self.name)
        first("up", generate_private_key(), "51902", "fd77:1:2:3::1/64")
        first("set", K1, "fd77:1:2:3::a/128")
        stale_pid = first("pid")["pid"]
        os.kill(first.proc.pid, signal.SIGKILL)  # the helper only: its wireguard-go lives on
        first.proc.wait(5)
        self.assertTrue(os.path.exists(f"/proc/{stale_pid}"))

        other = self.helper(self.netns("b"))
        other("open", "userspace", self.name)
        answer = other("up", generate_private_key(), "51903", "fd77:1:2:3::1/64")
        self.assertIn("is in use", answer.get("error", ""), answer)

        second = self.helper(ns)
        second("open", "userspace", self.name)
        priv = generate_private_key()
        self.assertEqual(second("up", priv, "51904", "fd77:1:2:3::1/64"), {"ok": True})
        device, peers = self.wg_dump(ns)
        self.assertEqual((device[0], device[2], peers), (priv, "51904", {}))
        self.assertNotEqual(second("pid")["pid"], stale_pid)
        second("down")
