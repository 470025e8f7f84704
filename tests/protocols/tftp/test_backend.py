"""The filesystem boot assets: path safety, special files, roots, chunked reads."""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sidero.protocols.tftp.backend import (
    AccessViolation,
    AssetNotFound,
    BackendError,
    FilesystemAssets,
    IAssetReader,
    IBootAssets,
    clean_path,
)


def inline(f: Any, *args: Any) -> Deferred[Any]:
    """A pool that runs the call at once (the contract is only: returns a Deferred)."""
    return maybeDeferred(f, *args)


class HeldPool:
    """A pool whose calls run only when released, to observe in-flight reads."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args))
        return d

    def release(self) -> None:
        calls, self.calls = self.calls, []
        for d, f, args in calls:
            maybeDeferred(f, *args).chainDeferred(d)


class CleanPathTests(SynchronousTestCase):
    """Names are cleaned like Sidero's cleanPath: forced relative, no climbing."""

    def test_cases(self) -> None:
        """Dot-dot, absolute paths, backslashes and doubled slashes all stay under the root."""
        cases = {
            "ipxe.efi": "ipxe.efi",
            "/ipxe.efi": "ipxe.efi",
            "../../etc/passwd": "etc/passwd",
            "a/../../b": "b",
            "a//b/./c": "a/b/c",
            "\\boot\\pxelinux.0": "boot/pxelinux.0",
            "..": "",
            "/": "",
        }
        for name, expected in cases.items():
            self.assertEqual(clean_path(name), expected, name)


