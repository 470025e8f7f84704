"""Real TFTP clients (tftp-hpa, atftp, curl, busybox) against our server on loopback.

Runs the real reactor on 127.0.0.1 and a free high port, with the clients as child
processes (C{getProcessOutputAndValue}), so the reactor keeps serving while they run.
Every download is compared byte for byte.  The rollover file has more than 65535
blocks of 512 bytes, so the wire block number wraps during the transfer.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from sidero.protocols.tftp.service import make_tftp_service

ROLLOVER_SIZE = 512 * 65600 + 123  # 65601 blocks
_rollover_cache: dict[str, bytes] = {}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SkipTest(
            f"!!! {name} is not installed: this real-client TFTP test cannot run "
            f"(apt-get install tftp-hpa atftp curl busybox) !!!"
        )
    return path


def _rollover_bytes() -> bytes:
    if "data" not in _rollover_cache:
        _rollover_cache["data"] = os.urandom(ROLLOVER_SIZE)
    return _rollover_cache["data"]


class _RealClientsMixin:
    """Shared tests; subclasses pick the mode."""

    single_port = True

    def setUp(self) -> None:
        case: Any = self
        self.dir = os.path.abspath(case.mktemp())
        self.root = os.path.join(self.dir, "root")
        os.makedirs(self.root)
        self.files = {
            "small.bin": os.urandom(3001),
            "exact.bin": os.urandom(512 * 8),
            "exact1428.bin": os.urandom(1428 * 5),
            "sub/ipxe.efi": os.urandom(200_000),
        }
        for name, data in self.files.items():
            path = os.path.join(self.root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        self.service = make_tftp_service(
            reactor, roots=[self.root], port=0, interface="127.0.0.1",
            single_port=self.single_port,
        )
        self.service.privilegedStartService()
        self.service.startService()
        case.addCleanup(self.service.stopService)
        listener: Any = self.service.getServiceNamed("tftp-udp")  # type: ignore[attr-defined]
        self.port = listener.listening.getHost().port
        self.protocol = listener.protocol

    def add_rollover(self) -> None:
        with open(os.path.join(self.root, "rollover.bin"), "wb") as f:
            f.write(_rollover_bytes())
        self.files["rollover.bin"] = _rollover_bytes()

    def client(self, argv: list[str]) -> Deferred[tuple[bytes, bytes, int]]:
        # `timeout` bounds a hung client; the reactor is never blocked.
        return getProcessOutputAndValue(
            "/usr/bin/timeout", ["60", *argv], env=dict(os.environ), path=self.dir
        )

    def check(self, name: str, out: str, result: tuple[bytes, bytes, int]) -> None:
        case: Any = self
        stdout, stderr, code = result
        case.assertEqual(code, 0, f"client failed: {stdout!r} {stderr!r}")
        with open(os.path.join(self.dir, out), "rb") as f:
            got = f.read()
        case.assertEqual(len(got), len(self.files[name]))
        case.assertTrue(got == self.files[name], f"{name}: downloaded bytes differ")

    async def tftp_hpa(self, name: str) -> None:
        out = name.replace("/", "_") + ".hpa"
        result = await self.client(
            [_tool("tftp"), "127.0.0.1", str(self.port), "-m", "binary", "-c", "get", name, out]
        )
        self.check(name, out, result)

    async def curl(self, name: str, blksize: int = 1428) -> None:
        out = name.replace("/", "_") + ".curl"
        result = await self.client(
            [_tool("curl"), "-sS", "--tftp-blksize", str(blksize), "-o", out,
             f"tftp://127.0.0.1:{self.port}/{name}"]
        )
        self.check(name, out, result)

    async def test_tftp_hpa(self) -> None:
        """tftp-hpa (no options, 512-byte blocks) gets small, exact-multiple and nested files."""
        for name in ("small.bin", "exact.bin", "sub/ipxe.efi"):
            await self.tftp_hpa(name)

    async def test_tftp_hpa_rollover(self) -> None:
        """tftp-hpa gets a file of more than 65535 blocks (block number rollover)."""
        self.add_rollover()
        await self.tftp_hpa("rollover.bin")

    async def test_tftp_hpa_missing(self) -> None:
        """tftp-hpa reports our File not found error."""
        stdout, stderr, _ = await self.client(
            [_tool("tftp"), "127.0.0.1", str(self.port), "-m", "binary", "-c", "get",
             "nope.bin", "nope.out"]
        )
        case: Any = self
        case.assertIn(b"File not found", stdout + stderr)
        case.assertEqual(self.protocol.stats.outcomes["not-found"], 1)

    async def test_curl(self) -> None:
        """curl with --tftp-blksize (blksize and tsize negotiated) gets files byte-identical."""
        for name in ("small.bin", "exact1428.bin", "sub/ipxe.efi"):
            await self.curl(name)
        await self.curl("exact.bin", blksize=512)

    async def test_curl_missing(self) -> None:
        """curl exits 68 (TFTP file not found) for a missing file."""
        _, _, code = await self.client(
            [_tool("curl"), "-sS", "-o", "nope.out", f"tftp://127.0.0.1:{self.port}/nope"]
        )
        case: Any = self
        case.assertEqual(code, 68)

    async def test_atftp_windowsize(self) -> None:
        """atftp with blksize 1428 and windowsize 8 (RFC 7440: it asks, we agree) gets files
        byte-identical."""
        atftp = _tool("atftp")
        recorded: list[dict[str, Any]] = []
        self.protocol.timeline = type("T", (), {
            "record": staticmethod(lambda step, **fields: recorded.append(fields))})()
        for name in ("small.bin", "exact1428.bin", "sub/ipxe.efi"):
            out = name.replace("/", "_") + ".atftp"
            result = await self.client(
                [atftp, "--option", "blksize 1428", "--option", "windowsize 8",
                 "-g", "-r", name, "-l", out, "127.0.0.1", str(self.port)]
            )
            self.check(name, out, result)
        case: Any = self
        case.assertEqual(self.protocol.stats.outcomes["complete"], 3)
        case.assertEqual([(f["blksize"], f["windowsize"]) for f in recorded], [(1428, 8)] * 3)

    async def test_busybox(self) -> None:
        """busybox tftp (tsize) gets files byte-identical, including past the rollover."""
        busybox = _tool("busybox")
        self.add_rollover()
        for name in ("small.bin", "exact.bin", "rollover.bin"):
            out = name + ".bb"
            result = await self.client(
                [busybox, "tftp", "-g", "-r", name, "-l", out, "127.0.0.1", str(self.port)]
            )
            self.check(name, out, result)

    async def test_concurrent_clients(self) -> None:
        """Several clients at once all get their files (sessions demultiplexed correctly)."""
        from twisted.internet.defer import gatherResults

        await gatherResults([
            Deferred.fromCoroutine(self.curl("sub/ipxe.efi")),
            Deferred.fromCoroutine(self.tftp_hpa("small.bin")),
            Deferred.fromCoroutine(self.tftp_hpa("sub/ipxe.efi")),
            Deferred.fromCoroutine(self.curl("exact.bin", blksize=512)),
        ])


class SinglePortRealClientTests(_RealClientsMixin, TestCase):
    """Single-port mode (Sidero's): every packet on the server port."""

    single_port = True


class StandardModeRealClientTests(_RealClientsMixin, TestCase):
    """Standard mode (RFC 1350): a new ephemeral port per transfer."""

    single_port = False
