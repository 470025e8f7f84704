"""Boot decisions and allocation at fleet size, on the real `twistd sidero` (not a test).

    python -m bench.fleet.bench_fleet [--servers 10000] [--classes 100] [--machines 1000]
        [--rate 1000] [--duration 10] [--runs 3] [--stores embedded,kubernetes]
        [--allocate 1000] [--kube-api-qps 20] [--kube-api-burst 30]

SIDERO_BENCH_PROFILE=<file> runs sidero under cProfile (stats written when it stops).

For each store (the embedded SQLite store; the Kubernetes store on a real kube-apiserver from
KUBEAPISERVER_BIN, see tests/k8s/apiserver.py) it starts sidero on loopback, loads the fleet
(Servers, ServerClasses, and MetalMachines bound to the first servers with their bootstrap
Secrets), waits until the boot caches hold it, then:

* drives `/boot.ipxe`, `/ipxe?uuid=` (rotating over every server and some unknown uuids) and
  `/configdata?uuid=` (rotating over the bound servers) at a fixed rate with vegeta
  (scripts/build-vegeta), and the same rate at nginx serving a static file of the size of an
  `/ipxe` answer (the reference row);
* times how long a ServerClass status takes to follow a change: one Server relabelled into a
  class, and a class's selector changed (matched against every server);
* reads sidero's RSS.

With `--allocate N` (Kubernetes store) it then creates N MetalMachines of one class over the
fleet's clean servers and reports the time until all are bound, the API requests sidero made
per allocation (kube-apiserver's own apiserver_request_total, minus the benchmark's requests)
and checks that no server is bound twice and no MetalMachine holds two bindings.

Everything it starts it stops; it binds loopback only; it prints one table (medians of
--runs runs, with min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.fleet import fleet  # noqa: E402
from bench.sidero_proc import stop_all  # noqa: E402
from sidero import TALOS_RELEASE  # noqa: E402

RUN_SIDERO = REPO / "tests" / "integration" / "run_sidero.py"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port for a child process to bind (below the ephemeral range: see tests/ports.py)."""
    from tests.ports import free_port as pick

    return pick(kind)


