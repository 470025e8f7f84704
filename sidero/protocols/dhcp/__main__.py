"""Run the DHCP proxy alone: ``python -m sidero.protocols.dhcp --endpoint IP ...``.

Meant for namespaces in tests, benchmarks and the QEMU end-to-end harness. Logs go to
stdout as text (``--log-level debug`` adds a line per reply); steps go to an in-memory boot
timeline as in ``twistd sidero``; on SIGTERM/SIGINT the counters are printed as one JSON line
(``dhcp-proxy counters {...}``) before exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from sidero.protocols.dhcp.policy import BootFiles
from sidero.protocols.dhcp.ratelimit import PerClientLimiter
from sidero.protocols.dhcp.service import DHCPProxyService
from sidero.timeline import BootTimeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sidero.protocols.dhcp", description=__doc__)
    p.add_argument("--endpoint", required=True, help="API endpoint (IPv4 or name)")
    p.add_argument("--api-port", type=int, default=8081)
    p.add_argument("--interface", default=None,
                   help="interface to bind (default: the one owning the endpoint IP)")
    p.add_argument("--dhcp-port", type=int, default=67)
    p.add_argument("--proxy-port", type=int, default=4011, help="0 disables the 4011 listener")
    p.add_argument("--bios-file", default=BootFiles.bios)
    p.add_argument("--x86-efi-file", default=BootFiles.x86_efi)
    p.add_argument("--arm64-efi-file", default=BootFiles.arm64_efi)
    p.add_argument("--ipxe-script", default=BootFiles.ipxe_script)
    p.add_argument("--mac-rate", type=float, default=2.0,
                   help="packets per second answered per client MAC (0: no limit)")
    p.add_argument("--mac-burst", type=int, default=10)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from twisted.internet import reactor

    level = LogLevel.levelWithName(args.log_level)
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = DHCPProxyService(
        reactor, endpoint=args.endpoint, api_port=args.api_port, interface=args.interface,
        dhcp_port=args.dhcp_port, proxy_port=args.proxy_port or None,
        boot_files=BootFiles(bios=args.bios_file, x86_efi=args.x86_efi_file,
                             arm64_efi=args.arm64_efi_file, ipxe_script=args.ipxe_script),
        limiter=PerClientLimiter(args.mac_rate, args.mac_burst, reactor.seconds),
        trace=level == LogLevel.debug,
    )
    # Fed as in twistd sidero, so what runs here (tests, benchmarks) costs what the product does.
    service.timeline = BootTimeline(reactor.seconds)
    service.privilegedStartService()
    service.startService()

    def report() -> None:
        out: dict[str, Any] = service.counters.as_dict()
        out["failure"] = service.failure
        sys.stdout.write("dhcp-proxy counters " + json.dumps(out, sort_keys=True) + "\n")
        sys.stdout.flush()

    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", report)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
