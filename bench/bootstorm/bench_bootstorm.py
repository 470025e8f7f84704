"""Boot storm: N simulated PXE machines boot at once, sidero vs dnsmasq + nginx (same run).

Benchmark (not a test). Needs root, dnsmasq, nginx, curl. Everything is in namespaces this
harness creates on one bridge and removes (L{tests.netlab.NetLab}):

* C{sidero} (10.214.0.2): ``twistd sidero`` on the embedded store with its DHCP proxy, TFTP
  and API port (8081); N accepted Servers registered through the management API before the
  runs. They have no ServerBinding, so C{/ipxe} answers each the agent environment, whose
  kernel and initrd are files in C{<state>/env/agent-amd64/}.
* C{ref} (10.214.0.3): dnsmasq as proxy DHCP (BIOS PXE -> C{undionly.kpxe}, iPXE ->
  C{http://10.214.0.3:8081/boot.ipxe}) and TFTP (the same iPXE binary), with
  C{tftp-max} raised to N like sidero's session limit; nginx (sendfile) serving the same
  C{/boot.ipxe} script, a fixed C{/ipxe} answer (the agent script sidero gives, pointing at
  nginx) and the same kernel and initrd files; its C{send_timeout} raised to 600 s, as sidero
  has no send timeout (with the default 60 s, CPU-starved clients lose downloads).
* The storm's route uses cubic congestion control (BBR, this host's default, stalled
  downloads of CPU-starved clients in both pipelines).
* C{c0..}: one namespace and one client process (L{bench.bootstorm.client}) per
  C{--per-client} machines, each machine with its own address; the process is the DHCP relay
  of its machines, so both proxies can run at once without hearing each other's clients.

A run starts every client at the same wall-clock instant and waits for all; its time is the
moment the last machine had its whole initrd, and every machine must have booted. The
pipelines take turns run after run. One table: per pipeline the median time (min-max), the
failed boots, the DHCP DISCOVERs sent again (no OFFER in time), and the ratio dnsmasq+nginx time / sidero time (>= 1 means sidero is as fast or
faster), median of the per-run ratios with their spread.

    python -m bench.bootstorm.bench_bootstorm [--machines 1000] [--per-client 100]
        [--kernel-mib 8] [--initrd-mib 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

import yaml

from bench.sidero_proc import nginx_conf, start_sidero, wait_http
from sidero.protocols.http.ipxe import (
    BootSettings,
    agent_kernel_args,
    boot_script,
    render_environment_script,
)
from tests.netlab import NetLab, missing_requirements
from tests.paths import REPO, tree_env

NET = "10.214"
SIDERO_IP, REF_IP = f"{NET}.0.2", f"{NET}.0.3"
PORT = 8081
FIRST_MACHINE = 10


def machine_uuid(n: int) -> str:
    """The UUID the client gives machine C{n} (L{bench.bootstorm.client.boot})."""
    return str(uuid_module.UUID(int=(0xB007 << 112) | n))


class Storm:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.lab = NetLab(f"sbs{os.getpid() % 100000}", 214, work)
        self.clients: list[tuple[str, str, str, int, int]] = []  # ns, relay, net, count, id
        self.kernel_size = args.kernel_mib << 20
        self.initrd_size = args.initrd_mib << 20
        self.saved = 0

    # -- set-up ---------------------------------------------------------------------------

    def mac_of(self, ns: str) -> str:
        out = self.lab.run("ip", "-n", ns, "-o", "link", "show", "eth0")
        m = re.search(r"link/ether ([0-9a-f:]{17})", out)
        assert m, out
        return m.group(1)

    def batch(self, ns: str, commands: list[str]) -> None:
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n",
                       text=True, check=True, capture_output=True)

    def network(self) -> None:
        lab = self.lab
        lab.setup_switch()
        self.sidero_ns = lab.add_host("sidero", None)
        self.ref_ns = lab.add_host("ref", None)
        self.batch(self.sidero_ns, [f"addr add {SIDERO_IP}/16 dev eth0"])
        self.batch(self.ref_ns, [f"addr add {REF_IP}/16 dev eth0"])
        left, k = self.args.machines, 0
        while left > 0:
            count = min(left, self.args.per_client)
            ns = lab.add_host(f"c{k}", None)
            net = f"{NET}.{k + 1}"
            self.batch(ns, [f"addr add {net}.1/16 dev eth0"] + [
                f"addr add {net}.{FIRST_MACHINE + i}/16 dev eth0" for i in range(count)])
            self.clients.append((ns, f"{net}.1", net, count, self.args.machines - left))
            left -= count
            k += 1
        # This host's default congestion control, BBR, was seen pacing a connection to a few
        # bit/s after a zero-window stall of a CPU-starved client (either pipeline: nginx lost
        # such downloads to its send_timeout, sidero's hung): the storm's network uses cubic,
        # set on its route (a namespace may not choose it by sysctl here).
        for ns in [self.sidero_ns, self.ref_ns] + [c[0] for c in self.clients]:
            self.batch(ns, [f"route replace {NET}.0.0/16 dev eth0 congctl cubic"])
        # The kernel's neighbour table is shared by every namespace and holds 1024 learnt
        # entries: permanent ones (not counted) keep a thousand machines from overflowing it.
        server_macs = {SIDERO_IP: self.mac_of(self.sidero_ns), REF_IP: self.mac_of(self.ref_ns)}
        for ns, relay, net, count, _ in self.clients:
            mac = self.mac_of(ns)
            ips = [relay] + [f"{net}.{FIRST_MACHINE + i}" for i in range(count)]
            for server_ns in (self.sidero_ns, self.ref_ns):
                self.batch(server_ns, [f"neigh replace {ip} lladdr {mac} dev eth0 nud permanent"
                                       for ip in ips])
            self.batch(ns, [f"neigh replace {ip} lladdr {m} dev eth0 nud permanent"
                            for ip, m in server_macs.items()])

    def assets(self) -> None:
        env = self.work / "state" / "env" / "agent-amd64"
        env.mkdir(parents=True)
        for name, size in (("vmlinuz", self.kernel_size), ("initramfs.xz", self.initrd_size)):
            with open(env / name, "wb") as f:
                for _ in range(size >> 20):
                    f.write(os.urandom(1 << 20))
                f.write(os.urandom(size & ((1 << 20) - 1)))

    def start_sidero(self) -> None:
        self.sidero_log = self.work / "sidero.log"
        self.metrics_port = 9091
        proc = start_sidero(
            self.work, PORT, log=self.sidero_log, address=SIDERO_IP, netns=self.sidero_ns,
            services=("dhcp-proxy", "tftp"), metrics_port=self.metrics_port,
            extra=("--dhcp-interface", "eth0", "--talos-assets-url", "http://127.0.0.1:1",
                   "--no-enable-leader-election"))
        self.lab.procs.append(proc)
        wait_http(f"http://{SIDERO_IP}:{PORT}/healthz", proc, netns=self.sidero_ns)
        # The TFTP root is filled before the reactor runs: the same binary goes to dnsmasq.
        self.tftp_root = self.work / "tftp"
        self.tftp_root.mkdir()
        shutil.copy(self.work / "state" / "tftp" / "undionly.kpxe", self.tftp_root)
        (self.tftp_root / "undionly.kpxe").chmod(0o644)

    def register_servers(self) -> None:
        docs = [yaml.safe_dump({"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                            "metadata": {"name": machine_uuid(n)},
                            "spec": {"accepted": True, "hostname": f"storm-{n}"}})
                for n in range(self.args.machines)]
        path = self.work / "servers.yaml"
        path.write_text("---\n".join(docs))
        res = subprocess.run(
            [sys.executable, "-m", "sidero.management.cli", "--socket",
             str(self.work / "management.sock"), "apply", "-f", str(path)],
            capture_output=True, text=True, timeout=600, cwd=REPO, env=tree_env())
        if res.returncode != 0:
            raise SystemExit(f"registering servers failed: {res.stderr[-2000:]}")
        self.wait_settled()

    def scrape(self) -> str:
        return self.lab.run("ip", "netns", "exec", self.sidero_ns, "curl", "-sf",
                            f"http://{SIDERO_IP}:{self.metrics_port}/metrics")

    def wait_settled(self, timeout: float = 300) -> None:
        """Until the controllers' work queues have been empty for two scrapes in a row."""
        deadline, quiet = time.monotonic() + timeout, 0
        while time.monotonic() < deadline and quiet < 2:
            depth = sum(float(v) for v in re.findall(r"^workqueue_depth\{[^}]*\} (\S+)$",
                                                     self.scrape(), re.M))
            quiet = quiet + 1 if depth == 0 else 0
            time.sleep(1)

    def start_ref(self) -> None:
        tag = "ipxe"
        conf = self.work / "dnsmasq.conf"
        conf.write_text("\n".join([
            "port=0", "interface=eth0", "bind-interfaces",
            f"dhcp-leasefile={self.work / 'dnsmasq.leases'}",
            f"dhcp-range={NET}.0.0,proxy,255.255.0.0",
            f"dhcp-userclass=set:{tag},iPXE",
            f'pxe-service=tag:!{tag},x86PC,"sidero",undionly.kpxe',
            f'pxe-service=tag:{tag},x86PC,"sidero",http://{REF_IP}:{PORT}/boot.ipxe',
            "enable-tftp", f"tftp-root={self.tftp_root}",
            f"tftp-max={max(50, self.args.machines)}",
        ]) + "\n")
        log = self.work / "dnsmasq.log"
        proc = self.lab.spawn(self.ref_ns, ["dnsmasq", "-C", str(conf), "-k",
                                            "--log-facility=-",
                                            f"--pid-file={self.work / 'dnsmasq.pid'}"], log)
        self.lab.wait_for(log, "started, version", 10, proc)
        web = self.work / "www"
        web.mkdir()
        (web / "boot.ipxe").write_bytes(boot_script(REF_IP, PORT))
        settings = BootSettings(REF_IP, PORT)
        script = render_environment_script("agent-amd64", agent_kernel_args(settings, ""))
        (web / "ipxe").write_bytes(script)
        ngx_work = self.work / "nginx"
        ngx_work.mkdir()
        conf_path = nginx_conf(ngx_work, f"{REF_IP}:{PORT}", {"/env/": self.work / "state" / "env"},
                               extra_http="default_type text/plain; send_timeout 600s;")
        text = conf_path.read_text().replace(
            "server {", f"server {{ location = /boot.ipxe {{ root {web}; }} "
                        f"location = /ipxe {{ root {web}; }} ", 1)
        conf_path.write_text(text)
        proc = self.lab.spawn(self.ref_ns, ["nginx", "-c", str(conf_path), "-e",
                                            str(ngx_work / "nginx.err")], self.work / "nginx.log")
        wait_http(f"http://{REF_IP}:{PORT}/boot.ipxe", proc, netns=self.ref_ns)

    # -- runs -----------------------------------------------------------------------------

    def run_once(self, name: str, server: str) -> dict[str, Any]:
        start_at = time.time() + 2.0 + 0.05 * len(self.clients)
        procs = []
        for ns, relay, net, count, id_base in self.clients:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.bootstorm.client",
                 "--server", server, "--relay", relay, "--net", net,
                 "--first", str(FIRST_MACHINE), "--machines", str(count),
                 "--id-base", str(id_base), "--start-at", repr(start_at)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=tree_env()))
        results: list[dict[str, Any]] = []
        errors = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=1800)
                if p.returncode != 0:
                    errors.append(err.decode(errors="replace")[-1500:])
                results += [json.loads(line) for line in out.decode().splitlines()
                            if line.strip()]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        self.saved += 1
        with open(self.work / f"machines-{self.saved}-{name}.json", "w") as f:
            json.dump({"start_at": start_at, "machines": results}, f)
        failed = [r for r in results if not r["ok"] or r.get("kernel_bytes") != self.kernel_size
                  or r.get("initrd_bytes") != self.initrd_size]
        missing = self.args.machines - len(results)
        done = [r["done"] - start_at for r in results if r["ok"]]
        resent = sum(r.get("dhcp_sends", 0) for r in results) - 2 * len(results)
        return {"seconds": max(done) if done else float("nan"), "dhcp_resent": resent,
                "median_machine": statistics.median(done) if done else float("nan"),
                "failed": len(failed) + missing,
                "errors": [r.get("error") for r in failed[:5]] + errors[:2]}

    def run(self) -> dict[str, list[dict[str, Any]]]:
        self.network()
        self.assets()
        self.start_sidero()
        self.register_servers()
        self.start_ref()
        runs: dict[str, list[dict[str, Any]]] = {"sidero": [], "dnsmasq+nginx": []}
        order = [("sidero", SIDERO_IP), ("dnsmasq+nginx", REF_IP)]
        for r in range(self.args.runs):
            for name, ip in (order if r % 2 == 0 else order[::-1]):
                runs[name].append(self.run_once(name, ip))
        self.check_metrics()
        return runs

    def check_metrics(self) -> None:
        """sidero's own count of the storm's requests (its metrics must stay right)."""
        text = self.scrape()
        self.metric_counts = {
            route: sum(float(v) for v in re.findall(
                r'^sidero_http_requests_total\{[^}]*code="200"[^}]*route="' + re.escape(route)
                + r'"[^}]*\} (\S+)$', text, re.M))
            for route in ("/boot.ipxe", "/ipxe", "/env")}


