"""Fuzz every network parser under atheris: ``python -m bench.fuzz --all [--runs 1000000]``.

Each target runs in its own process (libFuzzer exits when it is done) starting from its
committed corpus in C{bench/fuzz/corpus/<target>/}; the inputs it finds that add coverage go
to a scratch directory and, with C{--merge}, the ones that add coverage to the committed corpus
are copied in (C{-merge=1}).  A crash (an undeclared exception, a per-input timeout, RSS over
the limit or growing after warm-up) stops that target, keeps the input under
C{<scratch>/crashes/} and makes the exit status 1.  One table is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REPO = HERE.parent.parent
#: libFuzzer's absolute RSS limit (MB) and per-input time limit (s).
RSS_LIMIT_MB = 1024
INPUT_TIMEOUT_S = 10


@dataclass
class Result:
    target: str
    inputs: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    baseline_rss_mb: float | None
    corpus_added: int
    crashed: bool
    crash_files: list[str]
    tail: str

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0

    @property
    def growth_mb(self) -> float | None:
        if self.baseline_rss_mb is None:
            return None
        return self.peak_rss_mb - self.baseline_rss_mb


def run_target(name: str, runs: int, scratch: Path, extra: list[str],
               python: str = sys.executable) -> Result:
    new = scratch / "new" / name
    crashes = scratch / "crashes"
    new.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / name
    args = [python, "-m", "bench.fuzz.run", name, f"-runs={runs}", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-timeout={INPUT_TIMEOUT_S}", "-print_final_stats=1",
            f"-artifact_prefix={crashes}/{name}-", *extra, str(new)]
    if seeds.is_dir():
        args.append(str(seeds))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = scratch / f"{name}.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        # wait4, not wait: the child's own peak RSS (libFuzzer's figure is rounded to MB).
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    out = log.read_text(errors="replace")

    def stat(key: str) -> int:
        m = re.search(rf"^stat::{key}:\s+(\d+)", out, re.M)
        return int(m.group(1)) if m else 0

    baseline = re.search(r"^fuzz-rss: baseline_kb=(\d+)", out, re.M)
    crash_files = sorted(str(p) for p in crashes.glob(f"{name}-*"))
    return Result(
        target=name, inputs=stat("number_of_executed_units"), seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,
        baseline_rss_mb=int(baseline.group(1)) / 1024 if baseline else None,
        corpus_added=stat("new_units_added"),
        crashed=proc.returncode != 0, crash_files=crash_files,
        tail="\n".join(line for line in out.splitlines()
                       if not line.startswith(("INFO: Instrumenting", "#")))[-4000:],
    )


def merge(name: str, scratch: Path, python: str = sys.executable) -> int:
    """Copy the scratch inputs that add coverage into the committed corpus; how many."""
    seeds = CORPUS / name
    seeds.mkdir(parents=True, exist_ok=True)
    before = len(list(seeds.iterdir()))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([python, "-m", "bench.fuzz.run", name, "-merge=1", str(seeds),
                    str(scratch / "new" / name)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for path in seeds.iterdir():  # libFuzzer names them by SHA-1
        if not path.name.startswith(("real-", "seed-", "crash-", "found-")):
            path.rename(path.with_name("found-" + path.name[:16]))
    return len(list(seeds.iterdir())) - before


def table(results: list[Result]) -> str:
    rows = [("target", "inputs", "seconds", "CPU seconds", "inputs/s", "peak RSS MB",
             "RSS growth MB", "new corpus", "crash")]
    for r in results:
        growth = "-" if r.growth_mb is None else f"{r.growth_mb:.1f}"
        rows.append((r.target, str(r.inputs), f"{r.seconds:.0f}", f"{r.cpu_seconds:.0f}",
                     f"{r.rate:.0f}",
                     f"{r.peak_rss_mb:.0f}", growth, str(r.corpus_added), "CRASH" if r.crashed else "0"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help=f"targets: {', '.join(TARGETS)}")
    parser.add_argument("--all", action="store_true", help="every target")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once")
    parser.add_argument("--merge", action="store_true",
                        help="add the new inputs that add coverage to the committed corpus")
    parser.add_argument("--scratch", type=Path, help="where new inputs and crashes go "
                        "(default: a temporary directory, removed unless something crashed)")
    parser.add_argument("--seed", type=int, help="libFuzzer -seed (default: random)")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.all else args.targets
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        parser.error(f"name targets or --all; unknown: {unknown}" if unknown else "no targets")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="sidero-fuzz-"))
    extra = [f"-seed={args.seed}"] if args.seed is not None else []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda n: run_target(n, args.runs, scratch, extra), names))
    for r in results:
        if r.crashed:
            print(f"--- {r.target} crashed; input(s): {r.crash_files}\n{r.tail}\n", file=sys.stderr)
    if args.merge:
        for r in results:
            added = merge(r.target, scratch)
            print(f"{r.target}: {added} inputs added to {CORPUS / r.target}", file=sys.stderr)
    print(table(results))
    crashed = any(r.crashed for r in results)
    if crashed:
        print(f"crash inputs kept in {scratch / 'crashes'}", file=sys.stderr)
    elif args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
