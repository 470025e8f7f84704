#!/usr/bin/env python3
"""Build the discovery agent's boot image (kernel + initramfs) from Debian packages.

Run by C{scripts/build-agent-image} (as root: it needs apt).  Standard library only, so it runs
on a fresh Debian 12 before anything else is installed.  For each architecture:

1. apt, in a private configuration of its own (the host's sources, an empty dpkg status, the
   target architecture, lists and downloads under the cache), resolves L{PACKAGES} with all
   their dependencies and downloads the .debs.  Nothing is installed on the host.
2. Every .deb is unpacked (C{dpkg-deb -x}) into a staging tree; the image takes files from it:
   Python 3.11 and its standard library (tests, IDLE, tkinter... left out), udev, kmod, and every
   shared library these (and the wheels) need, found by reading the ELF files' C{DT_NEEDED}.
3. The agent's Python dependencies are the wheels of C{wheels.lock} (hash-pinned, from PyPI):
   Debian 12's python3-grpcio (1.51) and python3-protobuf (3.21) cannot load the generated Agent
   API code, which checks for grpcio >= 1.85.1 and the protobuf 7 runtime.
4. The agent itself: the modules of C{sidero/} that C{sidero.agent.main} imports at module level,
   and C{/init}, which runs it with C{--early-userspace}.
5. Kernel modules: those matching L{MODULE_PATTERNS} (disks, NICs, IPMI) and what they depend
   on, with a fresh C{depmod}.  They stay signed as Debian ships them (C{module.sig_enforce=1}).
6. Everything is byte-compiled (unchecked-hash .pyc, so no source mtimes are involved), written
   as a newc cpio in sorted order with one owner and one mtime, and zstd-compressed.

Same inputs (the .debs, the wheels, this tree), same bytes: nothing depends on the build time,
the build directory or the order a file system lists files in.  C{manifest.txt} records every
input (package versions and sha256s, wheel sha256s, the host Python that compiled the .pyc).

Output: C{<cache>/<key>/agent-<arch>/{vmlinuz,initramfs.xz,manifest.txt}}, where C{key} hashes
the recipe (this file, the wheel lock, the agent's source files); the last line printed is
C{<cache>/<key>}, laid out like C{<state-dir>/env}.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: Bump to rebuild every cached image (a change this file's hash would not show).
RECIPE_VERSION = "1"
#: The one mtime of every file in the initramfs.
EPOCH = 0


@dataclass(frozen=True)
class Arch:
    name: str  # Debian architecture
    triplet: str  # multiarch directory
    wheel_platforms: tuple[str, ...]
    kernel_package: str


ARCHES = {
    "amd64": Arch("amd64", "x86_64-linux-gnu",
                  ("manylinux_2_36_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"),
                  "linux-image-amd64"),
    "arm64": Arch("arm64", "aarch64-linux-gnu",
                  ("manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64"),
                  "linux-image-arm64"),
}

#: Debian packages resolved (with their dependencies) for each image.
PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "udev", "kmod", "libstdc++6",
            "libgcc-s1")

#: Files of the staging tree that go into the image (globs; libraries follow from DT_NEEDED).
IMAGE_FILES = (
    "usr/bin/python3.11",
    "bin/kmod", "bin/udevadm", "lib/systemd/systemd-udevd",
    "etc/udev/udev.conf",
)
#: udev rules kept: module autoloading (devtmpfs makes the device nodes; the agent needs no
#: /dev/disk links, and the rules that set node groups only warn with --resolve-names=never).
UDEV_RULES = ("80-drivers.rules",)
KMOD_LINKS = ("modprobe", "insmod", "rmmod", "lsmod", "modinfo", "depmod")

#: Standard library parts the agent never imports (and that would only make the image larger).
STDLIB_EXCLUDE = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                  "pydoc_data", "distutils", "venv", "unittest/test", "site-packages",
                  "dist-packages", "turtle.py", "__phello__")
DYNLOAD_EXCLUDE = re.compile(
    r"^(_test\w*|_xxtestfuzz|xxlimited\w*|_ctypes_test|_curses\w*|_dbm|_gdbm|readline|"
    r"audioop|nis|ossaudiodev|_tkinter|_xxsubinterpreters)\.")
#: Parts of the wheels that are only their own test suites.
WHEEL_EXCLUDE = re.compile(r"(^|/)(test|tests)(/|$)")
#: Of Twisted the agent uses only the logger (and what it imports): the rest stays out.
TWISTED_KEEP = ("__init__.py", "_version.py", "py.typed", "logger", "python")

#: Kernel modules (paths under lib/modules/<version>/kernel/) the agent needs: disk
#: controllers, NICs, /dev/ipmi0.  Their dependencies come along.
MODULE_PATTERNS = (
    # storage
    "drivers/ata/*", "drivers/nvme/host/*", "drivers/block/virtio_blk.ko",
    "drivers/block/xen-blkfront.ko", "drivers/mmc/*", "drivers/scsi/sd_mod.ko",
    "drivers/scsi/virtio_scsi.ko", "drivers/scsi/mpt3sas/*", "drivers/scsi/megaraid/*",
    "drivers/scsi/hpsa.ko", "drivers/scsi/smartpqi/*", "drivers/scsi/aacraid/*",
    "drivers/scsi/mpi3mr/*", "drivers/scsi/vmw_pvscsi.ko", "drivers/scsi/hv_storvsc.ko",
    "drivers/scsi/isci/*", "drivers/scsi/3w-*", "drivers/scsi/arcmsr/*",
    "drivers/virtio/*", "drivers/hv/*",
    # network
    "drivers/net/virtio_net.ko", "drivers/net/vmxnet3/*", "drivers/net/hyperv/*",
    "drivers/net/xen-netfront.ko", "drivers/net/phy/*", "drivers/net/mdio/*",
    "drivers/net/ethernet/intel/*", "drivers/net/ethernet/broadcom/*",
    "drivers/net/ethernet/mellanox/mlx4/*", "drivers/net/ethernet/mellanox/mlx5/*",
    "drivers/net/ethernet/realtek/*", "drivers/net/ethernet/qlogic/*",
    "drivers/net/ethernet/amazon/*", "drivers/net/ethernet/google/*",
    "drivers/net/ethernet/emulex/*", "drivers/net/ethernet/cisco/*",
    "drivers/net/ethernet/aquantia/*", "drivers/net/ethernet/marvell/*",
    "drivers/net/ethernet/amd/*", "drivers/net/ethernet/sfc/*",
    "drivers/net/ethernet/stmicro/*",
    # the BMC
    "drivers/char/ipmi/*",
)
#: Loaded by the agent after udev (no device announces them): the /dev/ipmi0 interface.
EARLY_MODULES = ("ipmi_devintf", "ipmi_si", "ipmi_ssif")

INIT = '''#!/usr/bin/python3
"""/init of the sidero agent image: the discovery agent as PID 1 (spec section 4)."""
import sys

from sidero.agent.main import main

# The kernel passes command line words it does not know as arguments: they are not ours.
sys.exit(main(["--early-userspace"]))
'''

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
#: Debian's static groups (base-passwd), so udev rules naming them resolve.
GROUP = "".join(f"{name}:x:{gid}:\n" for name, gid in (
    ("root", 0), ("daemon", 1), ("bin", 2), ("sys", 3), ("adm", 4), ("tty", 5), ("disk", 6),
    ("lp", 7), ("kmem", 15), ("dialout", 20), ("cdrom", 24), ("floppy", 25), ("tape", 26),
    ("audio", 29), ("video", 44), ("utmp", 43), ("input", 101), ("kvm", 102), ("render", 103),
    ("sgx", 104), ("systemd-journal", 105)))


class BuildError(Exception):
    """The build cannot go on; the message says why."""


def log(message: str) -> None:
    print(f"[build-agent-image] {message}", file=sys.stderr, flush=True)


def run(*argv: str | Path, env: dict[str, str] | None = None, quiet: bool = False) -> str:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n"
                         f"{result.stderr[-4000:]}")
    if not quiet and result.stderr.strip():
        log(result.stderr.strip().splitlines()[-1])
    return result.stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- what the agent is -------------------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def agent_sources() -> list[Path]:
    """The files of C{sidero/} the agent imports at module level (plus its packages' inits).

    Imports inside functions are left out: they are the test-only paths (C{--bmc-lan}).
    """
    import ast

    seen: set[str] = set()
    todo = ["sidero.agent.main", "sidero.agent.__main__"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for node in ast.parse(path.read_text()).body:
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            todo += [n for n in names if n.split(".")[0] == "sidero"]
    return sorted(p for p in (_module_file(m) for m in seen) if p is not None)


def recipe_key() -> str:
    """Hash of everything in this tree the images are made from."""
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for path in [Path(__file__).resolve(), HERE / "wheels.lock", *agent_sources()]:
        h.update(str(path.relative_to(REPO)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --- apt in a private configuration ------------------------------------------------------------


class PrivateApt:
    """apt-get for one architecture with its own lists, downloads and an empty dpkg status."""

    def __init__(self, root: Path, arch: Arch) -> None:
        self.root = root
        self.arch = arch
        for d in ("lists/partial", "archives/partial", "cache", "sources.list.d"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "status").write_text("")
        sources = root / "sources.list.d"
        for old in sources.iterdir():
            old.unlink()
        etc = Path("/etc/apt")
        found = False
        if (etc / "sources.list").is_file():
            shutil.copy(etc / "sources.list", sources / "host.list")
            found = True
        for entry in sorted((etc / "sources.list.d").glob("*")):
            if entry.suffix in (".list", ".sources"):
                shutil.copy(entry, sources / entry.name)
                found = True
        if not found:
            raise BuildError("no apt sources in /etc/apt")

    def options(self) -> list[str]:
        r = self.root
        pairs = {
            "APT::Architecture": self.arch.name, "APT::Architectures::": self.arch.name,
            "Dir::State::Lists": r / "lists", "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache", "Dir::Cache::Archives": r / "archives",
            "Dir::Etc::SourceList": "/dev/null", "Dir::Etc::SourceParts": r / "sources.list.d",
            "APT::Install-Recommends": "false", "APT::Install-Suggests": "false",
        }
        return [arg for k, v in pairs.items() for arg in ("-o", f"{k}={v}")]

    def resolve(self, packages: Iterable[str]) -> list[Path]:
        """Update the lists, resolve C{packages} with every dependency, download them."""
        run("apt-get", *self.options(), "-qq", "update", quiet=True)
        install = [*self.options(), "-qq", "-y", "install", *packages]
        # The simulation names every package of the solution (--print-uris leaves out those
        # already downloaded); apt stores each as name_version_arch.deb, ':' quoted.
        plan = run("apt-get", "--simulate", *install, quiet=True)
        names = [f"{n}_{v.replace(':', '%3a')}_{a}.deb" for n, v, a in
                 re.findall(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)", plan, re.M)]
        if not names:
            raise BuildError(f"apt resolved nothing for {' '.join(packages)}:\n{plan}")
        run("apt-get", "--download-only", *install, quiet=True)
        debs = [self.root / "archives" / n for n in names]
        missing = [d.name for d in debs if not d.is_file()]
        if missing:
            raise BuildError(f"apt did not download {', '.join(missing)}")
        return sorted(debs)


def deb_field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", deb, name, quiet=True).strip()


# --- ELF ---------------------------------------------------------------------------------------


@dataclass
class ElfInfo:
    interpreter: str | None = None
    needed: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)


def read_elf(path: Path) -> ElfInfo | None:
    """The interpreter, DT_NEEDED and DT_RUNPATH/RPATH of a 64-bit little-endian ELF file (None
    for anything else)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    info = ElfInfo()
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
        elif p_type == 3:
            info.interpreter = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    if dynamic is None:
        return info
    entries = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, value))
    strtab = next((v for t, v in entries if t == 5), None)
    if strtab is None:
        return info
    base = next((off + strtab - vaddr for vaddr, off, size in loads
                 if vaddr <= strtab < vaddr + size), None)
    if base is None:
        return info

    def string(at: int) -> str:
        end = data.index(b"\0", base + at)
        return data[base + at:end].decode()

    for tag, value in entries:
        if tag == 1:
            info.needed.append(string(value))
        elif tag in (15, 29):
            info.runpath += [p for p in string(value).split(":") if p]
    return info


