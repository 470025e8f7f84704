"""HTTP throughput: a 100 MiB initrd to 20 concurrent clients, sidero vs nginx (same run).

Both servers serve the same file from the same directory on loopback; the clients are curl
processes (20 at once, each downloading the whole file, discarding it). Prints MB/s for each
and the ratio sidero/nginx.

    python -m bench.http.bench_http [--clients 20] [--size-mib 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from tests.paths import RUN_SIDERO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-sf", "-o", "/dev/null", url]).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not come up")


def download_all(url: str, clients: int) -> float:
    start = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", url]) for _ in range(clients)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a download from {url} failed")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sidero-bench-http-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env_dir = os.path.join(work, "state", "env", "bench")
        os.makedirs(env_dir)
        with open(os.path.join(env_dir, "initramfs.xz"), "wb") as f:
            f.write(os.urandom(args.size_mib << 20))
        ours, theirs = free_port(), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, str(RUN_SIDERO),
             "--state-dir", os.path.join(work, "state"), "--api-endpoint", "127.0.0.1",
             "--api-port", str(ours), "--listen-address", "127.0.0.1",
             "--disable-dhcp-proxy", "--disable-tftp", "--disable-siderolink", "--disable-syslog",
             "--log-level", "warn",
             "--management-socket", os.path.join(work, "m.sock")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"user root; daemon off; worker_processes auto; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
                    "events { worker_connections 1024; }\n"
                    f"http {{ access_log off; sendfile on; server {{ listen 127.0.0.1:{theirs};"
                    f" location /env/ {{ alias {work}/state/env/; }} }} }}\n")
        procs.append(subprocess.Popen(["nginx", "-c", conf], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        path = "/env/bench/initramfs.xz"
        wait_http(f"http://127.0.0.1:{ours}/healthz")
        wait_http(f"http://127.0.0.1:{theirs}{path}")
        total_mb = args.clients * args.size_mib * 1.048576
        results: dict[str, float] = {}
        for name, port in (("sidero", ours), ("nginx", theirs)):
            best = min(download_all(f"http://127.0.0.1:{port}{path}", args.clients)
                       for _ in range(args.rounds))
            results[name] = total_mb / best
            print(f"{name:7s} {args.clients} x {args.size_mib} MiB in {best:6.2f}s = {results[name]:8.1f} MB/s")
        print(f"ratio sidero/nginx = {results['sidero'] / results['nginx']:.2f}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
