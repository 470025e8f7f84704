"""deploy/systemd/sidero.service passes systemd-analyze verify and keeps a low exposure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.paths import REPO

UNIT = os.path.join(REPO, "deploy", "systemd", "sidero.service")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def unit_text() -> str:
    with open(UNIT) as f:
        return f.read()


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


class UnitContentTests(SynchronousTestCase):
    """What the unit must say, read from the file itself."""

    def test_exec_start(self) -> None:
        """twistd runs in the foreground without a pidfile, with the sidero plugin."""
        (exec_start,) = directives(unit_text())["ExecStart"]
        argv = exec_start.split()
        self.assertTrue(argv[0].endswith("/twistd"))
        self.assertIn("--nodaemon", argv)
        self.assertIn("--pidfile=", argv)
        self.assertEqual(argv[argv.index("--pidfile=") + 1], "sidero")

    def test_notify_and_watchdog(self) -> None:
        """Type=notify from the main process (twistd), with a watchdog (sidero.systemd)."""
        d = directives(unit_text())
        self.assertEqual(d["Type"], ["notify"])
        self.assertEqual(d["NotifyAccess"], ["main"])
        self.assertEqual(len(d["WatchdogSec"]), 1)
        self.assertTrue(d["WatchdogSec"][0].endswith("s"))

    def test_capabilities_and_families(self) -> None:
        """Bind below 1024, raw/bind-to-device and netlink admin; netlink and packet sockets."""
        d = directives(unit_text())
        for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
            self.assertEqual(set(d[key][0].split()),
                             {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_NET_ADMIN"})
        self.assertEqual(set(d["RestrictAddressFamilies"][0].split()),
                         {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"})
        for key, value in [("StateDirectory", "sidero"), ("NoNewPrivileges", "yes"),
                           ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                           ("PrivateTmp", "yes")]:
            self.assertEqual(d[key], [value], key)
        self.assertTrue(d["EnvironmentFile"][0].startswith("-/"))


class SystemdAnalyzeTests(SynchronousTestCase):
    """systemd-analyze on a copy whose ExecStart points at a twistd that exists here."""

    def setUp(self) -> None:
        if not os.access(SYSTEMD_ANALYZE, os.X_OK):
            raise self.skipException(f"LOUD SKIP: {SYSTEMD_ANALYZE} is not installed")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            twistd = "/bin/true"
        # verify refuses a unit whose ExecStart binary is missing (/usr/bin/twistd is not
        # installed on this machine); only that path changes in the copy.
        text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={twistd}", unit_text(), flags=re.M)
        self.assertEqual(count, 1)
        self.dir = tempfile.mkdtemp(prefix="sidero-unit-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.copy = os.path.join(self.dir, "sidero.service")
        with open(self.copy, "w") as f:
            f.write(text)

    def analyze(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True,
                              timeout=120, cwd=self.dir)

    def test_verify_clean(self) -> None:
        """verify exits 0 and prints no warning (unknown keys and bad values only warn)."""
        result = self.analyze("verify", self.copy)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.strip(), "")

    def test_verify_catches_mistakes(self) -> None:
        """The check above is meaningful: a bad value makes verify print a warning."""
        with open(self.copy) as f:
            text = f.read()
        with open(self.copy, "w") as f:
            f.write(text.replace("ProtectSystem=strict", "ProtectSystem=strictest"))
        self.assertIn("strictest", self.analyze("verify", self.copy).stderr)

    def test_exposure_low(self) -> None:
        """systemd-analyze security rates the hardened unit below 3.0 (OK)."""
        result = self.analyze("security", "--offline=yes", self.copy)
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        assert match is not None
        self.assertLess(float(match.group(1)), 3.0)
