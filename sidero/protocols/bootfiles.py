# -*- test-case-name: tests.protocols.test_bootfiles -*-
"""The iPXE binaries served over TFTP and C{/tftp/} (spec §3.3, §3.4): names, sources, and
what an iPXE client gets instead.

Names. Sites' DHCP servers and proxy setups name the files the Go Sidero serves
(L{SERVED_NAMES}); each is looked up in every root under the names a build may carry
(L{ALIASES}): Sidero's own (C{snp.efi}) first, then Debian's (C{snponly.efi}).

The chain script. Sidero's binaries embed the chain script, so a machine whose site DHCP
server hands out C{undionly.kpxe} again to the iPXE it just loaded runs the script instead of
loading itself forever. Two ways give the same result here:

* Sidero-style builds (a C{# *PLACEHOLDER START*} ... C{# *PLACEHOLDER END*} region, as
  C{EMBED=} of the siderolabs ipxe package leaves) put in C{<state-dir>/ipxe/} are patched at
  start-up with the rendered script (L{install_patched}, §3.3).
* Stock binaries (Debian's C{ipxe} package, whose builds have no embedded script and whose
  sources Debian's mirror here does not serve) are served as they are to firmware, and an
  iPXE client asking for any of these names gets the chain script itself: iPXE recognises a
  script by its C{#!ipxe} magic whatever the file is called, so running the script is exactly
  what an embedded build would do. iPXE is recognised by its TFTP request (L{is_ipxe_tftp}:
  exactly C{blksize 1432} then C{tsize 0}, which no firmware PXE client sends: EDK2 asks for
  C{tsize} first or not at all and with its own block size, ROMs ask for 1456 or 1468) and
  over HTTP by its C{User-Agent} (L{is_ipxe_http}).

Everything here is a pure function except L{install_patched} (files, one subprocess), which
runs once at start-up before anything is served.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

#: Every name the Go Sidero serves over TFTP and /tftp/ (§3.4), BIOS first.
SERVED_NAMES: tuple[str, ...] = (
    "undionly.kpxe",
    "undionly.kpxe.0",
    "ipxe.efi",
    "snp.efi",
    "ipxe-arm64.efi",
    "snp-arm64.efi",
)

#: Requested name -> file names looked for in each root, in order.  Debian ships
#: C{snponly.efi} and (from trixie on) C{ipxe-amd64.efi}/C{ipxe-arm64.efi}; earlier versions
#: of this project handed out the C{snponly} names, which keep working.
ALIASES: Mapping[str, tuple[str, ...]] = {
    "undionly.kpxe": ("undionly.kpxe",),
    "undionly.kpxe.0": ("undionly.kpxe.0", "undionly.kpxe"),
    "ipxe.efi": ("ipxe.efi", "ipxe-amd64.efi"),
    "snp.efi": ("snp.efi", "snponly.efi"),
    "ipxe-arm64.efi": ("ipxe-arm64.efi",),
    "snp-arm64.efi": ("snp-arm64.efi", "snponly-arm64.efi", "ipxe-arm64.efi"),
    "snponly.efi": ("snponly.efi", "snp.efi"),
    "snponly-arm64.efi": ("snponly-arm64.efi", "snp-arm64.efi", "ipxe-arm64.efi"),
}

#: Names an iPXE client is given the chain script for.
CHAIN_NAMES = frozenset(ALIASES)

#: iPXE's TFTP request block size (C{TFTP_MAX_BLKSIZE}, unchanged since 2008).
IPXE_TFTP_BLKSIZE = "1432"


def candidates(name: str) -> tuple[str, ...]:
    """The file names to look for when C{name} is requested (just C{name} for other files)."""
    return ALIASES.get(name, (name,))


def is_ipxe_tftp(options: Mapping[str, str]) -> bool:
    """Whether a TFTP read request with these options (in wire order) comes from iPXE.

    iPXE's C{tftp_send_rrq} always sends C{blksize 1432} then C{tsize 0} and nothing else.
    """
    return [(k.lower(), v) for k, v in options.items()] == [
        ("blksize", IPXE_TFTP_BLKSIZE), ("tsize", "0")]


def is_ipxe_http(user_agent: bytes | None) -> bool:
    """Whether an HTTP request comes from iPXE (C{User-Agent: iPXE/<version>})."""
    return user_agent is not None and user_agent.startswith(b"iPXE/")


def wants_chain_script(name: str, ipxe: bool) -> bool:
    """Whether to answer a request for C{name} with the chain script instead of the file."""
    return ipxe and name.lstrip("/") in CHAIN_NAMES


# --- Sidero-style builds with a placeholder (§3.3) ---------------------------------------

PLACEHOLDER_START = b"# *PLACEHOLDER START*"
PLACEHOLDER_END = b"# *PLACEHOLDER END*"

#: (source under <state-dir>/ipxe, served name), as the Go Sidero lays them out.
PATCHED_EFI: tuple[tuple[str, str], ...] = (
    ("amd64/ipxe.efi", "ipxe.efi"),
    ("amd64/snp.efi", "snp.efi"),
    ("arm64/ipxe.efi", "ipxe-arm64.efi"),
    ("arm64/snp.efi", "snp-arm64.efi"),
)
KPXE_BIN = "amd64/kpxe/undionly.kpxe.bin"
KPXE_ZINFO = "amd64/kpxe/undionly.kpxe.zinfo"
KPXE_NAMES = ("undionly.kpxe", "undionly.kpxe.0")


class PatchError(Exception):
    """A Sidero-style build cannot be patched; the message names the file and why."""


def patch_placeholder(binary: bytes, script: bytes, what: str = "binary") -> bytes:
    """Replace the placeholder region of C{binary} with C{script} padded with newlines.

    The region runs from C{# *PLACEHOLDER START*} to the end of C{# *PLACEHOLDER END*}; the
    result has the length of the input, so nothing else in the image moves.

    @raise PatchError: no (or a broken) region, or the script does not fit.
    """
    start = binary.find(PLACEHOLDER_START)
    if start < 0:
        raise PatchError(f"{what}: no {PLACEHOLDER_START.decode()} region (not built with"
                         " the placeholder script)")
    end = binary.find(PLACEHOLDER_END, start)
    if end < 0:
        raise PatchError(f"{what}: {PLACEHOLDER_START.decode()} without"
                         f" {PLACEHOLDER_END.decode()}")
    end += len(PLACEHOLDER_END)
    size = end - start
    if len(script) > size:
        raise PatchError(f"{what}: the script is {len(script)} bytes, the placeholder"
                         f" {size}")
    return binary[:start] + script + b"\n" * (size - len(script)) + binary[end:]


@dataclass(frozen=True)
class Installed:
    """What L{install_patched} wrote: served name -> the build it came from."""

    files: Mapping[str, str]


Zbin = Callable[[str, str], bytes]


def run_zbin(zbin: str) -> Zbin:
    """C{zbin <bin> <zinfo>} (iPXE's compressor, shipped beside the build) as a function."""

    def compress(binary: str, zinfo: str) -> bytes:
        try:
            done = subprocess.run([zbin, binary, zinfo], capture_output=True, check=False,
                                  timeout=60)
        except OSError as e:
            raise PatchError(f"{zbin}: {e.strerror or e}") from e
        if done.returncode != 0:
            raise PatchError(f"{zbin} {binary} failed ({done.returncode}): "
                             f"{done.stderr.decode(errors='replace').strip()[:300]}")
        return done.stdout

    return compress


def _write_atomic(directory: str, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def install_patched(source_dir: str, tftp_dir: str, script: bytes,
                    zbin: Zbin | None = None) -> Installed:
    """Patch every Sidero-style build found under C{source_dir} into C{tftp_dir} (§3.3).

    Builds that are absent are skipped (stock binaries serve those names); one that is
    present and cannot be patched is an error, as in the Go Sidero. The BIOS build is the
    uncompressed C{undionly.kpxe.bin} plus its C{.zinfo}; it is patched, then compressed by
    C{zbin} (default: the C{zbin} program in C{source_dir}, else on C{PATH}).

    @raise PatchError: a present build cannot be patched or compressed.
    """
    written: dict[str, str] = {}
    if not os.path.isdir(source_dir):
        return Installed(written)
    os.makedirs(tftp_dir, exist_ok=True)
    for relative, name in PATCHED_EFI:
        path = os.path.join(source_dir, relative)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        _write_atomic(tftp_dir, name, patch_placeholder(data, script, path))
        written[name] = path
    kpxe = os.path.join(source_dir, KPXE_BIN)
    zinfo = os.path.join(source_dir, KPXE_ZINFO)
    if os.path.isfile(kpxe):
        if not os.path.isfile(zinfo):
            raise PatchError(f"{kpxe}: {zinfo} is missing")
        with open(kpxe, "rb") as f:
            patched = patch_placeholder(f.read(), script, kpxe)
        if zbin is None:
            local = os.path.join(source_dir, "zbin")
            zbin = run_zbin(local if os.access(local, os.X_OK) else "zbin")
        with tempfile.TemporaryDirectory(dir=tftp_dir) as tmp:
            patched_path = os.path.join(tmp, "undionly.kpxe.bin.patched")
            with open(patched_path, "wb") as f:
                f.write(patched)
            compressed = zbin(patched_path, zinfo)
        if not compressed:
            raise PatchError(f"zbin produced nothing for {kpxe}")
        for name in KPXE_NAMES:
            _write_atomic(tftp_dir, name, compressed)
            written[name] = kpxe
    return Installed(written)


def install_stock(search: Sequence[str], tftp_dir: str, skip: Sequence[str] = ()) -> dict[str, str]:
    """Copy the stock build for each served name (first directory, first alias) into
    C{tftp_dir} under Sidero's name; returns served name -> the file it came from.

    Copies, not links: Debian's C{/usr/lib/ipxe/ipxe.efi} is a symlink to C{/boot}, which the
    TFTP server (rightly) refuses to follow out of its root, and the TFTP directory then
    holds every name the Go Sidero serves, as there. A copy is rewritten only when it differs.
    """
    copied: dict[str, str] = {}
    os.makedirs(tftp_dir, exist_ok=True)
    for name in SERVED_NAMES:
        if name in skip:
            continue
        source = next((os.path.join(root, c) for root in search for c in candidates(name)
                       if os.path.isfile(os.path.join(root, c))), None)
        if source is None:
            continue
        with open(source, "rb") as f:
            data = f.read()
        target = os.path.join(tftp_dir, name)
        try:
            with open(target, "rb") as f:
                same = f.read() == data
        except OSError:
            same = False
        if not same:
            _write_atomic(tftp_dir, name, data)
        copied[name] = os.path.realpath(source)
    return copied


def locate(roots: Sequence[str]) -> dict[str, str | None]:
    """Served name -> the file that answers it (first root, first alias), or None."""
    found: dict[str, str | None] = {}
    for name in SERVED_NAMES:
        found[name] = None
        for root in roots:
            hit = next((os.path.join(root, c) for c in candidates(name)
                        if os.path.isfile(os.path.join(root, c))), None)
            if hit is not None:
                found[name] = hit
                break
    return found
