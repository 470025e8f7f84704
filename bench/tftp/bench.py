"""TFTP throughput benchmark: sidero vs tftpd-hpa vs dnsmasq (a benchmark, not a test).

N concurrent clients (one C{curl --parallel} process, N transfers of the same file, the
way a rack of machines PXE-boots the same iPXE binary) fetch a file from each server in
turn, on loopback, in the same run; prints aggregate MB/s, medians over the rounds with the
spread, and the ratio of sidero (with C{--workers} SO_REUSEPORT processes) to each peer.

Scenarios: C{boot} is 100 clients x 1 MiB (iPXE binaries), C{initrd} 20 clients x 30 MiB
(an initrd over TFTP); C{--clients}/C{--size} override them. curl never asks for
windowsize (RFC 7440), so every server runs lock-step here.

Peers as an operator runs them: tftpd-hpa C{in.tftpd -L -s ROOT} (a process per transfer),
dnsmasq C{--enable-tftp --tftp-max=10000} (one process, C event loop), logging off.

dnsmasq's TFTP port is always 69, so the whole benchmark re-executes itself in a private
network namespace (C{unshare -n}, needs root): every server binds that namespace's own
loopback and nothing is visible outside it.  Without root, dnsmasq is left out.

Usage: python bench/tftp/bench.py [--scenario boot|initrd] [--clients N] [--size BYTES]
       [--blksize 1428] [--rounds 3] [--workers 2] [--profile DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_cpu() -> Any:
    """bench/cpu.py by path: run as a script, this file itself is the module C{bench}."""
    spec = importlib.util.spec_from_file_location("bench_cpu", os.path.join(HERE, "..", "cpu.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpu = _load_cpu()

NETNS_FLAG = "SIDERO_TFTP_BENCH_NETNS"
HIGH_PORT = 46969
#: scenario -> (clients, bytes per client)
SCENARIOS = {"boot": (100, 1 << 20), "initrd": (20, 30 << 20)}


def probe(port: int, deadline: float) -> bool:
    """Wait until a TFTP server answers an RRQ on 127.0.0.1:port."""
    rrq = b"\x00\x01probe\x00octet\x00"
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            try:
                s.sendto(rrq, ("127.0.0.1", port))
                s.recvfrom(2048)
                return True
            except OSError:
                time.sleep(0.05)
    return False


@contextmanager
def server(argv: list[str], port: int, log: str, name: str) -> Iterator[Any]:
    """Run one server; yields its CPU meter (the server and all it forks)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    meter = cpu.CPUMeter(proc.pid, name)
    try:
        if not probe(port, time.monotonic() + 10):
            raise RuntimeError(f"{argv[0]} did not answer on port {port}; see {log}")
        yield meter
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        meter.close()


