"""A TFTP worker process: ``python -m sidero.protocols.tftp.worker`` (started by the service).

Serves the already-bound UDP socket it inherits as file descriptor 3 with the same
L{TFTPProtocol} the service runs in-process, configured by one JSON line on stdin, and
reports on stdout (see L{sidero.protocols.tftp.workers}). Not meant to be run by hand.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any, cast

from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
from zope.interface import provider

from sidero.protocols.tftp.session import SessionConfig
from sidero.protocols.tftp.workers import snapshot, stats_delta

SOCKET_FD = 3


def emit(message: dict[str, Any]) -> None:
    """One report line to the parent; a parent gone (EPIPE) ends this worker."""
    try:
        os.write(1, json.dumps(message, separators=(",", ":")).encode() + b"\n")
    except OSError:
        os._exit(0)


@provider(ILogObserver)
def forward_log(event: dict[str, Any]) -> None:
    level = event.get("log_level")
    if level is None or level < LogLevel.info:
        return
    if level < LogLevel.warn and not str(event.get("log_namespace", "")).startswith("sidero"):
        return  # the child reactor's own start/stop lines: the parent logs the workers' state
    text = formatEvent(event)
    if event.get("log_failure") is not None:
        text += "\n" + event["log_failure"].getTraceback()
    # The structured fields too (scalars only), so the parent's line is the one this process
    # would have written (tests and log pipelines read e.g. filename and size).
    fields = {k: v for k, v in event.items() if not k.startswith("log_")
              and isinstance(v, str | int | float | bool) and k not in ("worker", "text")}
    emit({"t": "log", "level": level.name, "text": text,
          "namespace": str(event.get("log_namespace", "")), "fields": fields})


class ForwardTimeline:
    """The protocol's timeline: each finished transfer goes to the parent's recorder, after
    the counters it changed (so the parent's metrics agree with its timeline)."""

    def __init__(self, take_delta: Any) -> None:
        self.take_delta = take_delta

    def record(self, step: str, **fields: Any) -> None:
        # One line for both, so the parent never sees the transfer without its counters.
        emit({"t": "timeline", "step": step, "fields": fields, "delta": self.take_delta()})


def main() -> int:
    config = json.loads(sys.stdin.readline())
    from twisted.internet import reactor

    from sidero.protocols.tftp.service import build_protocol, tune_socket
    from sidero.threads import ThreadPoolService

    globalLogBeginner.beginLoggingTo([forward_log], redirectStandardIO=False)
    pool = ThreadPoolService(reactor, "tftp-io", max_threads=int(config["io_threads"]))
    protocol = build_protocol(
        reactor, roots=list(config["roots"]), run=pool.run,
        single_port=bool(config["single_port"]), interface=str(config["interface"]),
        max_sessions=int(config["max_sessions"]),
        config=SessionConfig(**config["session"]),
        chain_script=config["chain_script"].encode("latin-1")
        if config.get("chain_script") is not None else None)
    sock = socket.socket(fileno=SOCKET_FD)
    port = cast(Any, reactor).adoptDatagramPort(sock.fileno(), sock.family, protocol)
    sock.close()  # the reactor holds its own duplicate
    tune_socket(port)
    pool.startService()

    before = snapshot(protocol.stats)

    def take_delta() -> dict[str, Any]:
        nonlocal before
        delta = stats_delta(protocol.stats, before)
        if delta:
            before = snapshot(protocol.stats)
        return delta

    def flush() -> None:
        delta = take_delta()
        if delta:
            emit({"t": "stats", "delta": delta})

    protocol.timeline = ForwardTimeline(take_delta)
    parent = os.getppid()

    def tick() -> None:
        flush()
        if os.getppid() != parent:  # the service died without stopping us
            reactor.stop()

    LoopingCall(tick).start(0.5, now=False)

    def stop() -> Any:
        protocol.abort_all()
        d = port.stopListening()
        return d

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.addSystemEventTrigger("before", "shutdown", pool.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", flush)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
