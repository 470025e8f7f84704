"""Run sidero's TFTP server alone, for the benchmark (not part of the product).

Usage: python bench/tftp/serve_sidero.py ROOT PORT single|standard [--workers N]
       [--profile FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("port", type=int)
    ap.add_argument("mode", choices=("single", "standard"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from sidero.protocols.tftp.service import make_tftp_service
    from sidero.timeline import BootTimeline

    globalLogBeginner.beginLoggingTo([
        FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
        )
    ])
    service = make_tftp_service(
        reactor, roots=[args.root], port=args.port, interface="127.0.0.1",
        single_port=args.mode == "single", workers=args.workers,
    )
    # Fed as in twistd sidero: counters and the boot timeline cost what they cost there.
    for child in service:  # type: ignore[attr-defined]
        protocol = getattr(child, "protocol", None)
        if protocol is not None:
            protocol.timeline = BootTimeline(reactor.seconds)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if args.profile:
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, args.profile)
    else:
        reactor.run()


if __name__ == "__main__":
    main()