# --- the image tree ----------------------------------------------------------------------------


def merged(rel: str) -> str:
    """A staging path (Debian 12 packages still use /lib, /bin, /sbin) in the usr-merged image."""
    for top in ("lib", "bin", "sbin", "lib64"):
        if rel == top or rel.startswith(top + "/"):
            return "usr/" + rel
    return rel


class ImageTree:
    """The initramfs being assembled on disk (C{root}) from a staging tree of unpacked .debs."""

    def __init__(self, root: Path, staging: Path, arch: Arch) -> None:
        self.root = root
        self.staging = staging
        self.arch = arch
        root.mkdir(parents=True)
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "dev", "proc", "sys",
                  "run", "tmp", "root", "var"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for top in ("bin", "sbin", "lib", "lib64"):
            os.symlink(f"usr/{top}", root / top)

    def add_staged(self, rel: str) -> str:
        """Copy one staging file (following and copying symlinks); its path in the image."""
        src = self.staging / rel
        dest_rel = merged(rel)
        dest = self.root / dest_rel
        if os.path.lexists(dest):
            return dest_rel
        if not os.path.lexists(src):
            raise BuildError(f"{rel} is in none of the packages")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target = os.readlink(src)
            os.symlink(target, dest)
            resolved = (target.lstrip("/") if target.startswith("/")
                        else os.path.normpath(os.path.join(os.path.dirname(rel), target)))
            self.add_staged(resolved)
        elif src.is_dir():
            dest.mkdir(exist_ok=True)
        else:
            shutil.copy2(src, dest)
        return dest_rel

    def add_tree(self, rel: str, exclude: Iterable[str] = ()) -> None:
        base = self.staging / rel
        skip = tuple(exclude)
        for dirpath, dirnames, filenames in os.walk(base):
            sub = os.path.relpath(dirpath, base)
            dirnames[:] = sorted(d for d in dirnames
                                 if os.path.normpath(os.path.join(sub, d)) not in skip)
            for name in sorted(filenames):
                inner = os.path.normpath(os.path.join(sub, name))
                if inner in skip:
                    continue
                self.add_staged(os.path.join(rel, inner))

    def write(self, rel: str, content: str | bytes, mode: int = 0o644) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        os.chmod(path, mode)

    def library_dirs(self) -> list[str]:
        t = self.arch.triplet
        return [f"lib/{t}", f"usr/lib/{t}", "lib", "usr/lib"]

    def resolve_libraries(self) -> list[str]:
        """Add every library an ELF file of the image needs, until none is missing."""
        added: list[str] = []
        done: set[str] = set()
        while True:
            pending = []
            for path in sorted(self.files()):
                rel = str(path.relative_to(self.root))
                if rel in done or path.is_symlink():
                    continue
                done.add(rel)
                info = read_elf(path)
                if info is not None:
                    pending.append((rel, info))
            if not pending:
                return added
            for rel, info in pending:
                wanted = list(info.needed)
                if info.interpreter:
                    self._add_interpreter(info.interpreter)
                for name in wanted:
                    if self._in_image(rel, name, info.runpath):
                        continue
                    for d in self.library_dirs():
                        if os.path.lexists(self.staging / d / name):
                            added.append(self.add_staged(f"{d}/{name}"))
                            break
                    else:
                        raise BuildError(f"{rel} needs {name}, which no package provides")

    def _add_interpreter(self, interpreter: str) -> None:
        self.add_staged(interpreter.lstrip("/"))

    def _in_image(self, rel: str, name: str, runpath: list[str]) -> bool:
        origin = os.path.dirname("/" + rel)
        dirs = [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in runpath]
        dirs += ["/" + merged(d) for d in self.library_dirs()]
        return any(os.path.exists(self.root / os.path.normpath(d).lstrip("/") / name)
                   for d in dirs)

    def files(self) -> Iterator[Path]:
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                yield Path(dirpath) / name


