"""The syslog protocols: TCP framing (RFC 6587), annotation by source address, drops; and the
service on loopback with util-linux's logger as the real sender (UDP, TCP, octet counting)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sidero.protocols.syslog.protocol import SyslogSink, SyslogTCPFactory, SyslogUDP
from sidero.protocols.syslog.service import SyslogService
from sidero.siderolink.annotator import Annotation
from tests.ports import free_port

BMC = Annotation(server_uuid="4c4c4544-0035-3910-8051-b4c04f4a4d32")


def sink() -> tuple[SyslogSink, list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []
    s = SyslogSink(lambda line: lines.append(json.loads(line)), {"192.0.2.50": BMC}.get)
    return s, lines


class ProtocolTests(SynchronousTestCase):
    def tcp(self, s: SyslogSink) -> tuple[Any, StringTransport]:
        proto = SyslogTCPFactory(s).buildProtocol(IPv4Address("TCP", "192.0.2.50", 5000))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_udp_annotated_by_source(self) -> None:
        """A datagram is one message; a known source address gets the server's fields."""
        s, lines = sink()
        udp = SyslogUDP(s)
        udp.datagramReceived(b"<30>Jan 15 08:01:02 idrac sshd[7]: login", ("192.0.2.50", 514))
        udp.datagramReceived(b"<14>ipxe: hello", ("::ffff:192.0.2.99", 514))
        self.assertEqual(lines[0], {"facility": "daemon", "priority": "info", "protocol": "rfc3164",
                                    "msg": "login", "timestamp": "Jan 15 08:01:02", "hostname": "idrac",
                                    "app_name": "sshd", "procid": "7", "source": "192.0.2.50",
                                    "transport": "udp", "server_uuid": BMC.server_uuid})
        self.assertEqual((lines[1]["source"], lines[1].get("server_uuid")), ("192.0.2.99", None))

    def test_tcp_framing(self) -> None:
        """Octet counting and newline framing, mixed and split anywhere."""
        s, lines = sink()
        proto, _ = self.tcp(s)
        first = b"<13>1 - h app - - - one\nwith a newline"
        data = str(len(first)).encode() + b" " + first + b"<14>two\n<14>three\n"
        for i in range(len(data)):
            proto.dataReceived(data[i:i + 1])
        self.assertEqual([m["msg"] for m in lines], ["one\nwith a newline", "two", "three"])

    def test_tcp_broken_frames_close(self) -> None:
        """A bad octet count or an endless frame closes that connection; bad messages in good
        frames are only dropped."""
        s, lines = sink()
        proto, transport = self.tcp(s)
        proto.dataReceived(b"<192>bad pri\n<14>fine\n")
        self.assertEqual([m["msg"] for m in lines], ["fine"])
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"99999999 x")
        self.assertTrue(transport.disconnecting)
        proto2, transport2 = self.tcp(s)
        proto2.dataReceived(b"<14>" + b"x" * 70000)
        self.assertTrue(transport2.disconnecting)
        self.assertEqual(s.counters["malformed"], 3)

    def test_udp_dropped_when_overloaded(self) -> None:
        """While the writer is far behind, datagrams are dropped and counted."""
        lines: list[str] = []
        s = SyslogSink(lines.append, lambda ip: None, overloaded=lambda: True)
        SyslogUDP(s).datagramReceived(b"<14>x", ("192.0.2.1", 1))
        self.assertEqual((lines, s.counters["overload"]), ([], 1))