def spread(values: list[float]) -> str:
    """Median [min-max]."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} [{min(values):.2f}-{max(values):.2f}]"


def fetch_all(port: int, clients: int, blksize: int, size: int, timeout: float = 120) -> float:
    """Run the clients; return the elapsed wall-clock seconds (fails on a bad transfer)."""
    url = f"tftp://127.0.0.1:{port}/boot.bin"
    argv = [
        "curl", "-sS", "-Z", "--parallel-max", str(clients), "--parallel-immediate",
        "--tftp-blksize", str(blksize), "-w", "%{size_download}\\n",
    ]
    for _ in range(clients):
        argv += ["-o", "/dev/null", url]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, timeout=timeout)
    elapsed = time.monotonic() - start
    sizes = done.stdout.split()
    if done.returncode != 0 or len(sizes) != clients or any(int(s) != size for s in sizes):
        raise RuntimeError(
            f"transfers failed on port {port}: rc={done.returncode} "
            f"{done.stderr[-500:]!r} sizes={sorted(set(sizes))[:5]}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=tuple(SCENARIOS), default="boot")
    parser.add_argument("--clients", type=int, default=0, help="override the scenario's")
    parser.add_argument("--size", type=int, default=0, help="override the scenario's")
    parser.add_argument("--workers", type=int, default=2, help="sidero's worker processes")
    parser.add_argument("--blksize", type=int, default=1428)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--profile", default="", help="write sidero cProfile output here")
    args = parser.parse_args()
    clients, size = SCENARIOS[args.scenario]
    args.clients = args.clients or clients
    args.size = args.size or size

    if os.environ.get(NETNS_FLAG) != "1" and os.geteuid() == 0 and shutil.which("unshare"):
        os.environ[NETNS_FLAG] = "1"
        os.execvp("unshare", ["unshare", "-n", "--", sys.executable, *sys.argv])
    in_netns = os.environ.get(NETNS_FLAG) == "1"
    if in_netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        # tftpd-hpa resolves its bind address with AI_ADDRCONFIG, which fails when only
        # loopback has an address: give the private namespace a veth with a private one.
        subprocess.run(["ip", "link", "add", "tbench0", "type", "veth", "peer", "name", "tbench1"],
                       check=False)
        subprocess.run(["ip", "addr", "add", "10.213.99.1/24", "dev", "tbench0"], check=False)

    work = tempfile.mkdtemp(prefix="tftp-bench-")
    os.chmod(work, 0o755)
    root = os.path.join(work, "root")
    os.makedirs(root, mode=0o755)
    with open(os.path.join(root, "boot.bin"), "wb") as f:
        f.write(os.urandom(args.size))
    os.chmod(os.path.join(root, "boot.bin"), 0o644)

    python = sys.executable
    serve = os.path.join(HERE, "serve_sidero.py")
    servers: dict[str, tuple[list[str], int]] = {}
    variants = [("sidero", "single", 1)]
    if args.workers > 1:
        variants.append((f"sidero-{args.workers}w", "single", args.workers))
    for name, mode, workers in variants:
        port = HIGH_PORT + len(servers)
        argv = [python, serve, root, str(port), mode, "--workers", str(workers)]
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            argv += ["--profile", os.path.join(os.path.abspath(args.profile), f"{name}.prof")]
        servers[name] = (argv, port)
    if shutil.which("in.tftpd"):
        port = HIGH_PORT + 10
        servers["tftpd-hpa"] = (
            ["in.tftpd", "-4", "-L", "-a", f"127.0.0.1:{port}", "-u", "root", "-s", root], port
        )
    if shutil.which("dnsmasq") and in_netns:
        servers["dnsmasq"] = (
            ["dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", "--enable-tftp",
             f"--tftp-root={root}", "--tftp-max=10000", "--listen-address=127.0.0.1",
             "--bind-interfaces", "--user=root", "--pid-file=", "--quiet-tftp",
             "--log-facility=-"],
            69,
        )
    elif not in_netns:
        print("dnsmasq skipped: its TFTP port is always 69; run as root for a private netns")
    if args.only:
        servers = {k: v for k, v in servers.items() if k in args.only.split(",")}

    total = args.clients * args.size
    print(
        f"TFTP {args.scenario}: {args.clients} concurrent curl clients x {args.size} bytes, "
        f"blksize {args.blksize}, median [min-max] of {args.rounds} rounds, "
        f"loopback{' (private netns)' if in_netns else ''}, load average "
        f"{os.getloadavg()[0]:.1f} at start on {os.cpu_count()} CPUs"
    )
    # All servers run at once and the rounds interleave them, so a burst of load from
    # elsewhere on the machine does not land on one server only.
    times: dict[str, list[float]] = {name: [] for name in servers}
    used: dict[str, list[float]] = {name: [] for name in servers}
    timeout = max(120.0, total / 20e6)
    exact = True
    with ExitStack() as stack:
        meters: dict[str, Any] = {}
        for name, (argv, port) in servers.items():
            meters[name] = stack.enter_context(
                server(argv, port, os.path.join(work, f"{name}.log"), name))
            exact = exact and meters[name].exact
            fetch_all(port, min(args.clients, 4), args.blksize, args.size, timeout)  # warm-up
        for _ in range(args.rounds):
            for name, (_, port) in servers.items():
                before = meters[name].seconds()
                times[name].append(fetch_all(port, args.clients, args.blksize, args.size,
                                             timeout))
                used[name].append(meters[name].seconds() - before)
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other work on the machine "
          "skews every figure; the rounds interleave the servers to share it out)")
    rates = {name: [total / t / 1e6 for t in runs] for name, runs in times.items()}
    # MB per CPU second of the server (and its children): what it would do with a core of
    # its own, much less skewed by the rest of the machine than MB/s.
    per_cpu = {name: [total / 1e6 / c if c > 0 else float("nan") for c in runs]
               for name, runs in used.items()}
    if not exact:
        print("CPU from /proc (no writable cgroup): short-lived children are missed")
    print(f"{'server':<12} | {'MB/s':>24} | {'MB per CPU-second':>24} | rounds (s)")
    print("-" * 92)
    for name, runs in rates.items():
        print(f"{name:<12} | {spread(runs):>24} | {spread(per_cpu[name]):>24} | "
              f"{', '.join(f'{t:.2f}' for t in times[name])}")
    ours = [n for n in rates if n.startswith("sidero")]
    peers = [n for n in rates if not n.startswith("sidero")]
    for mine in ours:
        for peer in peers:
            ratio = [a / b for a, b in zip(rates[mine], rates[peer], strict=False)]
            eff = [a / b for a, b in zip(per_cpu[mine], per_cpu[peer], strict=False)]
            print(f"ratio {mine} / {peer}: {spread(ratio)}x MB/s, "
                  f"{spread(eff)}x MB per CPU-second")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
