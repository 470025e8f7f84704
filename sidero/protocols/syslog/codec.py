# -*- test-case-name: tests.protocols.syslog.test_codec -*-
"""Syslog messages: RFC 5424, RFC 3164 (BSD) and what iPXE and BMCs really send.

One pure function, L{parse}, bytes to a frozen L{SyslogMessage}; anything it cannot read at
all raises L{SyslogError}.  RFC 3164 is a description of practice rather than a format, so its
reading is lenient: the timestamp and the hostname are optional (iPXE sends
C{<PRI>[hostname ]ipxe: message}), the tag is what comes before the first colon.  A message
with no C{<PRI>} gets the RFC 3164 §4.3.3 default C{<13>} (user.notice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Longest message accepted (RFC 5424 §6.1 lets receivers choose; 64 KiB covers UDP).
MAX_MESSAGE = 64 * 1024

FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
              "authpriv", "ftp", "ntp", "security", "console", "solaris-cron", "local0", "local1",
              "local2", "local3", "local4", "local5", "local6", "local7")
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")

_BOM = "\ufeff"
_PRI = re.compile(r"<([0-9]{1,3})>")
_BSD_TIME = re.compile(r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 0-9][0-9] "
                       r"[0-9]{2}:[0-9]{2}:[0-9]{2}")
_TAG = re.compile(r"([^\s:\[]{1,48})(?:\[([^\]\s]{1,128})\])?:")


class SyslogError(ValueError):
    """Not a syslog message (empty, an invalid PRI, a broken RFC 5424 header)."""


@dataclass(frozen=True)
class SyslogMessage:
    facility: int
    severity: int
    protocol: str  # "rfc5424" or "rfc3164"
    msg: str
    timestamp: str = ""
    hostname: str = ""
    app_name: str = ""
    procid: str = ""
    msgid: str = ""
    structured_data: str = ""

    def fields(self) -> dict[str, str]:
        """The non-empty fields, named as the kernel log lines name theirs."""
        out = {"facility": FACILITIES[self.facility], "priority": SEVERITIES[self.severity],
               "protocol": self.protocol, "msg": self.msg}
        for key, value in (("timestamp", self.timestamp), ("hostname", self.hostname),
                           ("app_name", self.app_name), ("procid", self.procid),
                           ("msgid", self.msgid), ("structured_data", self.structured_data)):
            if value:
                out[key] = value
        return out


def _nil(value: str) -> str:
    return "" if value == "-" else value


def _structured_data(text: str) -> tuple[str, str]:
    """Split RFC 5424 STRUCTURED-DATA off the front of C{text}: (sd, rest)."""
    if text.startswith("-"):
        return "", text[1:]
    if not text.startswith("["):
        raise SyslogError("RFC 5424 structured data must be - or start with [")
    pos, in_value = 0, False
    while pos < len(text):
        ch = text[pos]
        if in_value:
            if ch == "\\" and pos + 1 < len(text):
                pos += 2
                continue
            if ch == '"':
                in_value = False
        elif ch == '"':
            in_value = True
        elif ch == "]":
            if pos + 1 >= len(text) or text[pos + 1] != "[":
                return text[: pos + 1], text[pos + 1:]
        pos += 1
    raise SyslogError("unterminated RFC 5424 structured data")


def _rfc5424(facility: int, severity: int, body: str) -> SyslogMessage:
    # VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]
    parts = body.split(" ", 6)
    if len(parts) < 7:
        raise SyslogError("RFC 5424 header is incomplete")
    _, timestamp, hostname, app, procid, msgid, rest = parts
    sd, rest = _structured_data(rest)
    if rest.startswith(" "):
        rest = rest[1:]
    elif rest:
        raise SyslogError("RFC 5424 message must follow the structured data after a space")
    if rest.startswith(_BOM):
        rest = rest[1:]
    return SyslogMessage(facility, severity, "rfc5424", rest, _nil(timestamp), _nil(hostname),
                         _nil(app), _nil(procid), _nil(msgid), sd)


def _rfc3164(facility: int, severity: int, body: str) -> SyslogMessage:
    timestamp = hostname = app = procid = ""
    match = _BSD_TIME.match(body)
    if match:
        timestamp, body = match.group(0), body[match.end():].lstrip(" ")
    tag = _TAG.match(body)
    if tag is None:
        # "HOSTNAME TAG: msg" (a tag right away is "TAG: msg", iPXE without a hostname).
        head, sep, rest = body.partition(" ")
        if sep and (tag := _TAG.match(rest)) is not None:
            hostname, body = head, rest
    if tag is not None:
        app, procid = tag.group(1), tag.group(2) or ""
        body = body[tag.end():]
        if body.startswith(" "):
            body = body[1:]
    return SyslogMessage(facility, severity, "rfc3164", body, timestamp, hostname, app, procid)


def parse(data: bytes) -> SyslogMessage:
    """One message (a datagram, or one frame of a TCP stream).

    @raise SyslogError: empty, too long, an out-of-range PRI, or a broken RFC 5424 header.
    """
    if len(data) > MAX_MESSAGE:
        raise SyslogError(f"message longer than {MAX_MESSAGE} bytes")
    text = data.decode("utf-8", "replace").rstrip("\r\n\0")
    if not text.strip():
        raise SyslogError("empty message")
    match = _PRI.match(text)
    if match is None:
        if text.startswith("<"):
            raise SyslogError("unreadable PRI")
        return _rfc3164(1, 5, text)
    pri = int(match.group(1))
    if pri > 191 or (len(match.group(1)) > 1 and match.group(1).startswith("0")):
        raise SyslogError(f"invalid PRI <{match.group(1)}>")
    facility, severity = divmod(pri, 8)
    body = text[match.end():]
    if body.startswith("1 "):
        return _rfc5424(facility, severity, body)
    return _rfc3164(facility, severity, body)