# --- kernel modules ----------------------------------------------------------------------------


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    deps = {}
    for line in text.splitlines():
        if ":" in line:
            module, _, rest = line.partition(":")
            deps[module.strip()] = rest.split()
    return deps


def select_modules(deps: dict[str, list[str]], patterns: Iterable[str]) -> list[str]:
    """Modules (paths relative to the version directory) matching C{patterns}, with their
    dependencies."""
    pats = [f"kernel/{p}" for p in patterns]
    chosen = {m for m in deps if any(fnmatch.fnmatch(m, p) for p in pats)}
    todo = list(chosen)
    while todo:
        for dep in deps.get(todo.pop(), []):
            if dep not in chosen:
                chosen.add(dep)
                todo.append(dep)
    return sorted(chosen)


def install_modules(staging: Path, tree: ImageTree) -> tuple[str, int]:
    versions = sorted(p.name for p in (staging / "lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1:
        raise BuildError(f"expected one kernel in the packages, found {versions}")
    version = versions[0]
    run("depmod", "-b", staging, version, quiet=True)
    src = staging / "lib/modules" / version
    deps = parse_modules_dep((src / "modules.dep").read_text())
    chosen = select_modules(deps, MODULE_PATTERNS)
    dest = tree.root / "usr/lib/modules" / version
    for module in chosen:
        (dest / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / module, dest / module)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    run("depmod", "-b", tree.root, version, quiet=True)
    return version, len(chosen)


# --- Python ------------------------------------------------------------------------------------


def download_wheels(cache: Path, arch: Arch, pip: list[str]) -> list[Path]:
    """The wheels of wheels.lock for C{arch}, checked against their hashes by pip."""
    dest = cache / f"wheels-{arch.name}"
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in arch.wheel_platforms for a in ("--platform", p)]
    run(*pip, "download", "--quiet", "--disable-pip-version-check", "--no-deps",
        "--require-hashes", "--only-binary=:all:", *platforms, "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
        "-d", dest, "-r", HERE / "wheels.lock", quiet=True)
    wanted = locked_names()
    wheels = sorted(w for w in dest.glob("*.whl") if _wheel_key(w.name) in wanted
                    and _wheel_fits(w.name, arch))
    found = {_wheel_key(w.name) for w in wheels}
    if found != wanted:
        raise BuildError(f"wheels missing for {arch.name}: {sorted(wanted - found)}")
    return wheels


def locked_names() -> set[str]:
    out = set()
    for line in (HERE / "wheels.lock").read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", line)
        if found:
            out.add(f"{_normalise(found[1])}-{found[2]}")
    return out


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_key(filename: str) -> str:
    name, version = filename.split("-")[:2]
    return f"{_normalise(name)}-{version}"


def _wheel_fits(filename: str, arch: Arch) -> bool:
    platform = filename[:-4].split("-")[-1]
    return platform == "any" or any(p in platform.split(".") for p in arch.wheel_platforms)


def install_wheel(wheel: Path, site: Path) -> None:
    """Unpack a wheel into site-packages (what an installer does for these wheels: no
    scripts are needed, and C{.data/purelib|platlib} are merged in)."""
    with zipfile.ZipFile(wheel) as z:
        for entry in sorted(z.infolist(), key=lambda e: e.filename):
            name = entry.filename
            if name.endswith("/"):
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            if WHEEL_EXCLUDE.search(os.path.dirname(name)):
                continue
            if parts[0] == "twisted" and len(parts) > 1 and parts[1] not in TWISTED_KEEP:
                continue
            target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(entry))
            executable = (entry.external_attr >> 16) & 0o111
            os.chmod(target, 0o755 if executable or name.endswith(".so") else 0o644)


