"""iPXE binaries: Sidero's names, the chain script for iPXE clients, placeholder patching."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

from twisted.internet import reactor
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sidero.protocols import bootfiles
from sidero.protocols.http.ipxe import boot_script
from sidero.protocols.tftp import codec
from sidero.protocols.tftp.protocol import TFTPProtocol
from sidero.protocols.tftp.service import TFTPBindError, TFTPListener, make_tftp_service

from .tftp.fakes import MemoryAssets
from .tftp.test_service import RefusingReactor

SCRIPT = boot_script("10.0.0.2", 8081)
# iPXE's tftp_send_rrq, byte for byte: filename, octet, blksize 1432, tsize 0.
IPXE_RRQ = b"\x00\x01%s\x00octet\x00blksize\x001432\x00tsize\x000\x00"


class NamesTests(SynchronousTestCase):
    def test_every_go_name_has_candidates(self) -> None:
        """Each name of spec 3.4 is served, Sidero's file first, then Debian's."""
        self.assertEqual(bootfiles.SERVED_NAMES, (
            "undionly.kpxe", "undionly.kpxe.0", "ipxe.efi", "snp.efi", "ipxe-arm64.efi",
            "snp-arm64.efi"))
        self.assertEqual(bootfiles.candidates("snp.efi"), ("snp.efi", "snponly.efi"))
        self.assertEqual(bootfiles.candidates("undionly.kpxe.0"),
                         ("undionly.kpxe.0", "undionly.kpxe"))
        self.assertEqual(bootfiles.candidates("vmlinuz"), ("vmlinuz",))

    def test_ipxe_tftp_signature(self) -> None:
        """Only blksize 1432 then tsize 0, and nothing else, is iPXE."""
        self.assertTrue(bootfiles.is_ipxe_tftp({"blksize": "1432", "tsize": "0"}))
        for options in (
            {"tsize": "0", "blksize": "1432"},  # EDK2's file-size probe order
            {"blksize": "1468"},  # EDK2's read
            {"tsize": "0", "blksize": "1456"},  # Intel PXE ROMs
            {"blksize": "1432", "tsize": "0", "windowsize": "4"},
            {},
        ):
            self.assertFalse(bootfiles.is_ipxe_tftp(options), options)

    def test_ipxe_http(self) -> None:
        self.assertTrue(bootfiles.is_ipxe_http(b"iPXE/1.0.0+git-20190125.36a4c85"))
        self.assertFalse(bootfiles.is_ipxe_http(b"UefiHttpBoot/1.0"))
        self.assertFalse(bootfiles.is_ipxe_http(None))

    def test_wants_chain_script(self) -> None:
        self.assertTrue(bootfiles.wants_chain_script("undionly.kpxe", True))
        self.assertTrue(bootfiles.wants_chain_script("/snp.efi", True))
        self.assertFalse(bootfiles.wants_chain_script("undionly.kpxe", False))
        self.assertFalse(bootfiles.wants_chain_script("pxelinux.cfg/default", True))

    def test_locate_prefers_first_root_and_sidero_names(self) -> None:
        a, b = self.mktemp(), self.mktemp()
        os.makedirs(a)
        os.makedirs(b)
        for root, name in ((a, "snp.efi"), (b, "snponly.efi"), (b, "undionly.kpxe")):
            with open(os.path.join(root, name), "wb") as f:
                f.write(name.encode())
        found = bootfiles.locate([a, b])
        self.assertEqual(found["snp.efi"], os.path.join(a, "snp.efi"))
        self.assertEqual(found["undionly.kpxe.0"], os.path.join(b, "undionly.kpxe"))
        self.assertIsNone(found["ipxe-arm64.efi"])


def placeholder_build(prefix: bytes = b"MZ" + b"\0" * 100, size: int = 1000) -> bytes:
    body = bootfiles.PLACEHOLDER_START + b"\n"
    body += b"#" * (size - len(body) - len(bootfiles.PLACEHOLDER_END) - 1) + b"\n"
    body += bootfiles.PLACEHOLDER_END
    return prefix + body + b"\0TRAILER"


class PatchTests(SynchronousTestCase):
    def test_patch_keeps_length_and_surroundings(self) -> None:
        build = placeholder_build()
        patched = bootfiles.patch_placeholder(build, SCRIPT)
        self.assertEqual(len(patched), len(build))
        self.assertTrue(patched.startswith(b"MZ"))
        self.assertTrue(patched.endswith(b"\0TRAILER"))
        start = build.index(bootfiles.PLACEHOLDER_START)
        region = patched[start:start + 1000]
        self.assertEqual(region.rstrip(b"\n"), SCRIPT.rstrip(b"\n"))
        self.assertNotIn(b"PLACEHOLDER", patched)

    def test_spec_endpoint_fits(self) -> None:
        """The spec's reference endpoint and port fit the ~1000-byte placeholder."""
        script = boot_script("[2001:470:6d:30e:e5b8:903e:3701:7332]", 12345)
        bootfiles.patch_placeholder(placeholder_build(), script)

    def test_errors(self) -> None:
        with self.assertRaisesRegex(bootfiles.PatchError, "no # \\*PLACEHOLDER START\\*"):
            bootfiles.patch_placeholder(b"stock", SCRIPT, "snp.efi")
        with self.assertRaisesRegex(bootfiles.PatchError, "without"):
            bootfiles.patch_placeholder(bootfiles.PLACEHOLDER_START + b"x" * 2000, SCRIPT)
        with self.assertRaisesRegex(bootfiles.PatchError, "the placeholder 100"):
            bootfiles.patch_placeholder(placeholder_build(size=100), SCRIPT)

    def test_install_patched_lays_out_like_sidero(self) -> None:
        """amd64/arm64 EFI builds and the kpxe (through zbin) land under Sidero's names."""
        source, tftp = self.mktemp(), self.mktemp()
        for relative in ("amd64/ipxe.efi", "arm64/snp.efi", bootfiles.KPXE_BIN):
            os.makedirs(os.path.dirname(os.path.join(source, relative)), exist_ok=True)
            with open(os.path.join(source, relative), "wb") as f:
                f.write(placeholder_build())
        with open(os.path.join(source, bootfiles.KPXE_ZINFO), "wb") as f:
            f.write(b"zinfo")
        calls: list[tuple[bytes, str]] = []

        def zbin(binary: str, zinfo: str) -> bytes:
            with open(binary, "rb") as f:
                calls.append((f.read(), zinfo))
            return b"compressed"

        installed = bootfiles.install_patched(source, tftp, SCRIPT, zbin)
        self.assertEqual(sorted(installed.files), [
            "ipxe.efi", "snp-arm64.efi", "undionly.kpxe", "undionly.kpxe.0"])
        with open(os.path.join(tftp, "ipxe.efi"), "rb") as f:
            self.assertIn(SCRIPT, f.read())
        self.assertIn(SCRIPT, calls[0][0])
        self.assertEqual(calls[0][1], os.path.join(source, bootfiles.KPXE_ZINFO))
        with open(os.path.join(tftp, "undionly.kpxe.0"), "rb") as f:
            self.assertEqual(f.read(), b"compressed")
        self.assertEqual(sorted(os.listdir(tftp)), sorted(installed.files))

    def test_install_patched_refuses_stock_build(self) -> None:
        """A build in <state-dir>/ipxe without a placeholder is an error, and nothing is written."""
        source, tftp = self.mktemp(), self.mktemp()
        os.makedirs(os.path.join(source, "amd64"))
        with open(os.path.join(source, "amd64", "snp.efi"), "wb") as f:
            f.write(b"stock build")
        with self.assertRaises(bootfiles.PatchError):
            bootfiles.install_patched(source, tftp, SCRIPT)
        self.assertEqual(os.listdir(tftp), [])

    def test_install_patched_without_sources(self) -> None:
        self.assertEqual(bootfiles.install_patched(self.mktemp(), self.mktemp(), SCRIPT).files, {})

    def test_zbin_failure_is_patch_error(self) -> None:
        with self.assertRaisesRegex(bootfiles.PatchError, "failed"):
            bootfiles.run_zbin("false")("a", "b")
        with self.assertRaisesRegex(bootfiles.PatchError, "/nonexistent/zbin"):
            bootfiles.run_zbin("/nonexistent/zbin")("a", "b")


