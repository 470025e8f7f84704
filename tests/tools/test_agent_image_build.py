"""The pure parts of the agent image builder (tools/agent-image/build.py), against real tools.

The whole build needs root, apt and minutes (scripts/build-agent-image; the boot tests in
tests/integration/test_agent_image.py use its output); these check its pieces in milliseconds:
the cpio writer against GNU cpio, the ELF reader against binutils' readelf, the module
selection, and that the files it copies of the agent are all the agent imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SkipTest, TestCase

from tests.paths import REPO


def load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_image_build",
                                                  REPO / "tools" / "agent-image" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


build = load_builder()


class CpioTests(TestCase):
    def write_tree(self) -> Path:
        root = Path(self.mktemp())
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
        os.chmod(root / "usr/bin/tool", 0o700)
        (root / "etc").mkdir()
        (root / "etc/odd").write_bytes(b"x" * 5)  # a length that needs padding
        os.symlink("usr/bin", root / "bin")
        (root / "dev").mkdir()
        return root

    def test_gnu_cpio_reads_what_we_write(self) -> None:
        if shutil.which("cpio") is None:
            raise SkipTest("LOUD SKIP: no cpio (apt-get install cpio)")
        root = self.write_tree()
        archive = Path(self.mktemp())
        paths = sorted([*(str(p.relative_to(root)) for p in root.rglob("*")), "dev/console"])
        with open(archive, "wb") as f:
            size = build._write_cpio(root, paths, f)
        self.assertEqual(size, archive.stat().st_size)
        self.assertEqual(size % 4, 0)
        listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=open(archive, "rb"),
                                 capture_output=True, text=True, check=True).stdout.splitlines()
        by_name = {line.split()[-1] if "->" not in line else line.split()[-3]: line
                   for line in listing}
        self.assertEqual(sorted(by_name), sorted(paths))
        self.assertTrue(by_name["usr/bin/tool"].startswith("-rwxr-xr-x   1 root     root"))
        self.assertTrue(by_name["etc/odd"].startswith("-rw-r--r--"))
        self.assertTrue(by_name["dev/console"].startswith("crw-------"))
        self.assertIn("5,   1", by_name["dev/console"])
        self.assertIn("bin -> usr/bin", by_name["bin"])
        self.assertIn(" 1970 ", by_name["etc/odd"])  # one fixed mtime
        out = Path(self.mktemp())
        out.mkdir()
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames", "etc/odd",
                        "usr/bin/tool"], stdin=open(archive, "rb"), cwd=out, check=True)
        self.assertEqual((out / "etc/odd").read_bytes(), b"xxxxx")
        self.assertEqual((out / "usr/bin/tool").read_bytes(), b"#!/bin/sh\necho hi\n")

    def test_same_tree_same_bytes(self) -> None:
        """Inode numbers, owners and mtimes come from the writer, not the file system."""
        first, second = self.write_tree(), self.write_tree()
        os.utime(second / "etc/odd", (12345, 12345))
        outputs = []
        for root in (first, second):
            path = Path(self.mktemp())
            with open(path, "wb") as f:
                build._write_cpio(root, ["bin", "etc", "etc/odd", "usr", "usr/bin",
                                         "usr/bin/tool"], f)
            outputs.append(path.read_bytes())
        self.assertEqual(outputs[0], outputs[1])


class ElfTests(TestCase):
    def test_needed_and_interpreter_match_readelf(self) -> None:
        if shutil.which("readelf") is None:
            raise SkipTest("LOUD SKIP: no readelf (apt-get install binutils)")
        binary = Path(os.path.realpath(sys.executable))
        info = build.read_elf(binary)
        self.assertIsNotNone(info)
        dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True,
                                 text=True, check=True).stdout
        needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines()
                  if "(NEEDED)" in line]
        self.assertEqual(info.needed, needed)
        headers = subprocess.run(["readelf", "-l", str(binary)], capture_output=True,
                                 text=True, check=True).stdout
        if "interpreter:" in headers:
            self.assertIn(f"interpreter: {info.interpreter}]", headers)

    def test_not_elf(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"#!/bin/sh\n")
        self.assertIsNone(build.read_elf(path))


class ModuleSelectionTests(TestCase):
    DEP = """kernel/drivers/net/ethernet/intel/e1000/e1000.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/sound/core/snd.ko: kernel/sound/soundcore.ko
kernel/sound/soundcore.ko:
"""

    def test_patterns_and_their_dependencies(self) -> None:
        deps = build.parse_modules_dep(self.DEP)
        chosen = build.select_modules(deps, ["drivers/net/virtio_net.ko",
                                             "drivers/net/ethernet/intel/*"])
        self.assertEqual(chosen, [
            "kernel/drivers/net/ethernet/intel/e1000/e1000.ko",
            "kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko",
            "kernel/net/core/failover.ko"])

    def test_the_agent_modules_are_asked_for(self) -> None:
        patterns = " ".join(build.MODULE_PATTERNS)
        for wanted in ("drivers/char/ipmi/*", "drivers/nvme/host/*", "drivers/ata/*",
                       "drivers/net/virtio_net.ko", "drivers/net/ethernet/intel/*"):
            self.assertIn(wanted, patterns)
        self.assertIn("ipmi_devintf", build.EARLY_MODULES)


class AgentSourcesTests(TestCase):
    def test_the_copied_files_are_all_the_agent_imports(self) -> None:
        """Import the agent with only the copied sidero files on the path: nothing missing."""
        sources = build.agent_sources()
        site = Path(self.mktemp()).resolve()
        for source in sources:
            dest = site / source.relative_to(REPO)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        names = {str(s.relative_to(REPO)) for s in sources}
        self.assertIn("sidero/agent/main.py", names)
        self.assertIn("sidero/proto/agent_pb2_grpc.py", names)
        self.assertNotIn("sidero/tap.py", names)
        script = (f"import json, sys; sys.path.insert(0, {str(site)!r}); "
                  "import sidero.agent.main, sidero.agent.__main__; "
                  "print(json.dumps({n: getattr(m, '__file__', '') for n, m in sys.modules.items()"
                  " if n.split('.')[0] == 'sidero'}))")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                cwd=site, env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        loaded = json.loads(result.stdout)
        self.assertIn("sidero.protocols.dhcp.codec", loaded)
        for name, path in loaded.items():
            self.assertTrue(path.startswith(str(site)), f"{name} came from {path}")

    def test_recipe_key_follows_the_agent_sources(self) -> None:
        self.assertRegex(build.recipe_key(), r"^[0-9a-f]{16}$")
        self.assertEqual(build.recipe_key(), build.recipe_key())
