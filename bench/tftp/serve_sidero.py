"""Run sidero's TFTP server alone, for the benchmark (not part of the product).

Usage: python bench/tftp/serve_sidero.py ROOT PORT single|standard [--profile FILE]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> None:
    root, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    profile = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--profile" else None

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from sidero.protocols.tftp.service import make_tftp_service

    globalLogBeginner.beginLoggingTo([
        FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
        )
    ])
    service = make_tftp_service(
        reactor, roots=[root], port=port, interface="127.0.0.1", single_port=mode == "single",
    )
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if profile:
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, profile)
    else:
        reactor.run()


if __name__ == "__main__":
    main()
