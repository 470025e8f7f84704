"""Benchmark (not a test): perfdhcp against our DHCP proxy vs dnsmasq in proxy mode.

Same namespaces, same run, same load. perfdhcp acts as a relay (giaddr) in its own namespace
and sends PXE DISCOVERs (option 60 PXEClient, option 93 = 0) from C{--clients} simulated
clients to each proxy in turn, DISCOVER→OFFER only (C{-i}). Two measurements per round and
peer, the peers interleaved so a burst of load from elsewhere does not land on one only:

* throughput: C{--max-rate} offered (far above what either answers): OFFERs received per
  second and the share of DISCOVERs left unanswered (perfdhcp's "drops");
* server CPU: the proxy's CPU seconds during the throughput run per answer (what it would
  sustain on a core of its own; far less skewed by other work on the machine than the rate);
* latency: C{--latency-rate} offered (1000/s), every exchange's time from perfdhcp's own
  timers (C{-x t}): median and 99th percentile.

The same two for REQUEST→ACK on :4011, driven by L{bench.dhcp.ack_load} (perfdhcp cannot).

dnsmasq is configured as an operator would run a PXE proxy: C{dhcp-range=<net>,proxy}, two
C{pxe-service} lines, C{quiet-dhcp} (neither side logs a line per packet; ours logs none at
info). Prints one table: medians over C{--rounds} with the spread (min-max).

Needs root, dnsmasq, perfdhcp (kea-admin). Bounded: about (2 x seconds + 3) x 2 x rounds s.

Run: ``sudo python -m bench.dhcp.bench_proxy [--rounds 3] [--seconds 10]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from math import nan
from pathlib import Path

from bench.cpu import CPUMeter
from tests.netlab import NetLab, missing_requirements
from tests.paths import REPO, tree_env

PXE_VENDOR = b"PXEClient:Arch:00000:UNDI:002001"
PEERS = ("sidero", "dnsmasq")
_TIMER = re.compile(r"sent / received: ([\d.]+) / ([\d.]+)")


def parse(out: str) -> dict[str, float]:
    """perfdhcp's final report (DISCOVER-OFFER), plus per-exchange latencies under C{-x t}."""
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")

    sent, received = num(r"sent packets: (\d+)"), num(r"received packets: (\d+)")
    result = {
        "sent": sent, "received": received, "drops": num(r"drops: (\d+)"),
        "rate": num(r"Rate: ([\d.]+)"), "avg_ms": num(r"avg delay: ([\d.]+) ms"),
        "drop_pct": 100 * (1 - received / sent) if sent else float("nan"),
    }
    delays = sorted((float(r) - float(s)) * 1000 for s, r in _TIMER.findall(out))
    if delays:
        result["p50_ms"] = delays[len(delays) // 2]
        result["p99_ms"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return result


def run_perfdhcp(lab: NetLab, ns: str, src: str, server: str, rate: int, seconds: int,
                 clients: int, timers: bool) -> str:
    argv = ["ip", "netns", "exec", ns, "perfdhcp", "-4", "-l", src, "-r", str(rate),
            "-p", str(seconds), "-R", str(clients), "-i", "-W", "500000",
            "-o", f"60,{PXE_VENDOR.hex()}", "-o", "93,0000"]
    if timers:
        argv += ["-x", "t"]
    done = subprocess.run([*argv, server], capture_output=True, timeout=seconds + 30)
    return done.stdout.decode(errors="replace")


def dnsmasq_proxy(lab: NetLab, ns: str) -> subprocess.Popen[bytes]:
    """dnsmasq as a PXE proxy on C{ns}'s eth0, without per-packet log lines."""
    conf = lab.workdir / "dnsmasq-proxy.conf"
    conf.write_text("\n".join([
        "port=0", "interface=eth0", "bind-interfaces", "quiet-dhcp",
        f"dhcp-leasefile={lab.workdir / 'dnsmasq.leases'}",
        f"dhcp-range={lab.ip(0)},proxy",
        'pxe-service=x86PC,"sidero",undionly', 'pxe-service=X86-64_EFI,"sidero",snp.efi',
        "dhcp-no-override",
    ]) + "\n")
    log = lab.workdir / "dnsmasq.log"
    proc = lab.spawn(ns, ["dnsmasq", "-C", str(conf), "-k", "--log-facility=-",
                          f"--pid-file={lab.workdir / 'dnsmasq.pid'}"], log)
    lab.wait_for(log, "started, version", 10, proc)
    return proc


def spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def run_ack_load(lab: NetLab, ns: str, src: str, server: str, rate: int, seconds: int,
                 clients: int) -> dict[str, float]:
    """bench.dhcp.ack_load in C{ns}: its JSON result (empty if it failed)."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.dhcp.ack_load", server,
         "--source", src, "--rate", str(rate), "--seconds", str(seconds),
         "--clients", str(clients)],
        capture_output=True, timeout=seconds + 30, cwd=REPO, env=tree_env())
    try:
        result: dict[str, float] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return result


def unanswered(sent: list[float], received: list[float]) -> list[float]:
    return [100 * (1 - r / s) for s, r in zip(sent, received, strict=False) if s]


def ratios(ours: list[float], ref: list[float]) -> list[float]:
    """Round by round (the peers ran back to back in each round)."""
    return [a / b for a, b in zip(ours, ref, strict=False) if b and a == a and b == b]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10, help="per measurement (max 30)")
    ap.add_argument("--max-rate", type=int, default=100000, help="DISCOVERs/s offered for throughput")
    ap.add_argument("--latency-rate", type=int, default=1000, help="DISCOVERs/s for latency")
    ap.add_argument("--clients", type=int, default=100000, help="simulated clients (-R)")
    args = ap.parse_args(argv)
    seconds = max(1, min(args.seconds, 30))
    reason = missing_requirements(("dnsmasq", "perfdhcp"))
    if reason:
        print(f"bench skipped: {reason}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="dhcp-bench-"))
    lab = NetLab(f"sdb{os.getpid() % 100000}", 72, work)
    results: dict[str, dict[str, list[float]]] = {p: {} for p in PEERS}
    load_start = os.getloadavg()[0]
    meters: dict[str, CPUMeter] = {}
    try:
        lab.setup_switch()
        ours_ns = lab.add_host("ours", 2)
        ref_ns = lab.add_host("ref", 3)
        load_ns = lab.add_host("load", 9)
        log = work / "proxy.log"
        proxy = lab.spawn_proxy(ours_ns, log, "--endpoint", lab.ip(2))
        lab.wait_for(log, "DHCP proxy listening", 20, proxy)
        meters["sidero"] = CPUMeter(proxy.pid, "sidero")
        dnsmasq = dnsmasq_proxy(lab, ref_ns)
        meters["dnsmasq"] = CPUMeter(dnsmasq.pid, "dnsmasq")
        servers = {"sidero": lab.ip(2), "dnsmasq": lab.ip(3)}
        for rnd in range(args.rounds):
            for name, server in servers.items():
                for kind, rate, timers in (("max", args.max_rate, False),
                                           ("lat", args.latency_rate, True)):
                    before = meters[name].seconds()
                    out = run_perfdhcp(lab, load_ns, lab.ip(9), server, rate, seconds,
                                       args.clients, timers)
                    used = meters[name].seconds() - before
                    (work / f"perfdhcp-{name}-{kind}-{rnd}.txt").write_text(out)
                    got = parse(out)
                    got["cpu_us"] = used / got["received"] * 1e6 if got["received"] else nan
                    for key, value in got.items():
                        results[name].setdefault(f"{kind}_{key}", []).append(value)
                for kind, rate in (("ackmax", 0), ("acklat", args.latency_rate)):
                    before = meters[name].seconds()
                    got = run_ack_load(lab, load_ns, lab.ip(9), server, rate, seconds,
                                       args.clients)
                    used = meters[name].seconds() - before
                    got["cpu_us"] = used / got["received"] * 1e6 if got.get("received") else nan
                    for key, value in got.items():
                        results[name].setdefault(f"{kind}_{key}", []).append(value)
        lab.stop(proxy)
    finally:
        lab.teardown()
        for meter in meters.values():
            meter.close()
    print(f"DHCP proxy vs dnsmasq proxy mode, {args.clients} clients, {seconds}s per "
          f"measurement, median [min-max] of {args.rounds} rounds; logs in {work}")
    print(f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end, on "
          f"{os.cpu_count()} CPUs (other work on the machine skews every figure)")
    print(":67 DISCOVER->OFFER: perfdhcp -i via a relay, max = -r "
          f"{args.max_rate}; :4011 REQUEST->ACK: bench.dhcp.ack_load, max = 64 outstanding")
    header = (f"{'exchange':<14} {'peer':<8} | {'answered/s at max':>22} | "
              f"{'unanswered %':>18} | {'CPU us/answer at max':>22} | "
              f"{'p50 ms @' + str(args.latency_rate) + '/s':>20} | "
              f"{'p99 ms @' + str(args.latency_rate) + '/s':>20}")
    print(header)
    print("-" * len(header))
    for label, mx, lat in ((":67 offer", "max", "lat"), (":4011 ack", "ackmax", "acklat")):
        for name in PEERS:
            r = results[name]
            drops = unanswered(r.get(f"{mx}_sent", []), r.get(f"{mx}_received", []))
            print(f"{label:<14} {name:<8} | {spread(r.get(f'{mx}_rate', []), '.0f'):>22} | "
                  f"{spread(drops, '.1f'):>18} | "
                  f"{spread(r.get(f'{mx}_cpu_us', []), '.1f'):>22} | "
                  f"{spread(r.get(f'{lat}_p50_ms', []), '.3f'):>20} | "
                  f"{spread(r.get(f'{lat}_p99_ms', []), '.3f'):>20}")
        ours, ref = results["sidero"], results["dnsmasq"]
        print(f"{label:<14} {'ratio':<8} | "
              f"{spread(ratios(ours.get(f'{mx}_rate', []), ref.get(f'{mx}_rate', [])), '.2f') + 'x':>22} | "
              f"{'':>18} | "
              f"{spread(ratios(ours.get(f'{mx}_cpu_us', []), ref.get(f'{mx}_cpu_us', [])), '.2f') + 'x':>22} | "
              f"{spread(ratios(ours.get(f'{lat}_p50_ms', []), ref.get(f'{lat}_p50_ms', [])), '.2f') + 'x':>20} | "
              f"{spread(ratios(ours.get(f'{lat}_p99_ms', []), ref.get(f'{lat}_p99_ms', [])), '.2f') + 'x':>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