def table(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
          counts: dict[str, float]) -> str:
    lines = [f"Boot storm: {args.machines} machines ({len(runs['sidero'])} runs), kernel "
             f"{args.kernel_mib} MiB + initrd {args.initrd_mib} MiB each, "
             f"{-(-args.machines // args.per_client)} client namespaces",
             f"{'pipeline':<14} {'median s':>9} {'min':>8} {'max':>8} {'machine p50 s':>14}"
             f" {'failed':>7} {'DHCP resent':>12}"]
    for name, results in runs.items():
        secs = [r["seconds"] for r in results]
        lines.append(f"{name:<14} {statistics.median(secs):>9.2f} {min(secs):>8.2f} "
                     f"{max(secs):>8.2f} "
                     f"{statistics.median(r['median_machine'] for r in results):>14.2f} "
                     f"{sum(r['failed'] for r in results):>7d} "
                     f"{sum(r['dhcp_resent'] for r in results):>12d}")
    ratios = [ref["seconds"] / ours["seconds"]
              for ours, ref in zip(runs["sidero"], runs["dnsmasq+nginx"], strict=True)]
    lines.append(f"{'ratio':<14} {statistics.median(ratios):>9.2f} {min(ratios):>8.2f} "
                 f"{max(ratios):>8.2f}   (dnsmasq+nginx time / sidero time, per run)")
    lines.append("sidero's metrics, 200s: " + ", ".join(
        f"{route} {int(n)}" for route, n in counts.items()))
    for name, results in runs.items():
        for r in results:
            for e in r["errors"]:
                if e:
                    lines.append(f"  {name} failure: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machines", type=int, default=1000)
    ap.add_argument("--per-client", type=int, default=100, help="machines per client process")
    ap.add_argument("--kernel-mib", type=int, default=8)
    ap.add_argument("--initrd-mib", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    if args.per_client > 240:
        ap.error("--per-client is at most 240 (one /24 of addresses per client)")
    reason = missing_requirements(("dnsmasq", "nginx", "curl"))
    if reason:
        print(f"bench skipped: {reason}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="sbs-"))
    work.chmod(0o755)  # dnsmasq reads its TFTP root as an unprivileged user
    storm = Storm(args, work)
    try:
        runs = storm.run()
    finally:
        storm.lab.teardown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(args, runs, storm.metric_counts))
    if args.keep:
        print(f"logs in {work}")
    return 0 if all(r["failed"] == 0 for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
