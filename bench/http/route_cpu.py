"""CPU per request of the API port's boot routes, in-process: where the fleet benchmark's
per-request cost goes, without sockets, a load generator or a second process.

Not a peer benchmark (those are `bench_http` and `bench.fleet`): it builds the site as
`twistd sidero` does (the limited channel, `BootRoutes` over the Klein app, the metrics
wrapper, the boot timeline, the JSON log observer writing to /dev/null) over the fleet
benchmark's objects, feeds keep-alive requests into one channel through a StringTransport
and reports `time.process_time` per request. Each route is also sent through Klein's
werkzeug routing instead of `BootRoutes` (how the boot routes were answered before), the two
alternating round by round, so one run shows what the direct routes save.

    python -m bench.http.route_cpu [--requests 20000] [--rounds 5] [--servers 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

from bench.fleet import fleet
from bench.lookup import ObjectLookup
from sidero.logs import make_observer
from sidero.metrics import Metrics
from sidero.protocols.http.ipxe import BootSettings
from sidero.protocols.http.limits import HTTPLimits, guarded_site
from sidero.protocols.http.site import BootSite
from sidero.timeline import BootTimeline

ENVIRONMENT_NAMES = ("default", "agent-amd64", "agent-arm64")


#: The fleet's kinds as the lookup names them.
LOOKUP_KINDS = {"Server": "server", "ServerBinding": "binding", "ServerClass": "class",
                "MetalMachine": "metalmachine", "Secret": "secret"}


def fleet_lookup(servers: int, classes: int, machines: int) -> ObjectLookup:
    """The fleet benchmark's objects (with the uid and resourceVersion a store gives them, so
    /configdata answers are cached as in the service) and ready Environments."""
    lookup = ObjectLookup()
    for n, obj in enumerate(fleet.boot_fleet(servers, classes, machines)):
        obj["metadata"].update(uid=f"uid-{n}", resourceVersion="1")
        lookup.add(LOOKUP_KINDS[obj["kind"]], obj)
    for name in ENVIRONMENT_NAMES:
        url = f"http://10.0.0.1:8081/env/{name}/"
        lookup.add("environment", {
            "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1"},
            "spec": {"kernel": {"url": url + "vmlinuz", "args": ["console=ttyS0"]},
                     "initrd": {"url": url + "initramfs.xz"}},
            "status": {"conditions": [
                {"type": "Ready", "status": "True", "url": url + "vmlinuz"},
                {"type": "Ready", "status": "True", "url": url + "initramfs.xz"}]},
        })
    return lookup


def make_site(lookup: ObjectLookup, env_dir: str, klein: bool) -> Any:
    """The API port's HTTP/1.1 site as the tap builds it, on a Clock."""
    clock = Clock()
    boot = BootSite(lookup, BootSettings("10.0.0.1", 8081, siderolink_server_address="fdae::1",
                                         configdata_access="any"), env_dir, [])
    timeline = BootTimeline(clock.seconds)
    boot.timeline = timeline
    root = boot.app.resource() if klein else boot.resource()
    return guarded_site(Metrics().instrument_resource(root, timeline), clock, HTTPLimits(), {})


def requests_for(route: str, servers: int, machines: int) -> Callable[[int], bytes]:
    """Request i of C{route}: uuids rotating over every server (and, for /ipxe, one in ten
    unknown), /configdata over the bound machines, as the fleet benchmark sends them."""
    head = b" HTTP/1.1\r\nHost: 10.0.0.1:8081\r\nUser-Agent: iPXE/1.21.1\r\n\r\n"
    if route == "/boot.ipxe":
        return lambda i: b"GET /boot.ipxe" + head
    if route == "/ipxe":
        def ipxe(i: int) -> bytes:
            index = i % servers if i % 10 else servers + i
            return (b"GET /ipxe?uuid=%s&mac=%s&arch=x86_64" % (
                fleet.server_name(index).encode(), fleet.mac(index).encode())) + head
        return ipxe
    return lambda i: b"GET /configdata?uuid=%s" % fleet.server_name(i % machines).encode() + head


def measure(site: Any, request: Callable[[int], bytes], count: int) -> float:
    """CPU seconds per request over C{count} keep-alive requests on one connection."""
    peer = IPv4Address("TCP", "10.0.0.5", 40000)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.0.0.1", 8081))
    channel = site.buildProtocol(peer)
    channel.makeConnection(transport)
    payloads = [request(i) for i in range(count)]
    start = time.process_time()
    for payload in payloads:
        channel.dataReceived(payload)
        if not transport.value().startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"unexpected answer to {payload[:80]!r}: {transport.value()[:200]!r}")
        transport.clear()
    spent = time.process_time() - start
    channel.connectionLost(None)
    return spent / count


def run(requests: int, rounds: int, servers: int, classes: int, machines: int) -> list[str]:
    """The table's lines: each route through both sites, alternating, after one untimed round
    (every bound machine's config rendered once: the fleet benchmark times the first apart)."""
    lookup = fleet_lookup(servers, classes, machines)
    with tempfile.TemporaryDirectory(prefix="route-cpu-env-") as env_dir:  # no route reads it
        sites = {klein: make_site(lookup, env_dir, klein) for klein in (False, True)}
    routes = ("/boot.ipxe", "/ipxe", "/configdata")
    results: dict[tuple[str, bool], list[float]] = {(r, k): [] for r in routes for k in sites}
    for round_ in range(rounds + 1):
        for route in routes:
            request = requests_for(route, servers, machines)
            for klein, site in sites.items():
                spent = measure(site, request, max(requests, machines) if round_ == 0 else requests)
                if round_:
                    results[(route, klein)].append(spent)

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e6:.0f} [{min(values) * 1e6:.0f}-{max(values) * 1e6:.0f}]"

    lines = [f"CPU per request, µs: median [min-max] of {rounds} rounds of {requests} requests "
             f"({servers} Servers, {classes} ServerClasses, {machines} bound machines)",
             "| route | BootRoutes | through Klein | saved |", "|---|---|---|---|"]
    for route in routes:
        direct, routed = results[(route, False)], results[(route, True)]
        saved = 1 - statistics.median(direct) / statistics.median(routed)
        lines.append(f"| {route} | {cell(direct)} | {cell(routed)} | {saved:.0%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per route per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--servers", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--machines", type=int, default=1_000)
    args = parser.parse_args(argv)
    devnull = open(os.devnull, "w")  # held for the process's life
    globalLogBeginner.beginLoggingTo([make_observer("json", "info", stream=devnull)],
                                     discardBuffer=True, redirectStandardIO=False)
    print("\n".join(run(args.requests, args.rounds, args.servers, args.classes, args.machines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
