"""bench/fuzz at CI size: every target from its committed corpus for 2 000 inputs, no crash.

The corpus holds the inputs that once crashed a target (C{crash-*}), so this is also their
regression run.  The full pass (1 000 000 inputs per target) is C{python -m bench.fuzz --all}.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from bench.fuzz import run as fuzz_run
from bench.fuzz.__main__ import CORPUS
from bench.fuzz.targets import TARGETS, frames, join_frames
from tests.paths import REPO

SHORT_RUNS = 2000
#: The committed corpus stays small (the issue asks for a few hundred KB at most).
MAX_CORPUS_BYTES = 400 * 1024


class ShortPassTests(SynchronousTestCase):
    def test_every_target_short_pass(self) -> None:
        """Each target runs SHORT_RUNS inputs (its corpus first) without a crash, and the
        driver's table names every target with its input count."""
        if importlib.util.find_spec("atheris") is None:
            raise SkipTest("atheris is not installed (setup.cfg's test extra installs it on "
                           "x86_64; it has no wheel for this platform)")
        proc = subprocess.run(
            [sys.executable, "-m", "bench.fuzz", "--all", "--runs", str(SHORT_RUNS), "--jobs", "2",
             "--seed", "1"], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr[-4000:] + proc.stdout)
        rows = {}
        for line in proc.stdout.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 9 and cells[0] in TARGETS:
                rows[cells[0]] = cells
        self.assertEqual(set(rows), set(TARGETS), proc.stdout)
        for name, cells in rows.items():
            self.assertGreaterEqual(int(cells[1]), SHORT_RUNS, f"{name}: {cells}")
            self.assertEqual(cells[8], "0", f"{name} crashed")


class CorpusTests(SynchronousTestCase):
    def test_every_target_has_seeds_and_the_corpus_is_small(self) -> None:
        """Every target starts from seeds (real clients' captures or the tests' packets), and
        the whole committed corpus stays within MAX_CORPUS_BYTES."""
        total = 0
        for name in TARGETS:
            files = [p for p in (CORPUS / name).iterdir() if p.is_file()]
            self.assertTrue(any(p.name.startswith(("seed-", "real-")) for p in files), name)
            total += sum(p.stat().st_size for p in files)
        self.assertLessEqual(total, MAX_CORPUS_BYTES)

    def test_frames_round_trip(self) -> None:
        """Seeds built with join_frames come back as the same frames."""
        parts = [b"", b"a", b"x" * 300]
        self.assertEqual(frames(join_frames(parts)), parts)
        self.assertEqual(frames(b"\x00"), [b"\x00"])


class GuardTests(SynchronousTestCase):
    def test_memory_growth_after_warmup_is_a_crash(self) -> None:
        """An input function that keeps what it is given fails once the peak RSS has grown
        past the bound after warm-up; one that keeps nothing does not."""
        self.patch(fuzz_run, "WARMUP", 1024)
        kept: list[bytes] = []
        growing = fuzz_run.Guard(lambda data: kept.append(bytes(64 * 1024)), growth_mb=16)
        with self.assertRaises(fuzz_run.MemoryGrowth) as raised:
            for _ in range(20_000):
                growing(b"")
        self.assertRegex(str(raised.exception), re.compile(r"grew from \d+ kB"))
        kept.clear()
        steady = fuzz_run.Guard(lambda data: None, growth_mb=16)
        for _ in range(5000):
            steady(b"")
        self.assertGreater(steady.baseline, 0)
