"""Hostile read requests from real TFTP clients (tftp-hpa, atftp, busybox) on loopback.

The root holds a normal file, symlinks leaving it (to a file and to a directory), a FIFO and a
character device (root only: C{mknod}); beside it, outside, a secret.  Each client asks for
C{..} paths, absolute paths, the links, the FIFO and the device: every request gets a TFTP
error (File not found where the cleaned name is simply not in the root, Access violation where
it exists but may not be served), counted by outcome, nothing of the secret reaches the
client, a FIFO never blocks the server, and the normal file is still served afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from sidero.protocols.tftp.service import make_tftp_service

SECRET = b"the cluster's secrets\n"
GOOD = os.urandom(5000)

#: name asked for -> the outcome the server must count.
HOSTILE = {
    "../outside/secret": "not-found",          # .. is clamped at the root (as Go's cleanPath)
    "../../../../etc/passwd": "not-found",
    "/etc/passwd": "not-found",                 # absolute: relative to the root
    "\\..\\outside\\secret": "not-found",       # Windows separators, cleaned the same way
    "link-out": "access-violation",             # a symlink to the secret outside
    "dir-out/secret": "access-violation",       # through a symlinked directory outside
    "fifo": "access-violation",
    "null": "access-violation",                 # a character device (1, 3)
    "sub": "access-violation",                  # a directory
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SkipTest(f"!!! {name} is not installed: this hostile TFTP test cannot run "
                       "(apt-get install tftp-hpa atftp busybox) !!!")
    return path


class HostilePathTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.dir, "root")
        outside = os.path.join(self.dir, "outside")
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(outside)
        with open(os.path.join(outside, "secret"), "wb") as f:
            f.write(SECRET)
        with open(os.path.join(self.root, "good.bin"), "wb") as f:
            f.write(GOOD)
        os.symlink(os.path.join(outside, "secret"), os.path.join(self.root, "link-out"))
        os.symlink(outside, os.path.join(self.root, "dir-out"))
        os.mkfifo(os.path.join(self.root, "fifo"))
        self.hostile = dict(HOSTILE)
        try:
            os.mknod(os.path.join(self.root, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            del self.hostile["null"]  # not root: the device case is covered by the FIFO's path
        self.service = make_tftp_service(reactor, roots=[self.root], port=0,
                                         interface="127.0.0.1")
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        listener: Any = self.service.getServiceNamed("tftp-udp")  # type: ignore[attr-defined]
        self.port = listener.listening.getHost().port
        self.stats = listener.protocol.stats

    async def fetch(self, argv: list[str]) -> tuple[bytes, int]:
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/timeout", ["20", *argv], env=dict(os.environ), path=self.dir)
        return out + err, code

    def commands(self, name: str, local: str) -> dict[str, list[str]]:
        port = str(self.port)
        return {
            "tftp-hpa": [_tool("tftp"), "127.0.0.1", port, "-m", "binary", "-c", "get", name, local],
            "atftp": [_tool("atftp"), "-g", "-r", name, "-l", local, "127.0.0.1", port],
            "busybox": [_tool("busybox"), "tftp", "-g", "-r", name, "-l", local, "127.0.0.1", port],
        }

    async def test_hostile_requests_refused(self) -> None:
        """Every hostile name gets a TFTP error from every client, counted by outcome; the
        secret is never sent; the good file is served before and after."""
        expected: dict[str, int] = {"complete": 0, "not-found": 0, "access-violation": 0}
        for client in ("tftp-hpa", "atftp", "busybox"):
            local = os.path.join(self.dir, f"good.{client}")
            output, code = await self.fetch(self.commands("good.bin", local)[client])
            self.assertEqual(code, 0, output)
            with open(local, "rb") as f:
                self.assertEqual(f.read(), GOOD)
            expected["complete"] += 1
            for index, (name, outcome) in enumerate(self.hostile.items()):
                local = os.path.join(self.dir, f"out-{client}-{index}")
                output, code = await self.fetch(self.commands(name, local)[client])
                words = "Access violation" if outcome == "access-violation" else "File not found"
                self.assertIn(words.lower().encode(), output.lower(), (client, name, output))
                self.assertNotEqual(code, 124, f"{client} {name}: timed out (server blocked?)")
                if os.path.exists(local):
                    with open(local, "rb") as f:
                        self.assertNotIn(b"secrets", f.read(), (client, name))
                expected[outcome] += 1
                self.assertEqual(self.stats.outcomes[outcome], expected[outcome], (client, name))
        output, code = await self.fetch(self.commands("good.bin", os.path.join(self.dir, "again"))
                                      ["tftp-hpa"])
        self.assertEqual(code, 0, output)
        self.assertEqual(self.stats.outcomes["complete"], expected["complete"] + 1)
        self.assertEqual(self.stats.internal_errors, 0)
