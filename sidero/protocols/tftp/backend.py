# -*- test-case-name: tests.protocols.tftp.test_backend -*-
"""Boot assets for TFTP (and the HTTP C{/tftp/} route): names in, readers out.

The seam is L{IBootAssets} (open by name) returning an L{IAssetReader} (size, positioned
reads, close).  Reads are positioned (C{pread}) rather than a stream so a reader is
stateless: retransmissions and read-ahead never seek, and two readers can share nothing.

L{FilesystemAssets} serves files from one or more root directories; the first root that
has the name wins (the operator's own patched iPXE binaries first, then e.g. Debian's
C{/usr/lib/ipxe}).  Path policy, decided here:
  - the requested name is cleaned like Sidero's C{cleanPath}: backslashes become slashes
    (PXE clients written for Windows servers send them), then it is normalised as if
    absolute and made relative again, so C{..} can never climb above a root (C{/../x}
    is C{x});
  - symlinks are followed only while they stay inside the root they were found in (both
    the root and the target are C{realpath}-resolved before comparing): the operator can
    link files within a root, and must add another root to serve files from elsewhere;
    a link pointing out is an access violation, never a fall-through to the next root;
  - only regular files are served: directories, devices, FIFOs and sockets are refused
    (access violation) after an C{lstat}-free C{stat} of the resolved path, and the file
    is opened with C{O_NONBLOCK | O_NOFOLLOW} and checked again with C{fstat}, so a FIFO
    swapped in between can neither block the opening thread nor be read.

Threading: every open, stat and read runs in a small dedicated pool (the injected C{run}
callable, normally L{sidero.threads.ThreadPoolService.run}), never on the reactor thread.
A C{pread} of a page-cached 64 KiB chunk takes a few microseconds, but a thread hop costs
tens of microseconds, so the session reads ahead in chunks of at least 64 KiB (a whole
window or more, see L{sidero.protocols.tftp.session}): one hop per chunk instead of one
per block keeps the pool cheap while a cold disk (or a stalled NFS mount) only ever stalls
the transfers that touch it, not the reactor.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "AccessViolation",
    "AssetError",
    "AssetNotFound",
    "BackendError",
    "BytesReader",
    "FilesystemAssets",
    "IAssetReader",
    "IBootAssets",
    "OverrideAssets",
    "clean_path",
]

T = TypeVar("T")
Runner = Callable[..., "Deferred[Any]"]


class AssetError(Exception):
    """Base of the errors an L{IBootAssets} may fail with."""


class AssetNotFound(AssetError):
    """No root has a file of that name."""


class AccessViolation(AssetError):
    """The name exists but may not be served (escapes its root, not a regular file)."""


class BackendError(AssetError):
    """Any other failure (I/O error, permission denied on the server's side)."""


class IAssetReader(Interface):
    """An open boot asset.  Readers are not shared between transfers."""

    size = Attribute("Size of the file in bytes, fixed when it was opened.")

    def read(offset: int, length: int) -> Deferred[bytes]:
        """Read up to C{length} bytes at C{offset}; fewer only at end of file.

        Fails with L{BackendError} on I/O errors.
        """

    def close() -> None:
        """Release the file; later reads fail.  Idempotent."""


class IBootAssets(Interface):
    """Where boot assets come from."""

    def open(name: str) -> Deferred[IAssetReader]:
        """Open C{name} for reading.

        Fails with L{AssetNotFound}, L{AccessViolation} or L{BackendError}.
        """


def clean_path(name: str) -> str:
    """The relative path a request name stands for ("" means the root itself)."""
    name = name.replace("\\", "/")
    cleaned = posixpath.normpath("/" + name)
    return cleaned.lstrip("/")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@implementer(IAssetReader)
class _FileReader:
    """A file descriptor read with C{os.pread} in the pool.

    C{close} while a read is in flight is deferred until that read returns: closing the
    descriptor under a worker thread could let the number be reused by another open and
    the read return another file's bytes.
    """

    def __init__(self, fd: int, size: int, run: Runner, name: str) -> None:
        self._fd = fd
        self.size = size
        self._run = run
        self.name = name
        self._pending = 0
        self._closing = False

    def _pread(self, fd: int, offset: int, length: int) -> bytes:
        try:
            return os.pread(fd, length, offset)
        except OSError as e:
            raise BackendError(f"{self.name}: {e.strerror}") from None

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._closing:
            return fail(BackendError(f"{self.name}: read after close"))
        self._pending += 1
        d = self._run(self._pread, self._fd, offset, length)
        d.addBoth(self._read_done)
        return d

    def _read_done(self, result: T) -> T:
        self._pending -= 1
        if self._closing and not self._pending:
            self._close_now()
        return result

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._pending:
            self._close_now()

    def _close_now(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            # close() of a regular file opened read-only does not block in practice;
            # doing it inline saves a thread hop per transfer.
            os.close(fd)


@implementer(IBootAssets)
class FilesystemAssets:
    """Regular files under one or more roots (first match wins).

    @param roots: directories, searched in order; a missing root is skipped (the
        service logs missing roots once at start rather than on every request).
    @param run: runs a blocking callable off the reactor thread, returning a Deferred
        that fires on the reactor thread.
    @param aliases: the file names to look for, in order, in each root when a name is
        requested (L{sidero.protocols.bootfiles.candidates}); by default the name itself.
    """

    log = Logger()

    def __init__(self, roots: Sequence[str], run: Runner,
                 aliases: Callable[[str], Sequence[str]] | None = None) -> None:
        if not roots:
            raise ValueError("at least one root directory is needed")
        self.roots = [os.path.abspath(r) for r in roots]
        self._run = run
        self._aliases = aliases

    def open(self, name: str) -> Deferred[IAssetReader]:
        return self._run(self._open_blocking, name)

    def _open_blocking(self, name: str) -> IAssetReader:
        relative = clean_path(name)
        if not relative:
            raise AccessViolation(f"{name!r}: not a file")
        names = [relative]
        if self._aliases is not None:
            names = [clean_path(n) for n in self._aliases(relative)] or names
        for root in self.roots:
            try:
                real_root = os.path.realpath(root, strict=True)
            except OSError:
                continue
            for alias in names:
                candidate = os.path.join(real_root, alias)
                try:
                    os.lstat(candidate)
                except FileNotFoundError:
                    continue
                except NotADirectoryError:
                    continue
                except OSError as e:
                    raise BackendError(f"{name!r}: {e.strerror}") from None
                return self._open_in_root(name, real_root, candidate)
        raise AssetNotFound(f"{name!r}: file not found")

    def _open_in_root(self, name: str, real_root: str, candidate: str) -> IAssetReader:
        try:
            resolved = os.path.realpath(candidate, strict=True)
        except OSError:
            # A dangling symlink: it exists in this root but points nowhere.
            raise AssetNotFound(f"{name!r}: file not found") from None
        if not _within(resolved, real_root):
            raise AccessViolation(f"{name!r}: outside the TFTP root")
        try:
            st = os.stat(resolved)
        except OSError as e:
            raise BackendError(f"{name!r}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise AccessViolation(f"{name!r}: not a regular file")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(resolved, flags)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
                raise AccessViolation(f"{name!r}: {e.strerror}") from None
            if e.errno == errno.ENOENT:
                raise AssetNotFound(f"{name!r}: file not found") from None
            raise BackendError(f"{name!r}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise AccessViolation(f"{name!r}: not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return _FileReader(fd, st.st_size, self._run, name)


@implementer(IAssetReader)
class BytesReader:
    """An in-memory asset (the chain script); reads need no thread."""

    def __init__(self, data: bytes, name: str = "") -> None:
        self._data = data
        self.size = len(data)
        self.name = name
        self._closed = False

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._closed:
            return fail(BackendError(f"{self.name}: read after close"))
        return succeed(self._data[offset:offset + length])

    def close(self) -> None:
        self._closed = True


@implementer(IBootAssets)
class OverrideAssets:
    """C{data} for the names C{wanted} picks, C{fallback} for everything else.

    How an iPXE client asking for a boot binary gets the chain script instead
    (L{sidero.protocols.bootfiles}).
    """

    def __init__(self, fallback: IBootAssets, data: bytes, wanted: Callable[[str], bool]) -> None:
        self.fallback = fallback
        self.data = data
        self.wanted = wanted

    def open(self, name: str) -> Deferred[IAssetReader]:
        if self.wanted(clean_path(name)):
            return succeed(BytesReader(self.data, name))
        return self.fallback.open(name)