def vegeta_binary() -> str:
    found = shutil.which("vegeta")
    if found:
        return found
    path = subprocess.run([str(REPO / "scripts" / "build-vegeta"), "--path"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if not os.access(path, os.X_OK):
        raise SystemExit(f"vegeta is not built: run scripts/build-vegeta (expected {path})")
    return path


# --- peers ---------------------------------------------------------------------------------------


class Nginx:
    """nginx serving the Talos assets the default Environment downloads, and the reference file."""

    def __init__(self, work: Path, reference_size: int) -> None:
        self.work = work
        self.port = free_port()
        root = work / "www"
        (root / "assets" / TALOS_RELEASE).mkdir(parents=True)
        for asset in ("vmlinuz-amd64", "initramfs-amd64.xz"):
            (root / "assets" / TALOS_RELEASE / asset).write_bytes(b"\0" * 4096)
        (root / "reference.txt").write_bytes(b"x" * reference_size)
        conf = work / "nginx.conf"
        conf.write_text(
            ("user root; " if os.geteuid() == 0 else "")
            + f"daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ access_log off; server {{ listen 127.0.0.1:{self.port}; root {root};\n"
            "  location /assets/ { } } }\n")
        self.proc = subprocess.Popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            fleet.wait_for("nginx", lambda: _http_status(f"{self.url}/reference.txt") == 200, 10)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a process (with its workers' when C{children}: nginx)."""
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    if children:
        pids += [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    total = 0.0
    for p in pids:
        fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except OSError:
        return 0, b""


class Sidero:
    """`twistd sidero` on loopback (real process, run from this tree)."""

    def __init__(self, work: Path, assets_url: str, *extra: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.state = work / "state"
        self.socket = str(work / "sidero.sock")
        self.log_path = work / "sidero.log"
        profile = os.environ.get("SIDERO_BENCH_PROFILE")
        runner = [str(Path(__file__).with_name("run_profiled.py")), profile] if profile else [str(RUN_SIDERO)]
        args = [
            sys.executable, *runner, "--state-dir", str(self.state),
            "--api-endpoint", "127.0.0.1", "--listen-address", "127.0.0.1",
            "--api-port", str(self.port), "--http-port", str(self.port),
            "--disable-dhcp-proxy", "--disable-tftp", "--disable-siderolink", "--disable-syslog",
            "--disable-log-receiver", "--disable-event-sink",
            "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1",
            "--disable-health", "--management-socket", self.socket,
            "--talos-assets-url", assets_url, "--log-level", "warn",
            # The load comes from loopback, not from the machines' own addresses: trust it (the
            # check itself still runs on every request).
            "--configdata-trusted-networks", "127.0.0.0/8",
            # vegeta stands for a thousand machines from one address: the per-source connection
            # limit (64, against one client hogging the port) would refuse it.
            "--http-max-connections", "8192", "--http-max-connections-per-source", "8192", *extra,
        ]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SIDERO_", "KUBERNETES_")) and k not in ("KUBECONFIG", "NOTIFY_SOCKET")}
        env["PYTHONPATH"] = str(REPO)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def queue_activity(self) -> float:
        """Keys queued plus reconciles running, over every controller (from /metrics)."""
        status, body = _http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        if status != 200:
            return float("inf")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(("workqueue_depth{", "controller_runtime_active_workers{")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def rss_mib(self) -> float:
        """RSS of the twistd process (the run_sidero wrapper execs nothing: it is twistd)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        stop_all([self.proc], timeout=30)


class APIServer:
    """The real kube-apiserver of tests/k8s/apiserver.py, started synchronously."""

    def __init__(self) -> None:
        from tests.k8s.apiserver import KubeAPIServer, crd_manifests, require_binary

        self.server = KubeAPIServer(require_binary(), extra_args=["--max-requests-inflight=2000",
                                                                  "--max-mutating-requests-inflight=1000"])
        self.server.launch()
        try:
            fleet.wait_for("kube-apiserver /readyz", lambda: self.server.probe()[0] == 200, 90, 0.2)
            self.server.apply_crds(crd_manifests())
            pki = self.server._path("pki")
            self.rest = fleet.Rest(host="127.0.0.1", port=self.server.port, ca=str(pki / "ca.crt"),
                                   cert=(str(pki / "admin.crt"), str(pki / "admin.key")))
            self.rest.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sidero-system"}})
        except BaseException:
            self.server.stop()
            raise

    def requests_by(self) -> dict[tuple[str, str, str], int]:
        """apiserver_request_total by (verb, resource, subresource), all clients."""
        import re

        text = self.rest.raw("/metrics").decode()
        out: dict[tuple[str, str, str], int] = {}
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
                key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
                out[key] = out.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
        return out

    def requests_total(self) -> int:
        """apiserver_request_total summed over every label (all clients)."""
        return sum(self.requests_by().values())

    def stop(self) -> None:
        self.rest.close()
        self.server.stop()


# --- load ----------------------------------------------------------------------------------------


def attack(vegeta: str, targets: list[str], rate: int, duration: float, work: Path) -> dict[str, Any]:
    """vegeta at exactly C{rate}/s over C{targets} (round robin); its JSON report."""
    target_file = work / "targets.txt"
    target_file.write_text("".join(f"GET {t}\n\n" for t in targets))
    attack = subprocess.Popen(
        [vegeta, "attack", f"-rate={rate}/s", f"-duration={duration}s", f"-targets={target_file}",
         "-timeout=10s", "-keepalive=true", "-workers=20"], stdout=subprocess.PIPE)
    report = subprocess.run([vegeta, "report", "-type=json"], stdin=attack.stdout,
                            capture_output=True, check=True)
    attack.wait()
    return dict(json.loads(report.stdout))


def summarise(report: dict[str, Any]) -> dict[str, float]:
    lat = report["latencies"]
    codes = report.get("status_codes") or {}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    return {"rate": float(report["throughput"]), "p50": lat["50th"] / 1e6, "p99": lat["99th"] / 1e6,
            "max": lat["max"] / 1e6, "requests": float(report["requests"]),
            "errors": float(report["requests"] - ok)}


# --- one run -------------------------------------------------------------------------------------


def parallel(fn: Callable[[fleet.Rest, dict[str, Any]], Any], rest: fleet.Rest,
             objects: Iterable[dict[str, Any]], workers: int = 8) -> None:
    local = threading.local()

    def one(obj: dict[str, Any]) -> Any:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = rest.clone()
        return fn(client, obj)

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(one, objects):
            pass


def run_once(store: str, args: argparse.Namespace, vegeta: str, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    ipxe_sample = 700  # bytes: about the size of a Talos /ipxe answer
    nginx = Nginx(work, ipxe_sample)
    apiserver: APIServer | None = None
    sidero: Sidero | None = None
    try:
        assets = f"{nginx.url}/assets"
        extra: list[str] = []
        if store == "kubernetes":
            apiserver = APIServer()
            rest = apiserver.rest
            started = time.monotonic()
            # A fleet sidero already ran (finalizers and converged status in place), as after a
            # restart: at 20 requests/s, 10 000 fresh servers would take the controller 25 min.
            parallel(lambda c, o: c.create(o), rest,
                     fleet.boot_fleet(args.servers, args.classes, args.machines, running=True), workers=16)
            parallel(lambda c, i: c.patch(fleet.server(i), {"status": fleet.server_status(i, args.machines)},
                                          status=True), rest, range(args.servers), workers=16)
            result["load_s"] = time.monotonic() - started
            extra = ["--store", "kubernetes", "--kubeconfig", str(apiserver.server.kubeconfig),
                     "--webhook-port", str(free_port()),
                     "--webhook-cert-dir", str(work / "webhook-certs"),
                     "--kube-api-qps", str(args.kube_api_qps), "--kube-api-burst", str(args.kube_api_burst)]
        else:
            extra = ["--store", "embedded"]
        # The default Environment downloads its (dummy) kernel and initrd from nginx.
        sidero = Sidero(work, assets, *extra)
        fleet.wait_for("sidero /healthz", lambda: _http_status(f"{sidero.url}/healthz") == 200, 120, 0.2)
        if store == "embedded":
            rest = fleet.Rest(unix=sidero.socket)
            fleet.wait_for("management socket", lambda: os.path.exists(sidero.socket), 30)
            started = time.monotonic()
            parallel(lambda c, o: c.create(o), rest,
                     fleet.boot_fleet(args.servers, args.classes, args.machines), workers=8)
            result["load_s"] = time.monotonic() - started
        last = fleet.server_name(args.machines - 1)
        synced = time.monotonic()
        fleet.wait_for("caches hold the fleet", lambda: (
            b"talos.config" in _http_get(f"{sidero.url}/ipxe?uuid={last}")[1]
            and _http_get(f"{sidero.url}/configdata?uuid={last}")[0] == 200), 600, 0.2)
        result["sync_s"] = time.monotonic() - synced
        # Steady state: every controller's queue empty and no reconcile running for 3 s in a row
        # (sidero's own workqueue_depth and controller_runtime_active_workers).  The start-up
        # pass over every object is rate-limited on Kubernetes (20 requests/s by default).
        idle = [0]

        def converged() -> bool:
            busy = sidero.queue_activity()
            idle[0] = idle[0] + 1 if busy == 0 else 0
            return idle[0] >= 3

        result["converge_s"] = fleet.wait_for("controllers converged", converged,
                                              args.converge_timeout, 1.0)

        # The first /configdata of each machine renders its config (then it is cached).
        started = time.monotonic()
        for k in range(args.machines):
            status, _ = _http_get(f"{sidero.url}/configdata?uuid={fleet.server_name(k)}")
            if status != 200:
                raise RuntimeError(f"/configdata of machine {k}: {status}")
        result["cold_configdata_ms"] = (time.monotonic() - started) * 1000 / args.machines

        # -- boot decisions at a fixed rate --
        unknown = [f"ffffffff-0000-4000-8000-{i:012x}" for i in range(100)]
        uuids = [fleet.server_name(i) for i in range(args.servers)] + unknown
        routes = {
            "/boot.ipxe": [f"{sidero.url}/boot.ipxe"],
            "/ipxe?uuid=": [f"{sidero.url}/ipxe?uuid={u}&mac={fleet.mac(i)}&arch=amd64"
                            for i, u in enumerate(uuids)],
            "/configdata?uuid=": [f"{sidero.url}/configdata?uuid={fleet.server_name(k)}"
                                  for k in range(args.machines)],
            "nginx static file": [f"{nginx.url}/reference.txt"],
        }
        for name, targets in routes.items():
            pid, workers = (nginx.proc.pid, True) if name.startswith("nginx") else (sidero.proc.pid, False)
            cpu = cpu_seconds(pid, workers)
            result[name] = summarise(attack(vegeta, targets, args.rate, args.duration, work))
            result[name]["cpu_ms"] = (cpu_seconds(pid, workers) - cpu) * 1000 / max(result[name]["requests"], 1)
            if not sidero.alive():
                raise RuntimeError(f"sidero died under load:\n{sidero.log_tail()}")
        result["rss_mib"] = sidero.rss_mib()

        # -- ServerClass status after a change --
        result.update(class_latency(rest, args))
        result["rss_mib"] = max(result["rss_mib"], sidero.rss_mib())

        if store == "kubernetes" and args.allocate:
            assert apiserver is not None
            result.update(allocate(apiserver, args))
            result["rss_mib"] = max(result["rss_mib"], sidero.rss_mib())
        if not sidero.alive():
            raise RuntimeError(f"sidero died:\n{sidero.log_tail()}")
        return result
    finally:
        if sidero is not None:
            sidero.stop()
        if apiserver is not None:
            apiserver.stop()
        nginx.stop()


def class_latency(rest: fleet.Rest, args: argparse.Namespace) -> dict[str, float]:
    """Seconds until a class's status shows (1) a Server relabelled into it, (2) a new selector."""
    target = fleet.server_class(0)
    # A server outside class 0 only by its zone label: same manufacturer and CPU, another zone.
    candidate = next(i for i in range(args.servers)
                     if i % 3 == 0 and i % 2 == 0 and i % 10 != 0 and i % 50 != 0)
    name = fleet.server_name(candidate)

    def members() -> set[str]:
        status = rest.get(target).get("status") or {}
        return set(status.get("serversAvailable") or []) | set(status.get("serversInUse") or [])

    fleet.wait_for("class-000 status", lambda: bool(members()), 600, 0.2)
    before = members()
    rest.patch(fleet.server(candidate), {"metadata": {"labels": {"zone": "z0"}}})
    joined = fleet.wait_for("relabelled server in class-000", lambda: name in members(), 120, 0.005)
    if name in before:
        raise RuntimeError("the benchmark's candidate was already a member")
    # Widen the class to every zone: matched against all servers.
    rest.patch(target, {"spec": {"qualifiers": {"labelSelectors": None}}})
    widened = fleet.wait_for("class-000 widened", lambda: len(members()) > 2 * len(before), 120, 0.005)
    return {"class_join_s": joined, "class_widen_s": widened, "class_members": float(len(members()))}


def allocate(apiserver: APIServer, args: argparse.Namespace) -> dict[str, float]:
    """N MetalMachines of one class over the clean servers past the bound ones."""
    rest = apiserver.rest
    n = args.allocate
    free = list(range(args.machines, args.servers))
    if n > len(free):
        raise SystemExit(f"--allocate {n}: only {len(free)} unbound servers")
    # The unbound servers are clean (fleet.server_status); a class holding every server.
    rest.create(fleet.alloc_class())
    start_machine = 100_000
    machines = [fleet.metal_machine(start_machine + k, server_class=fleet.ALLOC_CLASS) for k in range(n)]
    secrets = [fleet.secret(start_machine + k) for k in range(n)]
    parallel(lambda c, o: c.create(o), rest, secrets, workers=16)
    time.sleep(2.0)  # let the class status settle before counting
    ours = 0
    by_before = apiserver.requests_by()
    before = sum(by_before.values())
    ours += 1
    started = time.monotonic()
    parallel(lambda c, o: c.create(o), rest, machines, workers=16)
    ours += n
    polls = 0

    def bound() -> bool:
        nonlocal polls
        polls += 1
        _, listing = rest.request("GET", "/apis/infrastructure.cluster.x-k8s.io/v1alpha3/"
                                  "namespaces/default/metalmachines?limit=5000")
        items = listing.get("items") or []
        done = sum(1 for m in items if m["metadata"]["name"] >= f"mm-{start_machine:05d}"
                   and (m.get("spec") or {}).get("serverRef"))
        return done >= n

    fleet.wait_for("allocations", bound, args.allocate_timeout, 1.0)
    converge = time.monotonic() - started
    ours += polls
    by_after = apiserver.requests_by()
    after = sum(by_after.values())
    ours += 1
    deltas = sorted(((v - by_before.get(k, 0), k) for k, v in by_after.items()), reverse=True)
    sys.stderr.write("API requests during allocation (all clients; the benchmark made "
                     f"{n} creates and {polls} lists of metalmachines):\n")
    for count, (verb, resource, sub) in deltas[:15]:
        if count:
            sys.stderr.write(f"  {count:7d} {verb} {resource}{'/' + sub if sub else ''}\n")
    _, bindings = rest.request("GET", "/apis/infrastructure.cluster.x-k8s.io/v1alpha3/serverbindings?limit=50000")
    per_machine: dict[str, int] = {}
    for b in bindings.get("items") or []:
        key = b["spec"]["metalMachineRef"]["name"]
        per_machine[key] = per_machine.get(key, 0) + 1
    doubles = sum(1 for v in per_machine.values() if v > 1)
    if doubles:
        raise RuntimeError(f"{doubles} MetalMachines hold more than one binding")
    sidero_requests = after - before - ours
    return {"alloc_s": converge, "alloc_per_s": n / converge,
            "alloc_requests": sidero_requests / n, "alloc_doubles": float(doubles)}


# --- table ---------------------------------------------------------------------------------------


def med(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.median(values)
    return f"{m:.3g} ({min(values):.3g}–{max(values):.3g})" if len(values) > 1 else f"{m:.3g}"


def table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [f"fleet: {args.servers} servers, {args.classes} classes, {args.machines} bound machines;"
             f" {args.rate} req/s for {args.duration:g}s per route; {args.runs} runs, median (min–max)",
             "| store | measure | rate/s | p50 ms | p99 ms | max ms | errors | CPU ms/request |",
             "|---|---|---|---|---|---|---|---|"]
    for store, runs in results.items():
        for route in ("/boot.ipxe", "/ipxe?uuid=", "/configdata?uuid=", "nginx static file"):
            rows = [r[route] for r in runs]
            lines.append(f"| {store} | {route} | {med([r['rate'] for r in rows])} | {med([r['p50'] for r in rows])}"
                         f" | {med([r['p99'] for r in rows])} | {med([r['max'] for r in rows])}"
                         f" | {med([r['errors'] for r in rows])} | {med([r['cpu_ms'] for r in rows])} |")
        for key, label in (("class_join_s", "ServerClass status after a server joins (s)"),
                           ("class_widen_s", "ServerClass status after its selector widens (s)"),
                           ("rss_mib", "sidero RSS (MiB)"), ("load_s", "fleet load (s)"),
                           ("sync_s", "caches hold the fleet after load (s)"),
                           ("converge_s", "controllers converged after that (s)"),
                           ("cold_configdata_ms", "first /configdata of a machine, sequential (ms)"),
                           ("alloc_s", "allocations converged (s)"),
                           ("alloc_per_s", "allocations per second"),
                           ("alloc_requests", "API requests per allocation"),
                           ("alloc_doubles", "machines with two bindings")):
            values = [float(r[key]) for r in runs if key in r]
            if values:
                lines.append(f"| {store} | {label} | {med(values)} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet.bench_fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--machines", type=int, default=1_000)
    parser.add_argument("--rate", type=int, default=1_000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stores", default="embedded,kubernetes")
    parser.add_argument("--allocate", type=int, default=0,
                        help="MetalMachines to allocate after the boot load (Kubernetes store)")
    parser.add_argument("--allocate-timeout", type=float, default=3600.0)
    parser.add_argument("--converge-timeout", type=float, default=3600.0,
                        help="seconds to wait for sidero's controllers to go idle after the load")
    parser.add_argument("--kube-api-qps", type=float, default=20.0)
    parser.add_argument("--kube-api-burst", type=int, default=30)
    args = parser.parse_args(argv)
    vegeta = vegeta_binary()
    results: dict[str, list[dict[str, Any]]] = {}
    for store in [s.strip() for s in args.stores.split(",") if s.strip()]:
        for _ in range(args.runs):
            work = Path(tempfile.mkdtemp(prefix=f"sidero-bench-fleet-{store}-"))
            try:
                results.setdefault(store, []).append(run_once(store, args, vegeta, work))
                sys.stderr.write(table(results, args) + "\n")  # progress: the table so far
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print(table(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
