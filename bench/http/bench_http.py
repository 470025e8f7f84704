"""HTTP throughput of boot assets: N concurrent curl downloads of one initrd, sidero vs nginx.

Benchmark (not a test). Both servers serve the same file from the same directory on loopback
in the same run: ``twistd sidero`` (embedded store, API port) and nginx with ``sendfile on``
(its default ``worker_processes auto``). Each round starts N curl processes at once, each
downloading the whole file to /dev/null; the servers take turns, round after round, so both
see the same machine load. Every download is checked (curl's exit status and byte count).
Prints one table: per server the median MB/s over the rounds and the spread (min–max), and
the ratio sidero/nginx (median of the per-round ratios, with their spread).

    python -m bench.http.bench_http [--clients 20] [--size-mib 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.sidero_proc import free_port, start_nginx, start_sidero, stop_all, wait_http

ASSET = "/env/bench/initramfs.xz"


def download_all(url: str, clients: int, size: int) -> float:
    """Seconds for C{clients} concurrent whole-file downloads of C{url}; all must succeed."""
    start = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}",
                               url], stdout=subprocess.PIPE) for _ in range(clients)]
    outs = [p.communicate()[0] for p in procs]
    elapsed = time.monotonic() - start
    bad = [(p.returncode, o) for p, o in zip(procs, outs, strict=True)
           if p.returncode != 0 or int(o or b"0") != size]
    if bad:
        raise SystemExit(f"{len(bad)} of {clients} downloads from {url} failed: {bad[:3]}")
    return elapsed


def run(clients: int, size_mib: int, rounds: int) -> dict[str, list[float]]:
    """MB/s per round for C{sidero} and C{nginx}, and the per-round C{ratio}."""
    work = Path(tempfile.mkdtemp(prefix="sidero-bench-http-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env_dir = work / "state" / "env" / "bench"
        env_dir.mkdir(parents=True)
        size = size_mib << 20
        with open(env_dir / "initramfs.xz", "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        ours, theirs = free_port(), free_port()
        procs.append(start_sidero(work, ours, log=work / "sidero.log"))
        procs.append(start_nginx(work, theirs, {"/env/": work / "state" / "env"}))
        wait_http(f"http://127.0.0.1:{ours}/healthz", procs[0])
        wait_http(f"http://127.0.0.1:{theirs}{ASSET}", procs[1])
        total_mb = clients * size / 1e6
        results: dict[str, list[float]] = {"sidero": [], "nginx": [], "ratio": []}
        for _ in range(rounds):
            for name, port in (("sidero", ours), ("nginx", theirs)):
                seconds = download_all(f"http://127.0.0.1:{port}{ASSET}", clients, size)
                results[name].append(total_mb / seconds)
            results["ratio"].append(results["sidero"][-1] / results["nginx"][-1])
        return results
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)


def table(results: dict[str, list[float]], clients: int, size_mib: int) -> str:
    rounds = len(results["ratio"])
    lines = [f"HTTP: {clients} concurrent curl x {size_mib} MiB on loopback, {rounds} rounds",
             f"{'server':<8} {'median MB/s':>12} {'min':>9} {'max':>9}"]
    for name in ("sidero", "nginx"):
        v = results[name]
        lines.append(f"{name:<8} {statistics.median(v):>12.1f} {min(v):>9.1f} {max(v):>9.1f}")
    r = results["ratio"]
    lines.append(f"{'ratio':<8} {statistics.median(r):>12.2f} {min(r):>9.2f} {max(r):>9.2f}"
                 "   (sidero/nginx, per round)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for tool in ("curl", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench skipped: {tool} is not installed (scripts/install-test-deps)")
            return 2
    results = run(args.clients, args.size_mib, args.rounds)
    print(table(results, args.clients, args.size_mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
