"""bench/http/bench_http.py at a tiny size: it runs both servers, every download is checked,
and its table has both rows and the ratio."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.paths import REPO, tree_env


class BenchHTTPTests(TestCase):
    def test_tiny_run(self) -> None:
        missing = [t for t in ("curl", "nginx") if shutil.which(t) is None]
        if missing:
            raise SkipTest(f"missing {', '.join(missing)} (scripts/install-test-deps installs them)")
        res = subprocess.run(
            [sys.executable, "-m", "bench.http.bench_http", "--clients", "3", "--size-mib", "2",
             "--rounds", "1"],
            cwd=REPO, env=tree_env(), capture_output=True, text=True, timeout=180)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        rows = {m.group(1): float(m.group(2)) for m in re.finditer(
            r"^(sidero|nginx|ratio)\s+([\d.]+)\s+[\d.]+\s+[\d.]+", res.stdout, re.M)}
        self.assertEqual(set(rows), {"sidero", "nginx", "ratio"}, res.stdout)
        self.assertGreater(rows["sidero"], 0)
        self.assertGreater(rows["nginx"], 0)
        self.assertLess(abs(rows["ratio"] - rows["sidero"] / rows["nginx"]), 0.02, res.stdout)


class RouteCPUTests(TestCase):
    def test_tiny_run(self) -> None:
        """bench/http/route_cpu.py: every route answers 200 through both sites (it exits
        otherwise) and the table has a row per route with both figures."""
        res = subprocess.run(
            [sys.executable, "-m", "bench.http.route_cpu", "--requests", "30", "--rounds", "1",
             "--servers", "40", "--classes", "3", "--machines", "5"],
            cwd=REPO, env=tree_env(), capture_output=True, text=True, timeout=180)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        rows = re.findall(r"^\| (/\S+) \| (\d+) \[\d+-\d+\] \| (\d+) \[\d+-\d+\] \| -?\d+% \|$",
                          res.stdout, re.M)
        self.assertEqual([r[0] for r in rows], ["/boot.ipxe", "/ipxe", "/configdata"], res.stdout)
        for _, direct, routed in rows:
            self.assertGreater(int(direct), 0, res.stdout)
            self.assertGreater(int(routed), 0, res.stdout)
