"""bench/bootstorm at a tiny size: both pipelines boot every machine and the table has both."""

from __future__ import annotations

import re
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.netlab import missing_requirements
from tests.paths import REPO, tree_env


class BenchBootStormTests(TestCase):
    def test_tiny_run(self) -> None:
        reason = missing_requirements(("dnsmasq", "nginx", "curl"))
        if reason:
            raise SkipTest(reason)
        res = subprocess.run(
            [sys.executable, "-m", "bench.bootstorm.bench_bootstorm", "--machines", "6",
             "--per-client", "3", "--kernel-mib", "1", "--initrd-mib", "2", "--runs", "1"],
            cwd=REPO, env=tree_env(), capture_output=True, text=True, timeout=300)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        rows = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in re.finditer(
            r"^(sidero|dnsmasq\+nginx)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+)\s+-?\d+$",
            res.stdout, re.M)}
        self.assertEqual(set(rows), {"sidero", "dnsmasq+nginx"}, res.stdout)
        for name, (seconds, failed) in rows.items():
            self.assertGreater(seconds, 0, name)
            self.assertEqual(failed, 0, res.stdout)
        self.assertRegex(res.stdout, r"(?m)^ratio\s+[\d.]+")
        # sidero counted every request of the storm: 6 machines, one of each, two assets.
        self.assertIn("/boot.ipxe 6, /ipxe 6, /env 12", res.stdout)