COMPILE = r"""
import importlib.util, os, py_compile, sys
root, errors = sys.argv[1], []
for top in sys.argv[2:]:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                py_compile.compile(path, cfile=importlib.util.cache_from_source(path),
                                   dfile="/" + os.path.relpath(path, root), doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            except py_compile.PyCompileError as e:
                errors.append(os.path.relpath(path, root))
print("\n".join(errors))
"""


def compile_python(root: Path, tops: Iterable[str]) -> list[str]:
    """Byte-compile with the host's Python 3.11 (bytecode is the same on every architecture).
    Returns the files that do not compile (they stay source only)."""
    if sys.version_info[:2] != (3, 11):
        raise BuildError(f"the .pyc must come from Python 3.11, this is {sys.version.split()[0]}")
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    out = run(sys.executable, "-I", "-c", COMPILE, root, *tops, env=env, quiet=True)
    return [line for line in out.splitlines() if line]


# --- the archive -------------------------------------------------------------------------------


class NewcWriter:
    """A newc cpio archive (the kernel's initramfs format) with fixed owners and mtimes."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.inode = 0
        self.offset = 0

    def _put(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
              nlink: int = 1) -> None:
        self.inode += 1
        encoded = name.encode() + b"\0"
        fields = (self.inode, mode, 0, 0, nlink, EPOCH, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._put(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._put(b"\0" * (-self.offset % 4))
        self._put(data)
        self._put(b"\0" * (-self.offset % 4))

    def close(self) -> None:
        self.inode = 0
        self.entry("TRAILER!!!", 0, nlink=1)


#: Device nodes /init needs before it mounts devtmpfs: the console for its output, and
#: /dev/urandom, which Python reads for its hash seed when getrandom() has no entropy yet.
DEVICES = {"dev/console": (0o600, 5, 1), "dev/null": (0o666, 1, 3),
           "dev/urandom": (0o666, 1, 9)}
#: zstd: the kernel unpacks it 2.7 times faster than xz (4.6 s against 12.3 s under TCG).
ZSTD = ("zstd", "-q", "-19", "-T1", "--no-progress", "-c")


def write_initramfs(root: Path, output: Path) -> int:
    """Every entry of C{root} in sorted order, plus L{DEVICES}, as a zstd-compressed newc cpio
    (named initramfs.xz, the name Sidero's environments use: the kernel reads the format from
    the data); returns the size of the cpio."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    tmp = output.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        proc = subprocess.Popen(ZSTD, stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        size = _write_cpio(root, sorted(paths + list(DEVICES)), proc.stdin)
        proc.stdin.close()
        if proc.wait() != 0:
            raise BuildError(f"{' '.join(ZSTD)} failed ({proc.returncode})")
    os.replace(tmp, output)
    return size