class LoggerTests(TestCase):
    """util-linux logger -> the syslog service on 127.0.0.1 (ephemeral ports)."""

    async def test_logger_udp_and_tcp(self) -> None:
        if shutil.which("logger") is None:
            raise SkipTest("LOUD SKIP: util-linux logger is not installed")
        from sidero.serverlogs import ServerLogs

        lines: list[dict[str, Any]] = []
        kept = ServerLogs(global_reactor.seconds)
        s = SyslogSink(lambda line: lines.append(json.loads(line)),
                       {"127.0.0.1": BMC}.get, server_logs=kept)
        udp, tcp = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
        service = SyslogService(global_reactor, s, udp_port=udp, tcp_port=tcp, interface="127.0.0.1")
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsNone(service.failure)

        def send(*args: str) -> None:
            subprocess.run(["logger", "-n", "127.0.0.1", *args], check=True, timeout=10)

        await deferToThread(send, "-P", str(udp), "-d", "--rfc5424", "-t", "agent", "--msgid", "WIPE",
                            "wiping /dev/sda")
        await deferToThread(send, "-P", str(udp), "-d", "--rfc3164", "-p", "daemon.warning", "-t", "bmc",
                            "fan failure")
        await deferToThread(send, "-P", str(tcp), "-T", "--octet-count", "-t", "agent", "counted")
        await deferToThread(send, "-P", str(tcp), "-T", "-t", "agent", "newline framed")
        for _ in range(100):
            if len(lines) == 4:
                break
            await deferLater(global_reactor, 0.02, lambda: None)
        by_msg = {m["msg"]: m for m in lines}
        self.assertEqual(set(by_msg), {"wiping /dev/sda", "fan failure", "counted", "newline framed"})
        wipe = by_msg["wiping /dev/sda"]
        self.assertEqual((wipe["protocol"], wipe["app_name"], wipe["msgid"], wipe["transport"],
                          wipe["server_uuid"]), ("rfc5424", "agent", "WIPE", "udp", BMC.server_uuid))
        fan = by_msg["fan failure"]
        self.assertEqual((fan["protocol"], fan["facility"], fan["priority"]), ("rfc3164", "daemon", "warning"))
        self.assertEqual(by_msg["counted"]["transport"], "tcp")
        # The known server's buffer (sidero logs, the dashboard) has them as readable lines.
        readable = [line.text for line in kept.lines(str(BMC.server_uuid))]
        self.assertEqual(len(readable), 4)
        fan_line = next(t for t in readable if t.endswith("fan failure"))
        self.assertIn("daemon.warning", fan_line)
        self.assertIn(" bmc: fan failure", fan_line)
        wipe_line = next(t for t in readable if "wiping /dev/sda" in t)
        self.assertRegex(wipe_line, r"^\d{4}-\d\d-\d\dT\S+ user\.notice \S+ agent: wiping /dev/sda$")

    async def test_bind_failure_is_not_fatal(self) -> None:
        """A port in use is one error and no exception: the rest of sidero runs."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            s, _ = sink()
            service = SyslogService(global_reactor, s, udp_port=free_port(socket.SOCK_DGRAM),
                                    tcp_port=held.getsockname()[1], interface="127.0.0.1")
            service.privilegedStartService()
            service.startService()
            self.addCleanup(service.stopService)
            self.assertIn("TCP", service.failure or "")
            self.assertEqual(len(service.ports), 1)


class ProcessStdoutTests(TestCase):
    """The real C{twistd sidero}: server logs on its stdout are bare JSON lines (twistd's own
    stdout redirection must not wrap them into log records), between its own log lines."""

    timeout = 90

    async def test_lines_on_stdout(self) -> None:
        if shutil.which("logger") is None:
            raise SkipTest("LOUD SKIP: util-linux logger is not installed")
        import os
        import signal
        import sys
        import tempfile

        from tests.paths import RUN_SIDERO, tree_env

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        sock_dir = tempfile.mkdtemp(prefix="sds-")
        self.addCleanup(shutil.rmtree, sock_dir, True)
        api, udp, tcp = (free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM),
                         free_port(socket.SOCK_STREAM))
        out_path = os.path.join(work, "stdout")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(RUN_SIDERO), "--state-dir", os.path.join(work, "state"),
                 "--api-endpoint", "127.0.0.1", "--listen-address", "127.0.0.1", "--api-port", str(api),
                 "--disable-dhcp-proxy", "--disable-tftp", "--disable-siderolink",
                 "--syslog-port", str(udp), "--syslog-tcp-port", str(tcp),
                 "--talos-assets-url", "http://127.0.0.1:1", "--log-format", "json",
                 "--management-socket", os.path.join(sock_dir, "m.sock")],
                stdout=out, stderr=subprocess.DEVNULL, env=tree_env(), cwd=work,
                start_new_session=True)

        def stop() -> None:
            # A sidero that does not stop on SIGTERM fails the test, and is killed so that
            # its ports (the metrics port's default among them) are free for the next tests.
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    raise AssertionError("sidero did not stop within 20 s of SIGTERM") from None

        self.addCleanup(stop)

        def read() -> list[dict[str, Any]]:
            with open(out_path, errors="replace") as f:
                return [json.loads(line) for line in f if line.startswith("{")]

        for _ in range(200):
            if any("syslog listening" in str(r.get("msg")) for r in read()):
                break
            self.assertIsNone(proc.poll(), open(out_path).read()[-3000:])
            await deferLater(global_reactor, 0.1, lambda: None)
        await deferToThread(subprocess.run, ["logger", "-n", "127.0.0.1", "-P", str(udp), "-d",
                                             "--rfc5424", "-t", "agent", "straight to stdout"],
                            check=True, timeout=10)
        for _ in range(100):
            mine = [r for r in read() if r.get("msg") == "straight to stdout"]
            if mine:
                break
            await deferLater(global_reactor, 0.05, lambda: None)
        self.assertEqual(len(mine), 1)
        self.assertEqual((mine[0]["app_name"], mine[0]["transport"], mine[0]["source"]),
                         ("agent", "udp", "127.0.0.1"))
        self.assertNotIn("level", mine[0], "a bare server-log line, not a log record around it")
