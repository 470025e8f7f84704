# -*- test-case-name: tests.agent.test_wipe -*-
"""Disk wiping (spec §4 step 9): every disk in parallel, one thread per disk.

The insecure mode only makes old partition tables and file-system signatures go away
(discard, then zero the first and the last MiB); the secure mode clears the whole device with
the first method that works: secure discard, discard when the device says discarded blocks
read back as zeros, the kernel's zero-out, and finally plain writes of zeros.  A regular file
refuses every ioctl, so on files the chain ends in writing zeros.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.logger import Logger

log = Logger()

MIB = 1 << 20

# <linux/fs.h>: _IO(0x12, n)
BLKDISCARD = 0x1277
BLKDISCARDZEROES = 0x127C
BLKSECDISCARD = 0x127D
BLKZEROOUT = 0x127F

#: Methods, as reported by L{wipe_device}.
SECURE_DISCARD, DISCARD, ZEROOUT, WRITE_ZEROS, INSECURE, SKIPPED = (
    "secure-discard", "discard", "zeroout", "write-zeros", "insecure", "skipped")

Ioctl = Callable[[int, int, bytes], bytes]


class WipeError(Exception):
    """A disk could not be wiped (fatal for the agent)."""


@dataclass(frozen=True)
class Target:
    """A disk to wipe: C{path} to open, and whether sysfs says it is read-only."""

    name: str
    path: str
    read_only: bool = False


def _range(start: int, length: int) -> bytes:
    return struct.pack("=QQ", start, length)


def _ioctl(fd: int, request: int, arg: bytes) -> bytes:
    result: bytes = fcntl.ioctl(fd, request, arg)
    return result


def write_zeros(fd: int, start: int, length: int, chunk: int = MIB) -> None:
    """Overwrite C{length} bytes at C{start} with zeros (positional writes, then fsync)."""
    zeros = bytes(min(chunk, length)) if length > 0 else b""
    offset, end = start, start + length
    while offset < end:
        n = os.pwrite(fd, zeros[: min(len(zeros), end - offset)], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset}")
        offset += n
    os.fsync(fd)


def device_size(fd: int) -> int:
    """Size of an open block device or file (lseek to the end works for both)."""
    return os.lseek(fd, 0, os.SEEK_END)


def wipe_fd(fd: int, insecure: bool, ioctl: Ioctl = _ioctl) -> str:
    """Wipe an open device; return the method that did it. Errors of the last resort raise."""
    size = device_size(fd)
    if insecure:
        try:
            ioctl(fd, BLKDISCARD, _range(0, size))
        except OSError:
            pass
        write_zeros(fd, 0, min(MIB, size))
        if size >= 2 * MIB:
            write_zeros(fd, size - MIB, MIB)
        return INSECURE
    try:
        ioctl(fd, BLKSECDISCARD, _range(0, size))
        return SECURE_DISCARD
    except OSError:
        pass
    try:
        zeroes = struct.unpack("=I", ioctl(fd, BLKDISCARDZEROES, struct.pack("=I", 0)))[0]
    except OSError:
        zeroes = 0
    if zeroes:
        try:
            ioctl(fd, BLKDISCARD, _range(0, size))
            return DISCARD
        except OSError:
            pass
    try:
        ioctl(fd, BLKZEROOUT, _range(0, size))
        return ZEROOUT
    except OSError:
        pass
    write_zeros(fd, 0, size)
    return WRITE_ZEROS


def wipe_device(target: Target, insecure: bool, ioctl: Ioctl = _ioctl) -> str:
    """Wipe one disk; read-only or unopenable disks are skipped (L{SKIPPED})."""
    if target.read_only:
        log.info("skipping read-only disk {name}", name=target.name)
        return SKIPPED
    try:
        fd = os.open(target.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        log.info("skipping disk {name}: cannot open {path}: {error}", name=target.name,
                 path=target.path, error=e.strerror)
        return SKIPPED
    try:
        method = wipe_fd(fd, insecure, ioctl)
    except OSError as e:
        raise WipeError(f"wiping {target.path} failed: {e.strerror or e}") from e
    finally:
        os.close(fd)
    log.info("wiped disk {name} ({method})", name=target.name, method=method)
    return method


def wipe_all(targets: Iterable[Target], insecure: bool, ioctl: Ioctl = _ioctl) -> dict[str, str]:
    """Wipe every disk at once (one thread each); map name → method.

    @raise WipeError: any disk failed (after every thread has finished).
    """
    results: dict[str, str] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def one(target: Target) -> None:
        try:
            method = wipe_device(target, insecure, ioctl)
        except WipeError as e:
            with lock:
                errors.append(str(e))
            return
        except Exception as e:  # a bug must not leave the other disks' results unreported
            with lock:
                errors.append(f"wiping {target.path} failed: {e!r}")
            return
        with lock:
            results[target.name] = method

    threads = [threading.Thread(target=one, args=(t,), name=f"wipe-{t.name}", daemon=True)
               for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise WipeError("; ".join(sorted(errors)))
    return results