class FilesystemAssetsTests(SynchronousTestCase):
    """Opening and reading files from roots."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.root = os.path.join(base, "root")
        self.second = os.path.join(base, "second")
        self.outside = os.path.join(base, "outside")
        for d in (self.root, self.second, self.outside):
            os.makedirs(d)
        self.write(self.root, "ipxe.efi", b"first")
        self.write(self.second, "ipxe.efi", b"second")
        self.write(self.second, "snp.efi", b"snp")
        self.write(self.outside, "secret", b"secret")
        self.assets = FilesystemAssets([self.root, self.second], inline)

    def write(self, root: str, name: str, data: bytes) -> str:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def read_all(self, name: str) -> bytes:
        reader = self.successResultOf(self.assets.open(name))
        data = self.successResultOf(reader.read(0, reader.size + 10))
        reader.close()
        return data

    def open_failure(self, name: str, error: type[Exception]) -> None:
        self.failureResultOf(self.assets.open(name), error)

    def test_provides_interfaces(self) -> None:
        """The assets and their readers provide the declared interfaces."""
        self.assertTrue(verifyObject(IBootAssets, self.assets))
        reader = self.successResultOf(self.assets.open("ipxe.efi"))
        self.assertTrue(verifyObject(IAssetReader, reader))
        reader.close()

    def test_first_root_wins(self) -> None:
        """A name present in several roots comes from the first; others fall through."""
        self.assertEqual(self.read_all("ipxe.efi"), b"first")
        self.assertEqual(self.read_all("snp.efi"), b"snp")

    def test_missing_root_is_skipped(self) -> None:
        """A root that does not exist is skipped, not an error."""
        assets = FilesystemAssets([os.path.join(self.root, "nope"), self.second], inline)
        reader = self.successResultOf(assets.open("snp.efi"))
        self.assertEqual(reader.size, 3)
        reader.close()

    def test_not_found(self) -> None:
        """A name in no root is AssetNotFound."""
        self.open_failure("missing", AssetNotFound)

    def test_dotdot_cannot_escape(self) -> None:
        """Climbing with .. is clamped at the root: the outside file is never reached."""
        self.open_failure("../outside/secret", AssetNotFound)
        self.open_failure("../../../../" + self.outside.lstrip("/") + "/secret", AssetNotFound)
        self.write(self.root, "outside/secret", b"inside")
        self.assertEqual(self.read_all("../outside/secret"), b"inside")

    def test_absolute_path_is_relative_to_root(self) -> None:
        """An absolute name is looked up under the root, not in the host filesystem."""
        self.open_failure(os.path.join(self.outside, "secret"), AssetNotFound)
        self.assertEqual(self.read_all("/ipxe.efi"), b"first")

    def test_backslashes(self) -> None:
        """Windows-style separators reach files in subdirectories."""
        self.write(self.root, "efi/boot.efi", b"efi")
        self.assertEqual(self.read_all("\\efi\\boot.efi"), b"efi")

    def test_symlink_inside_root_is_followed(self) -> None:
        """A link to a file in the same root is served."""
        os.symlink("ipxe.efi", os.path.join(self.root, "link.efi"))
        self.assertEqual(self.read_all("link.efi"), b"first")

    def test_symlink_out_of_root_is_refused(self) -> None:
        """A link pointing outside its root is an access violation, not a fall-through."""
        os.symlink(os.path.join(self.outside, "secret"), os.path.join(self.root, "snp.efi"))
        self.open_failure("snp.efi", AccessViolation)

    def test_symlinked_directory_out_of_root_is_refused(self) -> None:
        """A directory link leading out of the root is refused too."""
        os.symlink(self.outside, os.path.join(self.root, "dir"))
        self.open_failure("dir/secret", AccessViolation)

    def test_dangling_symlink_is_not_found(self) -> None:
        """A link to nothing is simply not found."""
        os.symlink("nothing", os.path.join(self.root, "dangling"))
        self.open_failure("dangling", AssetNotFound)

    def test_directory_refused(self) -> None:
        """Directories, including the root itself, are not served."""
        os.makedirs(os.path.join(self.root, "sub"))
        self.open_failure("sub", AccessViolation)
        self.open_failure("/", AccessViolation)

    def test_fifo_refused(self) -> None:
        """A FIFO is refused without blocking on its open."""
        os.mkfifo(os.path.join(self.root, "fifo"))
        self.open_failure("fifo", AccessViolation)

    def test_device_refused(self) -> None:
        """A device node inside the root is refused."""
        path = os.path.join(self.root, "null")
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            os.symlink("/dev/null", path)  # not root: still a non-regular target
        self.open_failure("null", AccessViolation)

    def test_unreadable_file_refused(self) -> None:
        """A file the server may not read is an access violation (when not running as root)."""
        path = self.write(self.root, "private", b"x")
        os.chmod(path, 0)
        if os.geteuid() == 0:
            # root reads anything: the file is served, which is the correct outcome here.
            self.assertEqual(self.read_all("private"), b"x")
        else:
            self.open_failure("private", AccessViolation)

    def test_chunked_reads(self) -> None:
        """Reads are positioned, short only at the end of the file."""
        body = os.urandom(10_000)
        self.write(self.root, "big", body)
        reader = self.successResultOf(self.assets.open("big"))
        self.assertEqual(reader.size, 10_000)
        self.assertEqual(self.successResultOf(reader.read(4096, 4096)), body[4096:8192])
        self.assertEqual(self.successResultOf(reader.read(8192, 4096)), body[8192:])
        self.assertEqual(self.successResultOf(reader.read(10_000, 4096)), b"")
        reader.close()
        self.failureResultOf(reader.read(0, 1), BackendError)

    def test_close_waits_for_read_in_flight(self) -> None:
        """Closing during a read keeps the descriptor until that read returns."""
        body = os.urandom(5000)
        self.write(self.root, "big", body)
        pool = HeldPool()
        assets = FilesystemAssets([self.root], pool)
        d = assets.open("big")
        pool.release()
        reader = self.successResultOf(d)
        pending = reader.read(0, 5000)
        reader.close()
        pool.release()
        self.assertEqual(self.successResultOf(pending), body)
        self.failureResultOf(reader.read(0, 1), BackendError)

    def test_needs_a_root(self) -> None:
        """Constructing without any root is a usage error."""
        self.assertRaises(ValueError, FilesystemAssets, [], inline)