def _write_cpio(root: Path, paths: list[str], out: IO[bytes]) -> int:
    cpio = NewcWriter(out)
    for rel in paths:
        if rel in DEVICES:
            mode, major, minor = DEVICES[rel]
            cpio.entry(rel, stat.S_IFCHR | mode, rdev=(major, minor))
            continue
        path = root / rel
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            cpio.entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            cpio.entry(rel, stat.S_IFDIR | 0o755, nlink=2)
        else:
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            cpio.entry(rel, stat.S_IFREG | mode, path.read_bytes())
    cpio.close()
    return cpio.offset


# --- one image ---------------------------------------------------------------------------------


def build_arch(arch: Arch, cache: Path, out: Path, pip: list[str]) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"agent-image-{arch.name}-") as tmp:
        work = Path(tmp)
        log(f"{arch.name}: resolving Debian packages")
        debs = PrivateApt(cache / f"apt-{arch.name}", arch).resolve(
            [*PACKAGES, arch.kernel_package])
        staging = work / "staging"
        staging.mkdir()
        manifest = [f"# sidero agent image {arch.name}, recipe {recipe_key()}",
                    f"python-compiler {sys.version.split()[0]}",
                    f"compressor {run('zstd', '-V', quiet=True).strip()}", ""]
        for deb in debs:
            run("dpkg-deb", "-x", deb, staging, quiet=True)
            manifest.append(f"deb {deb_field(deb, 'Package')} {deb_field(deb, 'Version')} "
                            f"{sha256(deb)}")
        log(f"{arch.name}: {len(debs)} packages unpacked")
        tree = ImageTree(work / "root", staging, arch)
        for rel in IMAGE_FILES:
            tree.add_staged(rel)
        os.symlink("python3.11", tree.root / "usr/bin/python3")
        for link in KMOD_LINKS:
            os.symlink("../bin/kmod", tree.root / "usr/sbin" / link)
        for rule in UDEV_RULES:
            tree.add_staged(f"lib/udev/rules.d/{rule}")
        tree.add_tree("usr/lib/python3.11", exclude=STDLIB_EXCLUDE)
        dynload = tree.root / "usr/lib/python3.11/lib-dynload"
        for so in sorted(dynload.iterdir()):
            if DYNLOAD_EXCLUDE.match(so.name):
                so.unlink()
        site = tree.root / "usr/lib/python3/dist-packages"
        site.mkdir(parents=True)
        for wheel in download_wheels(cache, arch, pip):
            install_wheel(wheel, site)
            manifest.append(f"wheel {wheel.name} {sha256(wheel)}")
        for source in agent_sources():
            in_tree = source.relative_to(REPO)
            (site / in_tree).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, site / in_tree)
            manifest.append(f"source {in_tree} {sha256(source)}")
        tree.write("init", INIT, 0o755)
        tree.write("etc/passwd", PASSWD)
        tree.write("etc/group", GROUP)
        tree.write("etc/modules", "".join(f"{m}\n" for m in EARLY_MODULES))
        version, count = install_modules(staging, tree)
        manifest.append(f"kernel {version} ({count} modules)")
        libraries = tree.resolve_libraries()
        log(f"{arch.name}: {len(libraries)} shared libraries, {count} kernel modules")
        uncompiled = compile_python(tree.root, ["usr/lib/python3.11", "usr/lib/python3"])
        if uncompiled:
            log(f"{arch.name}: {len(uncompiled)} files left as source only "
                f"(not Python 3.11 syntax): {', '.join(uncompiled[:5])}")
        tree.write("etc/sidero-agent-image", "\n".join(manifest) + "\n")
        staged = out.parent / f".{out.name}.part"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        kernel = staging / "boot" / f"vmlinuz-{version}"
        write_kernel(kernel, staged / "vmlinuz")
        cpio_size = write_initramfs(tree.root, staged / "initramfs.xz")
        manifest += ["", f"output vmlinuz {sha256(staged / 'vmlinuz')} "
                     f"{(staged / 'vmlinuz').stat().st_size}",
                     f"output initramfs.xz {sha256(staged / 'initramfs.xz')} "
                     f"{(staged / 'initramfs.xz').stat().st_size} (cpio {cpio_size})",
                     f"build-seconds {time.monotonic() - started:.0f}"]
        (staged / "manifest.txt").write_text("\n".join(manifest) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staged, out)
    log(f"{arch.name}: built in {time.monotonic() - started:.0f} s: {out}")


