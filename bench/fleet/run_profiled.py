"""`twistd sidero` from this tree under twistd's cProfile (bench/fleet's --profile; not product code).

Usage: python bench/fleet/run_profiled.py STATS_FILE [sidero arguments...]
The stats are written when twistd stops (SIGTERM); read them with `python -m pstats STATS_FILE`.
"""

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_SIDERO = os.path.join(HERE, "..", "..", "tests", "integration", "run_sidero.py")

if __name__ == "__main__":
    stats, rest = sys.argv[1], sys.argv[2:]
    # run_sidero puts "sidero" after its own twistd options; ours must come before it, so they
    # go in through twistd's own parsing of argv[1:] ahead of the subcommand.
    sys.argv = [RUN_SIDERO, *rest]
    import twisted.scripts.twistd as twistd

    original = twistd.run

    def run() -> None:
        argv = sys.argv
        at = argv.index("sidero")
        sys.argv = [*argv[:at], f"--profile={stats}", "--profiler=cprofile", "--savestats", *argv[at:]]
        original()

    twistd.run = run
    runpy.run_path(RUN_SIDERO, run_name="__main__")
