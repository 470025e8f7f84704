"""Benchmark (not a test): perfdhcp against our DHCP proxy vs dnsmasq in proxy mode.

Same namespaces, same run, same load: perfdhcp acts as a relay (giaddr) in its own
namespace and sends PXE DISCOVERs (option 60 PXEClient, option 93 = 0) to each proxy in
turn, DISCOVER→OFFER only. Prints rate, drops and latency for both and the ratio.
Needs root, dnsmasq, perfdhcp (kea-admin). Bounded: at most ~60 s.

Run: ``sudo /work/venv/bin/python -m bench.dhcp.bench_proxy [--rate N] [--seconds S]``
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from tests.netlab import NetLab, missing_requirements

PXE_VENDOR = b"PXEClient:Arch:00000:UNDI:002001"


def parse(out: str) -> dict[str, float]:
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else float("nan")

    return {
        "sent": num(r"sent packets: (\d+)"),
        "received": num(r"received packets: (\d+)"),
        "drops": num(r"drops: (\d+)"),
        "rate": num(r"Rate: ([\d.]+)"),
        "min_ms": num(r"min delay: ([\d.]+) ms"),
        "avg_ms": num(r"avg delay: ([\d.]+) ms"),
        "max_ms": num(r"max delay: ([\d.]+) ms"),
    }


def run_perfdhcp(lab: NetLab, ns: str, src: str, server: str, rate: int, seconds: int) -> str:
    return lab.run(
        "ip", "netns", "exec", ns, "perfdhcp", "-4", "-l", src, "-r", str(rate),
        "-p", str(seconds), "-R", "100000", "-i", "-W", "500000",
        "-o", f"60,{PXE_VENDOR.hex()}", "-o", "93,0000", server,
        timeout=seconds + 20, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=3000, help="DISCOVERs/s offered to each proxy")
    ap.add_argument("--seconds", type=int, default=15, help="load per proxy (max 25)")
    args = ap.parse_args(argv)
    seconds = min(args.seconds, 25)
    reason = missing_requirements(("dnsmasq", "perfdhcp"))
    if reason:
        print(f"bench skipped: {reason}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="dhcp-bench-"))
    lab = NetLab(f"sdb{os.getpid() % 100000}", 72, work)
    results: dict[str, dict[str, float]] = {}
    try:
        lab.setup_switch()
        ours_ns = lab.add_host("ours", 2)
        ref_ns = lab.add_host("ref", 3)
        load_ns = lab.add_host("load", 9)
        log = work / "proxy.log"
        proxy = lab.spawn_proxy(ours_ns, log, "--endpoint", lab.ip(2))
        lab.wait_for(log, "DHCP proxy listening", 20, proxy)
        lab.site_dnsmasq(ref_ns, proxy_pxe=True)
        for name, server in (("sidero", lab.ip(2)), ("dnsmasq", lab.ip(3))):
            out = run_perfdhcp(lab, load_ns, lab.ip(9), server, args.rate, seconds)
            (work / f"perfdhcp-{name}.txt").write_text(out)
            results[name] = parse(out)
    finally:
        lab.teardown()
    print(f"perfdhcp -i (DISCOVER->OFFER), offered {args.rate}/s for {seconds}s each; logs in {work}")
    cols = ("sent", "received", "drops", "rate", "min_ms", "avg_ms", "max_ms")
    print(f"{'proxy':<8} " + " ".join(f"{c:>9}" for c in cols))
    for name, r in results.items():
        print(f"{name:<8} " + " ".join(f"{r[c]:>9.3f}" if c.endswith("ms") or c == "rate"
                                      else f"{r[c]:>9.0f}" for c in cols))
    s, d = results["sidero"], results["dnsmasq"]
    if d["received"]:
        print(f"answered ratio sidero/dnsmasq: {s['received'] / d['received']:.2f}")
    if s["avg_ms"] and d["avg_ms"]:
        print(f"avg latency ratio sidero/dnsmasq: {s['avg_ms'] / d['avg_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
