"""Several TFTP worker processes on one port (SO_REUSEPORT), with real clients."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sidero.protocols.tftp.protocol import TFTPStats
from sidero.protocols.tftp.service import make_tftp_service
from sidero.protocols.tftp.workers import (
    WorkerPool,
    apply_delta,
    open_reuseport_sockets,
    snapshot,
    stats_delta,
)
from sidero.timeline import BootTimeline
from tests.protocols.tftp.test_real_clients import _tool


class DeltaTests(SynchronousTestCase):
    """Counter deltas: what a child sends and the parent adds."""

    def test_round_trip(self) -> None:
        """The delta of two snapshots, added to a copy of the first, gives the second."""
        child = TFTPStats(requests=3, bytes_sent=100, outcomes=Counter(complete=2))
        before = snapshot(child)
        child.requests += 2
        child.malformed += 1
        child.bytes_sent += 50
        child.outcomes["complete"] += 1
        child.outcomes["timeout"] += 1
        delta = stats_delta(child, before)
        self.assertEqual(delta, {"requests": 2, "malformed": 1, "bytes_sent": 50,
                                 "outcomes": {"complete": 1, "timeout": 1}})
        parent = TFTPStats(requests=10, outcomes=Counter(complete=5))
        apply_delta(parent, delta)
        self.assertEqual((parent.requests, parent.malformed, parent.bytes_sent),
                         (12, 1, 50))
        self.assertEqual(parent.outcomes, Counter(complete=6, timeout=1))
        self.assertEqual(stats_delta(child, snapshot(child)), {})

    def test_garbage_ignored(self) -> None:
        """Non-integer or unknown fields in a delta change nothing."""
        stats = TFTPStats()
        apply_delta(stats, {"requests": "7", "nope": 3, "busy": True,
                            "outcomes": {"complete": "x", 3: 1}})
        self.assertEqual(stats, TFTPStats())

    def test_garbled_line_counted(self) -> None:
        """A report line that is not JSON is counted as an internal error, nothing raised."""
        server: Any = type("S", (), {"stats": TFTPStats(), "timeline": None})()
        pool = WorkerPool(reactor, list, {}, server)
        pool.report(1, b"{not json")
        pool.report(1, b'{"t": "stats", "delta": {"requests": 2}}')
        self.assertEqual((server.stats.internal_errors, server.stats.requests), (1, 2))

    def test_reuseport_sockets_share_a_port(self) -> None:
        """Port 0 gives every socket the same free port."""
        socks = open_reuseport_sockets("127.0.0.1", 0, 3)
        self.addCleanup(lambda: [s.close() for s in socks])
        ports = {s.getsockname()[1] for s in socks}
        self.assertEqual(len(ports), 1)
        self.assertNotEqual(ports, {0})


class WorkersRealClientTests(TestCase):
    """Two workers (this process and a child) serving tftp-hpa and curl on loopback."""

    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.root = os.path.join(self.dir, "root")
        os.makedirs(self.root)
        self.data = os.urandom(300_000)
        with open(os.path.join(self.root, "boot.bin"), "wb") as f:
            f.write(self.data)
        self.service: Any = make_tftp_service(
            reactor, roots=[self.root], port=0, interface="127.0.0.1", workers=2)
        listener = self.service.getServiceNamed("tftp-udp")
        self.protocol = listener.protocol
        self.timeline = BootTimeline(time.time)
        self.protocol.timeline = self.timeline
        self.service.privilegedStartService()
        self.service.startService()
        self.stopped = False
        self.addCleanup(self._stop)
        self.port = listener.listening.getHost().port
        self.pool: WorkerPool = self.service.getServiceNamed("tftp-workers")

    async def _stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.service.stopService()

    def fetch(self, i: int) -> Deferred[tuple[bytes, bytes, int]]:
        out = os.path.join(self.dir, f"out{i}")
        if i % 2:
            argv = [_tool("tftp"), "127.0.0.1", str(self.port), "-m", "binary", "-c", "get",
                    "boot.bin", out]
        else:
            argv = [_tool("curl"), "-sS", "--tftp-blksize", "1428", "-o", out,
                    f"tftp://127.0.0.1:{self.port}/boot.bin"]
        return getProcessOutputAndValue("/usr/bin/timeout", ["60", *argv], env=dict(os.environ))

    async def settled(self, complete: int) -> None:
        """Wait (at most 30 s: a loaded machine) until the reports of C{complete} transfers
        came."""
        for _ in range(300):
            if self.protocol.stats.outcomes["complete"] >= complete:
                return
            await deferLater(reactor, 0.1)

    async def wait_children(self, count: int) -> None:
        for _ in range(300):
            if len(self.pool.children) == count and all(
                    c.transport is not None and c.transport.pid for c in self.pool.children.values()):
                return
            await deferLater(reactor, 0.1)

    async def test_transfers_counted_and_shared(self) -> None:
        """16 clients (each its own source port) all get the file byte for byte; the child
        served some; every transfer is in the counters and the timeline, once."""
        await self.wait_children(1)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        results = await gatherResults([self.fetch(i) for i in range(16)])
        for i, (stdout, stderr, code) in enumerate(results):
            self.assertEqual(code, 0, (stdout, stderr))
            with open(os.path.join(self.dir, f"out{i}"), "rb") as f:
                self.assertTrue(f.read() == self.data, f"client {i} got different bytes")
        await self.settled(16)
        self.assertEqual(self.protocol.stats.outcomes["complete"], 16)
        self.assertEqual(self.protocol.stats.requests, 16)
        self.assertGreaterEqual(self.protocol.stats.bytes_sent, 16 * len(self.data))
        steps = list(self.timeline._buckets.get("ip:127.0.0.1", ()))
        self.assertEqual(len(steps), 16)
        self.assertEqual({e.details["outcome"] for e in steps}, {"complete"})
        # The kernel spread the 16 peers over both sockets (all on one: 2**-15).
        in_child = self.pool.reported.get(1, 0)
        self.assertGreater(in_child, 0)
        self.assertLess(in_child, 16)
        # The child's "TFTP sent" lines come out here with their fields, marked worker=1 (each
        # is written just after its transfer's report, so it may be a read later).
        def relayed_lines() -> list[dict[str, Any]]:
            return [e for e in events if e.get("worker") == 1
                    and formatEvent(e).startswith("TFTP sent 'boot.bin'")]

        for _ in range(100):
            if len(relayed_lines()) >= in_child:
                break
            await deferLater(reactor, 0.1)
        relayed = relayed_lines()
        self.assertEqual(len(relayed), in_child)
        for e in relayed:
            self.assertEqual((e["filename"], e["size"]), ("boot.bin", len(self.data)))
            self.assertEqual(e["log_namespace"], "sidero.protocols.tftp.protocol.TFTPProtocol")

    async def test_stop_ends_children_and_frees_port(self) -> None:
        """stopService ends every child and closes every socket: the port binds again."""
        await self.wait_children(1)
        pids = [c.transport.pid for c in self.pool.children.values()]  # type: ignore[union-attr]
        await self._stop()
        self.assertEqual(self.pool.children, {})
        for pid in pids:
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", self.port))  # no SO_REUSEPORT: fails if any socket is left

    async def test_atftp_windowsize_in_workers(self) -> None:
        """atftp asking for windowsize 8 gets it in every worker (the child negotiates as
        this process does) and the bytes are right."""
        await self.wait_children(1)
        argv = [_tool("atftp"), "--option", "blksize 1428", "--option", "windowsize 8", "-g",
                "-r", "boot.bin"]
        results = await gatherResults([
            getProcessOutputAndValue("/usr/bin/timeout", [
                "60", *argv, "-l", os.path.join(self.dir, f"w{i}"), "127.0.0.1", str(self.port)])
            for i in range(12)])
        self.assertEqual([code for _, _, code in results], [0] * 12, results)
        for i in range(12):
            with open(os.path.join(self.dir, f"w{i}"), "rb") as f:
                self.assertTrue(f.read() == self.data)
        await self.settled(12)
        steps = list(self.timeline._buckets.get("ip:127.0.0.1", ()))
        self.assertEqual([(e.details["blksize"], e.details["windowsize"]) for e in steps],
                         [(1428, 8)] * 12)
        self.assertGreater(self.pool.reported.get(1, 0), 0)

    async def test_dead_child_restarted(self) -> None:
        """A child killed while the service runs is started again and serves."""
        await self.wait_children(1)
        old = self.pool.children[1].transport.pid  # type: ignore[union-attr]
        os.kill(old, signal.SIGKILL)
        for _ in range(300):  # restarted after 1 s; up to 30 s on a loaded machine
            child = self.pool.children.get(1)
            if child is not None and child.transport is not None and child.transport.pid != old:
                break
            await deferLater(reactor, 0.1)
        else:
            self.fail("child not restarted")
        results = await gatherResults([self.fetch(i) for i in range(8)])
        self.assertEqual([code for _, _, code in results], [0] * 8)
        await self.settled(8)
        self.assertEqual(self.protocol.stats.outcomes["complete"], 8)
