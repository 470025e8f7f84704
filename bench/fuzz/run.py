"""One fuzz target under atheris (libFuzzer), in this process: ``python -m bench.fuzz.run
TARGET [libFuzzer flags] [corpus dirs]``.  L{bench.fuzz.__main__} runs one of these per target.

Bounded memory is checked here as well as by libFuzzer's C{-rss_limit_mb}: after
L{WARMUP} inputs the peak RSS is taken as the baseline, and an input after which the peak has
grown by more than C{--rss-growth-mb} (default L{RSS_GROWTH_MB}) is a crash.  The baseline
and the final figures are printed as C{fuzz-rss:} lines for the driver.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

WARMUP = 20_000
CHECK_EVERY = 1024
RSS_GROWTH_MB = 64


class MemoryGrowth(AssertionError):
    """The process kept growing after warm-up: something keeps state per input."""


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Guard:
    """Calls the target, counting inputs and watching the peak RSS."""

    def __init__(self, one: Any, growth_mb: int) -> None:
        self.one = one
        self.growth_kb = growth_mb * 1024
        self.count = 0
        self.baseline = 0

    def __call__(self, data: bytes) -> None:
        self.one(data)
        self.count += 1
        if self.count % CHECK_EVERY:
            return
        peak = _peak_kb()
        if not self.baseline:
            if self.count >= WARMUP:
                self.baseline = peak
                print(f"fuzz-rss: baseline_kb={peak} after={self.count}", file=sys.stderr,
                      flush=True)
            return
        if peak - self.baseline > self.growth_kb:
            raise MemoryGrowth(f"peak RSS grew from {self.baseline} kB to {peak} kB "
                               f"after {self.count} inputs")


def _self_command(name: str) -> str:
    """An executable that runs this target again: libFuzzer's merge (and fork) modes start
    copies of argv[0] with its own flags, and this module is not executable by itself.
    One per target and user under the temp directory, rewritten (same text) on each start."""
    import shlex
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder = os.path.join(tempfile.gettempdir(), f"sidero-fuzz-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{name}.sh")
    script = (f"#!/bin/sh\ncd {shlex.quote(repo)} && exec {shlex.quote(sys.executable)} "
              f"-m bench.fuzz.run {shlex.quote(name)} \"$@\"\n")
    partial = f"{path}.{os.getpid()}"
    with open(partial, "w") as f:
        f.write(script)
    os.chmod(partial, 0o700)
    os.replace(partial, path)
    return path


def main(argv: list[str]) -> None:
    import atheris

    from bench.fuzz.targets import TARGETS

    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m bench.fuzz.run TARGET [libFuzzer args]; targets: "
                 f"{', '.join(TARGETS)}")
    target = TARGETS[argv[1]]
    rest = argv[2:]
    growth = RSS_GROWTH_MB
    for arg in list(rest):
        if arg.startswith("--rss-growth-mb="):
            growth = int(arg.split("=", 1)[1])
            rest.remove(arg)
    with atheris.instrument_imports(include=list(target.instrument)):
        one = target.setup()
    guard = Guard(one, growth)
    if not any(a.startswith("-max_len=") for a in rest):
        rest.insert(0, f"-max_len={target.max_len}")
    atheris.Setup([_self_command(target.name), *rest], guard)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