class StockTests(SynchronousTestCase):
    def test_install_stock_copies_under_sidero_names(self) -> None:
        """Debian's layout (ipxe.efi a symlink out of the directory) lands as real files under
        every name; an unchanged copy is not rewritten; patched names are skipped."""
        outside, debian, tftp = self.mktemp(), self.mktemp(), self.mktemp()
        os.makedirs(outside)
        os.makedirs(debian)
        with open(os.path.join(outside, "ipxe.efi"), "wb") as f:
            f.write(b"efi build")
        os.symlink(os.path.join(os.path.abspath(outside), "ipxe.efi"), os.path.join(debian, "ipxe.efi"))
        for name in ("snponly.efi", "undionly.kpxe"):
            with open(os.path.join(debian, name), "wb") as f:
                f.write(name.encode())
        copied = bootfiles.install_stock([debian], tftp, skip=["undionly.kpxe.0"])
        self.assertEqual(sorted(copied), ["ipxe.efi", "snp.efi", "undionly.kpxe"])
        self.assertEqual(copied["ipxe.efi"], os.path.realpath(os.path.join(outside, "ipxe.efi")))
        self.assertFalse(os.path.islink(os.path.join(tftp, "ipxe.efi")))
        with open(os.path.join(tftp, "ipxe.efi"), "rb") as f:
            self.assertEqual(f.read(), b"efi build")
        with open(os.path.join(tftp, "snp.efi"), "rb") as f:
            self.assertEqual(f.read(), b"snponly.efi")
        before = os.stat(os.path.join(tftp, "snp.efi")).st_ino
        bootfiles.install_stock([debian], tftp)
        self.assertEqual(os.stat(os.path.join(tftp, "snp.efi")).st_ino, before)
        self.assertTrue(os.path.isfile(os.path.join(tftp, "undionly.kpxe.0")))