def write_kernel(src: Path, dest: Path) -> None:
    """The kernel as the firmware loads it: arm64's Debian vmlinuz is a gzip of the EFI-stub
    Image (GRUB unpacks it, iPXE does not), so it is unpacked here."""
    data = src.read_bytes()
    if data[:2] == b"\x1f\x8b":
        import gzip

        data = gzip.decompress(data)
    dest.write_bytes(data)


# --- the lock file -----------------------------------------------------------------------------


def lock(pip: list[str]) -> None:
    """Resolve requirements.in for both architectures and pin every wheel by hash."""
    hashes: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHES.values():
            dest = Path(tmp) / arch.name
            platforms = [a for p in arch.wheel_platforms for a in ("--platform", p)]
            run(*pip, "download", "--quiet", "--disable-pip-version-check",
                "--only-binary=:all:", *platforms, "--python-version", "3.11",
                "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
                "-d", dest, "-r", HERE / "requirements.in", quiet=True)
            for wheel in dest.glob("*.whl"):
                name, version = wheel.name.split("-")[:2]
                hashes.setdefault(f"{_normalise(name)}=={version}", set()).add(sha256(wheel))
    lines = ["# Generated by `python3 tools/agent-image/build.py --lock` from requirements.in:",
             "# every wheel of the agent image, for amd64 and arm64, pinned by sha256.", ""]
    for req in sorted(hashes):
        pins = " ".join(f"--hash=sha256:{h}" for h in sorted(hashes[req]))
        lines.append(f"{req} {pins}")
    (HERE / "wheels.lock").write_text("\n".join(lines) + "\n")


