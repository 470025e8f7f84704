"""Syslog parsing: RFC 5424 (util-linux logger's output), RFC 3164 (BMCs), iPXE's own form."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.syslog.codec import SyslogError, SyslogMessage, parse

#: What util-linux logger sent (captured on this machine; see test_protocol for it live).
LOGGER_5424 = (b'<13>1 2026-12-03T10:17:03.732142+00:00 vm agent - WIPE [timeQuality tzKnown="1" '
               b'isSynced="0"][meta@32473 uuid="abc"] wiping /dev/sda')
LOGGER_3164 = b"<28>Dec  3 10:17:03 vm ipmi: fan failure"
#: iPXE's syslog (net/udp/syslog.c): "<PRI>" [hostname " "] "ipxe: " message.
IPXE = b"<14>ipxe: net0: 52:54:00:12:34:56 using e1000 on 0000:00:03.0 (Ethernet) [open]"
IPXE_HOST = b"<14>node-7 ipxe: Configuring (net0 52:54:00:12:34:56)...... ok"
#: A Dell iDRAC-style RFC 3164 line with a PID.
IDRAC = b"<30>Jan 15 08:01:02 idrac-ABC1234 sshd[2817]: Accepted password for root from 10.0.0.5"


class CodecTests(SynchronousTestCase):
    def test_rfc5424(self) -> None:
        """Every header field, structured data kept whole (with its brackets and quotes)."""
        m = parse(LOGGER_5424)
        self.assertEqual(m, SyslogMessage(
            facility=1, severity=5, protocol="rfc5424", msg="wiping /dev/sda",
            timestamp="2026-12-03T10:17:03.732142+00:00", hostname="vm", app_name="agent",
            procid="", msgid="WIPE",
            structured_data='[timeQuality tzKnown="1" isSynced="0"][meta@32473 uuid="abc"]'))
        self.assertEqual(m.fields(), {
            "facility": "user", "priority": "notice", "protocol": "rfc5424", "msg": "wiping /dev/sda",
            "timestamp": "2026-12-03T10:17:03.732142+00:00", "hostname": "vm", "app_name": "agent",
            "msgid": "WIPE", "structured_data": '[timeQuality tzKnown="1" isSynced="0"][meta@32473 uuid="abc"]'})

    def test_rfc5424_nil_values_bom_and_escapes(self) -> None:
        """NILVALUE fields are empty; a BOM before the message goes; ] inside a quoted value
        does not end the structured data; a message may be absent."""
        m = parse(b'<165>1 - - - - - [x@1 a="q\\"]"] \xef\xbb\xbfhello')
        self.assertEqual((m.facility, m.severity, m.timestamp, m.hostname, m.structured_data, m.msg),
                         (20, 5, "", "", '[x@1 a="q\\"]"]', "hello"))
        self.assertEqual(parse(b"<13>1 - vm root - - -").msg, "")

    def test_rfc3164_and_ipxe(self) -> None:
        """BSD lines with and without timestamp, hostname and PID, and iPXE's short form."""
        m = parse(LOGGER_3164)
        self.assertEqual((m.protocol, m.facility, m.severity, m.timestamp, m.hostname, m.app_name, m.msg),
                         ("rfc3164", 3, 4, "Dec  3 10:17:03", "vm", "ipmi", "fan failure"))
        m = parse(IDRAC)
        self.assertEqual((m.hostname, m.app_name, m.procid, m.msg),
                         ("idrac-ABC1234", "sshd", "2817", "Accepted password for root from 10.0.0.5"))
        m = parse(IPXE)
        self.assertEqual((m.severity, m.hostname, m.app_name, m.msg),
                         (6, "", "ipxe", "net0: 52:54:00:12:34:56 using e1000 on 0000:00:03.0 (Ethernet) [open]"))
        m = parse(IPXE_HOST)
        self.assertEqual((m.hostname, m.app_name, m.msg),
                         ("node-7", "ipxe", "Configuring (net0 52:54:00:12:34:56)...... ok"))
        m = parse(b"<13>just some text")
        self.assertEqual((m.app_name, m.msg), ("", "just some text"))

    def test_defaults_and_errors(self) -> None:
        """No PRI is user.notice (RFC 3164 4.3.3); bad PRIs, empty input and a broken RFC 5424
        header are errors."""
        m = parse(b"hello there\n")
        self.assertEqual((m.facility, m.severity, m.msg), (1, 5, "hello there"))
        for bad in (b"", b"\n", b"<192>x", b"<01>x", b"<abc>x", b"<13>1 - - -",
                    b"<13>1 - - - - - [unterminated", b"<13>1 - - - - - nosd", b"x" * 70000):
            with self.subTest(bad=bad[:20]):
                self.assertRaises(SyslogError, parse, bad)

    @given(st.binary(max_size=300))
    def test_never_crashes(self, data: bytes) -> None:
        """Any bytes parse or raise SyslogError, nothing else."""
        try:
            m = parse(data)
        except SyslogError:
            return
        self.assertTrue(0 <= m.facility < 24 and 0 <= m.severity < 8)
