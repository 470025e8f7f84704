"""Wiping: the method chain on scripted ioctls, regular files, and a real loop device."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sidero.agent import wipe

MIB = wipe.MIB


def fill(path: str, size: int, byte: bytes = b"\xaa") -> None:
    with open(path, "wb") as f:
        f.write(byte * size)


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ScriptedIoctl:
    """Answers the wipe ioctls from a table: an errno to fail, bytes to succeed."""

    def __init__(self, answers: dict[int, int | bytes]) -> None:
        self.answers = answers
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def __call__(self, fd: int, request: int, arg: bytes) -> bytes:
        self.calls.append((request, struct.unpack("=QQ", arg) if len(arg) == 16 else ()))
        answer = self.answers.get(request, errno.ENOTTY)
        if isinstance(answer, int):
            raise OSError(answer, os.strerror(answer))
        return answer


class ChainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp())
        fill(self.path, 3 * MIB)
        self.target = wipe.Target("sda", self.path)

    def test_secure_discard_first(self) -> None:
        """A device that takes BLKSECDISCARD is wiped by it, over its whole size."""
        ioctl = ScriptedIoctl({wipe.BLKSECDISCARD: b""})
        self.assertEqual(wipe.wipe_device(self.target, False, ioctl), wipe.SECURE_DISCARD)
        self.assertEqual(ioctl.calls, [(wipe.BLKSECDISCARD, (0, 3 * MIB))])

    def test_discard_only_when_it_zeroes(self) -> None:
        """BLKDISCARD is used only when BLKDISCARDZEROES says discarded blocks read as zeros."""
        yes = ScriptedIoctl({wipe.BLKDISCARDZEROES: struct.pack("=I", 1), wipe.BLKDISCARD: b""})
        self.assertEqual(wipe.wipe_device(self.target, False, yes), wipe.DISCARD)
        no = ScriptedIoctl({wipe.BLKDISCARDZEROES: struct.pack("=I", 0), wipe.BLKDISCARD: b"",
                            wipe.BLKZEROOUT: b""})
        self.assertEqual(wipe.wipe_device(self.target, False, no), wipe.ZEROOUT)
        self.assertNotIn(wipe.BLKDISCARD, [c[0] for c in no.calls])

    def test_write_zeros_last(self) -> None:
        """When every ioctl fails, the whole device is overwritten with zeros."""
        ioctl = ScriptedIoctl({})
        self.assertEqual(wipe.wipe_device(self.target, False, ioctl), wipe.WRITE_ZEROS)
        self.assertEqual([c[0] for c in ioctl.calls],
                         [wipe.BLKSECDISCARD, wipe.BLKDISCARDZEROES, wipe.BLKZEROOUT])
        self.assertEqual(content(self.path), bytes(3 * MIB))

    def test_insecure(self) -> None:
        """Insecure: discard (errors ignored), then zero the first and last MiB only."""
        ioctl = ScriptedIoctl({wipe.BLKDISCARD: errno.EOPNOTSUPP})
        self.assertEqual(wipe.wipe_device(self.target, True, ioctl), wipe.INSECURE)
        self.assertEqual(ioctl.calls, [(wipe.BLKDISCARD, (0, 3 * MIB))])
        data = content(self.path)
        self.assertEqual(data[:MIB] + data[-MIB:], bytes(2 * MIB))
        self.assertEqual(set(data[MIB:-MIB]), {0xAA})

    def test_insecure_small(self) -> None:
        """Below 2 MiB only the start is zeroed, and the file does not grow."""
        fill(self.path, MIB + 512)
        wipe.wipe_device(self.target, True, ScriptedIoctl({}))
        data = content(self.path)
        self.assertEqual(len(data), MIB + 512)
        self.assertEqual(data[:MIB], bytes(MIB))
        self.assertEqual(data[MIB:], b"\xaa" * 512)

    def test_skips(self) -> None:
        """Read-only and unopenable disks are skipped and left alone."""
        ro = wipe.Target("sdb", self.path, read_only=True)
        self.assertEqual(wipe.wipe_device(ro, False), wipe.SKIPPED)
        self.assertEqual(set(content(self.path)), {0xAA})
        missing = wipe.Target("sdc", os.path.join(self.mktemp(), "nope"))
        self.assertEqual(wipe.wipe_device(missing, False), wipe.SKIPPED)

    def test_error_is_fatal(self) -> None:
        """A failing last resort is a WipeError naming the device, raised after the other
        disks are done; a directory (cannot be opened for writing) is skipped."""
        good, bad = self.mktemp(), self.mktemp()
        fill(good, MIB)
        fill(bad, MIB)
        real = wipe.write_zeros

        def write_zeros(fd: int, start: int, length: int, chunk: int = MIB) -> None:
            if os.readlink(f"/proc/self/fd/{fd}") == os.path.abspath(bad):
                raise OSError(errno.EIO, "Input/output error")
            real(fd, start, length, chunk)

        self.patch(wipe, "write_zeros", write_zeros)
        targets = [wipe.Target("good", good), wipe.Target("bad", bad),
                   wipe.Target("dir", os.path.dirname(os.path.abspath(good)))]
        with self.assertRaises(wipe.WipeError) as e:
            wipe.wipe_all(targets, False, ScriptedIoctl({}))
        self.assertIn(bad, str(e.exception))
        self.assertIn("Input/output error", str(e.exception))
        self.assertEqual(content(good), bytes(MIB))
        self.assertEqual(wipe.wipe_all(targets[2:], False, ScriptedIoctl({})),
                         {"dir": wipe.SKIPPED})

    def test_parallel(self) -> None:
        """Every disk is wiped in a thread of its own, all at the same time."""
        paths = []
        for _ in range(3):
            p = self.mktemp()
            fill(p, MIB)
            paths.append(p)
        barrier = threading.Barrier(3, timeout=10)

        def ioctl(fd: int, request: int, arg: bytes) -> bytes:
            if request == wipe.BLKSECDISCARD:
                barrier.wait()  # only passes if all three disks are being wiped at once
                return b""
            raise OSError(errno.ENOTTY, "no")

        results = wipe.wipe_all([wipe.Target(f"d{i}", p) for i, p in enumerate(paths)],
                                False, ioctl)
        self.assertEqual(results, {f"d{i}": wipe.SECURE_DISCARD for i in range(3)})


class LoopDeviceTests(SynchronousTestCase):
    """The real ioctls on a real block device: a loop device over a sparse file."""

    def setUp(self) -> None:
        if os.geteuid() != 0 or shutil.which("losetup") is None:
            raise SkipTest("LOUD SKIP: loop device tests need root and losetup")
        self.backing = os.path.abspath(self.mktemp())
        fill(self.backing, 4 * MIB)
        result = subprocess.run(["losetup", "--find", "--show", self.backing],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise SkipTest(f"LOUD SKIP: cannot attach a loop device: {result.stderr.strip()}")
        self.device = result.stdout.strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", self.device], timeout=30)

    def test_secure_wipe_uses_zeroout(self) -> None:
        """A loop device refuses secure discard and does not zero on discard, so BLKZEROOUT
        clears it, and the backing file reads back as zeros."""
        method = wipe.wipe_device(wipe.Target("loop", self.device), False)
        self.assertEqual(method, wipe.ZEROOUT)
        self.assertEqual(content(self.backing), bytes(4 * MIB))

    def test_insecure_wipe(self) -> None:
        """Insecure on a block device: the first and last MiB are zero, the middle may be
        discarded (zeros) or kept, never anything else."""
        self.assertEqual(wipe.wipe_device(wipe.Target("loop", self.device), True), wipe.INSECURE)
        data = content(self.backing)
        self.assertEqual(data[:MIB] + data[-MIB:], bytes(2 * MIB))
        self.assertLessEqual(set(data[MIB:-MIB]), {0x00, 0xAA})
