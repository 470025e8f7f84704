"""Starting and stopping the processes the benchmarks compare: ``twistd sidero`` and nginx.

Every port is passed explicitly (an ephemeral one read back from the kernel unless given),
so a benchmark never collides with a running sidero or another benchmark. C{SIDERO_BENCH_RUNNER}
names another runner script than C{tests/integration/run_sidero.py} (one adding twistd's
C{--profile}, say).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.paths import REPO, RUN_SIDERO, tree_env


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_sidero(work: Path, http_port: int, *, log: Path, address: str = "127.0.0.1",
                 netns: str | None = None, services: Sequence[str] = (),
                 metrics_port: int | None = None, extra: Sequence[str] = (),
                 ) -> subprocess.Popen[bytes]:
    """``twistd sidero`` on the embedded store in C{work/state}, API port C{http_port} on
    C{address}; only the HTTP services and those named in C{services} (C{dhcp-proxy},
    C{tftp}) run besides the store and controllers. Inside C{netns} when given."""
    disabled = {"dhcp-proxy", "tftp", "siderolink", "syslog", "log-receiver", "event-sink"}
    disabled -= set(services)
    argv = [sys.executable, os.environ.get("SIDERO_BENCH_RUNNER", str(RUN_SIDERO)),
            "--state-dir", str(work / "state"), "--api-endpoint", address,
            "--api-port", str(http_port), "--http-port", str(http_port),
            "--listen-address", address,
            "--metrics-port", str(metrics_port or free_port()), "--health-port", str(free_port()),
            "--management-socket", str(work / "management.sock"),
            "--log-level", "warn", *(f"--disable-{name}" for name in sorted(disabled)), *extra]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
                                env=tree_env(PYTHONUNBUFFERED="1"))


def nginx_conf(work: Path, listen: str, aliases: Mapping[str, Path], *,
               workers: str = "auto", extra_http: str = "") -> Path:
    """An nginx configuration serving each C{location -> directory} of C{aliases} with
    sendfile, logging nothing, its files under C{work}."""
    locations = " ".join(f"location {loc} {{ alias {path}/; }}" for loc, path in aliases.items())
    conf = work / f"nginx-{listen.replace(':', '_')}.conf"
    conf.write_text(
        f"user root; daemon off; worker_processes {workers}; pid {work}/nginx.pid;\n"
        f"error_log {work}/nginx.err;\n"
        "events { worker_connections 4096; }\n"
        "http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 10000;\n"
        f"  client_body_temp_path {work}/nginx-body; proxy_temp_path {work}/nginx-proxy;\n"
        f"  fastcgi_temp_path {work}/nginx-fcgi; uwsgi_temp_path {work}/nginx-uwsgi;\n"
        f"  scgi_temp_path {work}/nginx-scgi;\n"
        f"  {extra_http}\n"
        f"  server {{ listen {listen}; {locations} }} }}\n")
    return conf


def start_nginx(work: Path, port: int, aliases: Mapping[str, Path], *,
                address: str = "127.0.0.1", netns: str | None = None,
                extra_http: str = "") -> subprocess.Popen[bytes]:
    conf = nginx_conf(work, f"{address}:{port}", aliases, extra_http=extra_http)
    argv = ["nginx", "-c", str(conf), "-e", str(work / "nginx.err")]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60,
              netns: str | None = None) -> None:
    """Until C{url} answers 2xx. @raise SystemExit: C{proc} exited or C{timeout} passed."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run([*prefix, "curl", "-sf", "-o", "/dev/null", "--max-time", "2", url]
                          ).returncode == 0:
            return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server for {url} exited ({proc.returncode})")
        time.sleep(0.2)
    raise SystemExit(f"server at {url} did not come up within {timeout}s")


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """SIGTERM each process group, then SIGKILL what is left after C{timeout}."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