class FatalBindTests(SynchronousTestCase):
    def test_fatal_bind_raises_one_line(self) -> None:
        """As root, a port that cannot be bound stops start-up with one line."""
        fake = RefusingReactor()
        listener = TFTPListener(fake, TFTPProtocol(MemoryAssets(), clock=fake),  # type: ignore[arg-type]
                                69, "", fatal_bind=True)
        with self.assertRaises(TFTPBindError) as caught:
            listener.privilegedStartService()
        self.assertIn("cannot listen on UDP *:69: ", str(caught.exception))
        self.assertIn("--disable-tftp", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))


class LoopbackTests(TestCase):
    """The real TFTP service on loopback: iPXE's request gets the script, others the file."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.binary = b"\x55\xaa" * 3000  # more than one block
        with open(os.path.join(self.root, "undionly.kpxe"), "wb") as f:
            f.write(self.binary)
        with open(os.path.join(self.root, "snponly.efi"), "wb") as f:
            f.write(b"EFI" * 700)
        self.service = make_tftp_service(reactor, roots=[self.root], port=0,
                                         interface="127.0.0.1", chain_script=SCRIPT)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        listener = self.service.getServiceNamed("tftp-udp")  # type: ignore[attr-defined]
        self.port = listener.listening.getHost().port

    async def fetch(self, request: bytes) -> bytes:
        """A minimal TFTP reader (blocking socket in a thread): OACK/DATA until a short block."""
        from twisted.internet.threads import deferToThread

        def run() -> bytes:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            try:
                sock.sendto(request, ("127.0.0.1", self.port))
                out = b""
                blksize = 512
                while True:
                    data, peer = sock.recvfrom(65536)
                    packet = codec.decode(data)
                    if isinstance(packet, codec.OptionAck):
                        blksize = int(packet.options.get("blksize", "512"))
                        sock.sendto(codec.encode_ack(0), peer)
                        continue
                    if isinstance(packet, codec.Error):
                        raise RuntimeError(packet.message)
                    assert isinstance(packet, codec.Data)
                    out += packet.payload
                    sock.sendto(codec.encode_ack(packet.block), peer)
                    if len(packet.payload) < blksize:
                        return out
            finally:
                sock.close()

        result: bytes = await deferToThread(run)
        return result

    async def test_ipxe_gets_chain_script(self) -> None:
        with capturedLogs() as events:
            body = await self.fetch(IPXE_RRQ % b"undionly.kpxe")
        self.assertEqual(body, SCRIPT)
        self.assertTrue(any("sending the chain script" in str(e.get("log_format")) for e in events))
        self.assertEqual(await self.fetch(IPXE_RRQ % b"snp.efi"), SCRIPT)

    async def test_firmware_gets_binary_under_sidero_names(self) -> None:
        rrq = b"\x00\x01%s\x00octet\x00tsize\x000\x00blksize\x001456\x00"
        self.assertEqual(await self.fetch(rrq % b"undionly.kpxe"), self.binary)
        self.assertEqual(await self.fetch(rrq % b"undionly.kpxe.0"), self.binary)
        self.assertEqual(await self.fetch(rrq % b"snp.efi"), b"EFI" * 700)

    async def test_ipxe_gets_other_files_as_they_are(self) -> None:
        with open(os.path.join(self.root, "menu.ipxe"), "wb") as f:
            f.write(b"#!ipxe\necho menu\n")
        self.assertEqual(await self.fetch(IPXE_RRQ % b"menu.ipxe"), b"#!ipxe\necho menu\n")

    async def test_curl_gets_binary(self) -> None:
        """curl, a real TFTP client nobody here wrote, gets the binary under Sidero's name."""
        if shutil.which("curl") is None:
            raise SkipTest("LOUD SKIP: curl is not installed")
        from twisted.internet.threads import deferToThread

        out = self.mktemp()
        done = await deferToThread(subprocess.run, [
            "curl", "-sS", "-m", "10", "-o", out, f"tftp://127.0.0.1:{self.port}/undionly.kpxe.0"],
            capture_output=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.binary)