def pip_command(cache: Path) -> list[str]:
    """pip from a virtual environment under the cache (Debian's python3 has no pip)."""
    venv = cache / "pip-venv"
    if not (venv / "bin" / "pip").exists():
        run(sys.executable, "-m", "venv", venv, quiet=True)
    return [str(venv / "bin" / "python"), "-m", "pip"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", choices=sorted(ARCHES),
                   help="architecture to build (repeatable; default: all)")
    p.add_argument("--cache", type=Path, default=Path(
        os.environ.get("SIDERO_CACHE_DIR", "/var/cache/sidero-test")) / "agent-image")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--lock", action="store_true", help="regenerate wheels.lock and exit")
    p.add_argument("--key", action="store_true", help="print the recipe key and exit")
    args = p.parse_args(argv)
    if args.key:
        print(recipe_key())
        return 0
    try:
        args.cache.mkdir(parents=True, exist_ok=True)
        pip = pip_command(args.cache)
        if args.lock:
            lock(pip)
            return 0
        images = args.cache / recipe_key()
        for name in args.arch or sorted(ARCHES):
            out = images / f"agent-{name}"
            if not args.force and all((out / f).is_file() for f in
                                      ("vmlinuz", "initramfs.xz", "manifest.txt")):
                log(f"{name}: cached in {out}")
                continue
            build_arch(ARCHES[name], args.cache, out, pip)
    except BuildError as e:
        log(f"failed: {e}")
        return 1
    print(images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
