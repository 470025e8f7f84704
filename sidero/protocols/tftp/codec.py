# -*- test-case-name: tests.protocols.tftp.test_codec -*-
"""Pure TFTP wire codec: bytes in, values out, and back.

Covers RFC 1350 (RRQ, WRQ, DATA, ACK, ERROR), RFC 2347 (option extension, OACK),
RFC 2348 (blksize), RFC 2349 (timeout, tsize) and RFC 7440 (windowsize).  Nothing here
touches a socket, a clock or a file, so every rule can be tested exhaustively; the
only exception a decoder ever raises is L{MalformedDatagram}.

Leniency, decided once here so the rest of the server need not care:
  - option names are case-insensitive (stored lower-case); the first occurrence of a
    duplicated option wins, later ones are ignored;
  - trailing empty fields after the options (NUL padding seen from some PXE ROMs) are
    ignored; a non-empty option name without a value is malformed;
  - an ACK may carry trailing bytes (ignored); an ERROR message may lack its final NUL;
  - option values that are not plain decimal numbers in their RFC range are "invalid"
    and simply not negotiated (L{parse_options} drops them), as RFC 2347 asks.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = [
    "ACK",
    "BLKSIZE_MAX",
    "BLKSIZE_MIN",
    "DATA",
    "ERROR",
    "OACK",
    "RRQ",
    "WRQ",
    "Ack",
    "Data",
    "Datagram",
    "Error",
    "ErrorCode",
    "MalformedDatagram",
    "OptionAck",
    "Request",
    "RequestedOptions",
    "decode",
    "decode_ack_fast",
    "encode_ack",
    "encode_data",
    "encode_error",
    "encode_oack",
    "encode_request",
    "parse_options",
]

RRQ = 1
WRQ = 2
DATA = 3
ACK = 4
ERROR = 5
OACK = 6

BLKSIZE_MIN = 8
BLKSIZE_MAX = 65464
TIMEOUT_MIN = 1
TIMEOUT_MAX = 255
WINDOWSIZE_MIN = 1
WINDOWSIZE_MAX = 65535

_HEADER = struct.Struct("!HH")
_OPCODE = struct.Struct("!H")
# A request value longer than this is not a number any client means (tsize of 10^20 bytes).
_DECIMAL = re.compile(rb"[0-9]{1,20}")


class ErrorCode(IntEnum):
    """RFC 1350 error codes, plus 8 from RFC 2347 (option negotiation refused)."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class MalformedDatagram(ValueError):
    """A datagram that is not valid TFTP; C{reason} says why (for logs and counters)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    """An RRQ or WRQ.

    @ivar options: option names lower-cased, values as sent (bytes decoded as latin-1 so
        any value round-trips); validity is judged by L{parse_options}.
    """

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    """A DATA packet; C{block} is the 16-bit wire block number."""

    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """An ACK; C{block} is the 16-bit wire block number (0 acknowledges an OACK)."""

    block: int


@dataclass(frozen=True, slots=True)
class Error:
    """An ERROR packet."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OptionAck:
    """An OACK (RFC 2347)."""

    options: dict[str, str]


Datagram = Request | Data | Ack | Error | OptionAck


@dataclass(frozen=True, slots=True)
class RequestedOptions:
    """The options of a request that are both known and valid (None: not requested).

    Range checks follow the RFCs; a server may still answer with a smaller blksize or
    windowsize, which is the session's decision, not the codec's.
    """

    blksize: int | None = None
    timeout: int | None = None
    tsize: int | None = None
    windowsize: int | None = None


def _split_strings(body: bytes, what: str) -> list[bytes]:
    """Split NUL-terminated strings; the last one must be terminated."""
    if not body.endswith(b"\0"):
        raise MalformedDatagram(f"{what}: unterminated string")
    return body[:-1].split(b"\0")


def _decode_text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedDatagram(f"{what} is not UTF-8") from None


def _decode_options(fields: list[bytes], what: str) -> dict[str, str]:
    options: dict[str, str] = {}
    i = 0
    while i < len(fields):
        name = fields[i]
        if not name:
            # NUL padding after the last option is tolerated; an empty name is not.
            if any(fields[i:]):
                raise MalformedDatagram(f"{what}: empty option name")
            break
        if i + 1 >= len(fields):
            raise MalformedDatagram(f"{what}: option {name[:32]!r} has no value")
        options.setdefault(name.decode("latin-1").lower(), fields[i + 1].decode("latin-1"))
        i += 2
    return options


def decode(datagram: bytes) -> Datagram:
    """Decode one TFTP datagram.

    @raise MalformedDatagram: for anything that is not a well-formed TFTP packet.
    """
    if len(datagram) < 2:
        raise MalformedDatagram("shorter than an opcode")
    opcode = (datagram[0] << 8) | datagram[1]
    body = datagram[2:]
    if opcode in (RRQ, WRQ):
        what = "RRQ" if opcode == RRQ else "WRQ"
        fields = _split_strings(body, what)
        if len(fields) < 2:
            raise MalformedDatagram(f"{what}: missing mode")
        filename = _decode_text(fields[0], f"{what} filename")
        if not filename:
            raise MalformedDatagram(f"{what}: empty filename")
        mode = fields[1].decode("latin-1").lower()
        if not mode:
            raise MalformedDatagram(f"{what}: empty mode")
        return Request(opcode, filename, mode, _decode_options(fields[2:], what))
    if opcode == DATA:
        if len(body) < 2:
            raise MalformedDatagram("DATA: missing block number")
        return Data((body[0] << 8) | body[1], bytes(body[2:]))
    if opcode == ACK:
        if len(body) < 2:
            raise MalformedDatagram("ACK: missing block number")
        return Ack((body[0] << 8) | body[1])
    if opcode == ERROR:
        if len(body) < 2:
            raise MalformedDatagram("ERROR: missing error code")
        code = (body[0] << 8) | body[1]
        raw = body[2:]
        end = raw.find(b"\0")
        message = (raw if end < 0 else raw[:end]).decode("utf-8", "replace")
        return Error(code, message)
    if opcode == OACK:
        if not body:
            return OptionAck({})
        return OptionAck(_decode_options(_split_strings(body, "OACK"), "OACK"))
    raise MalformedDatagram(f"unknown opcode {opcode}")


def decode_ack_fast(datagram: bytes) -> int:
    """The wire block number if C{datagram} is an ACK, else -1.

    The hot path of a transfer is one ACK per window; this skips building objects.
    """
    if len(datagram) >= 4 and datagram[0] == 0 and datagram[1] == ACK:
        return (datagram[2] << 8) | datagram[3]
    return -1


def _decimal(value: str, low: int, high: int) -> int | None:
    if not value.isascii():
        return None
    raw = value.encode("ascii")
    if _DECIMAL.fullmatch(raw) is None:
        return None
    number = int(raw)
    return number if low <= number <= high else None


def parse_options(options: dict[str, str]) -> RequestedOptions:
    """Pick the known options with valid values; anything else is not negotiated."""
    blksize = timeout = tsize = windowsize = None
    if "blksize" in options:
        blksize = _decimal(options["blksize"], BLKSIZE_MIN, BLKSIZE_MAX)
    if "timeout" in options:
        timeout = _decimal(options["timeout"], TIMEOUT_MIN, TIMEOUT_MAX)
    if "tsize" in options:
        tsize = _decimal(options["tsize"], 0, 2**64 - 1)
    if "windowsize" in options:
        windowsize = _decimal(options["windowsize"], WINDOWSIZE_MIN, WINDOWSIZE_MAX)
    return RequestedOptions(blksize=blksize, timeout=timeout, tsize=tsize, windowsize=windowsize)


def _encode_pairs(options: dict[str, str]) -> bytes:
    return b"".join(
        k.encode("latin-1") + b"\0" + v.encode("latin-1") + b"\0" for k, v in options.items()
    )


def encode_request(
    opcode: int, filename: str, mode: str = "octet", options: dict[str, str] | None = None
) -> bytes:
    """Encode an RRQ or WRQ (used by tests and tools; the server never sends one)."""
    if opcode not in (RRQ, WRQ):
        raise ValueError(f"not a request opcode: {opcode}")
    return (
        _OPCODE.pack(opcode)
        + filename.encode("utf-8") + b"\0"
        + mode.encode("latin-1") + b"\0"
        + _encode_pairs(options or {})
    )


def encode_data(block: int, payload: bytes) -> bytes:
    """Encode DATA; C{block} is taken modulo 65536 (rollover)."""
    return _HEADER.pack(DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    """Encode ACK; C{block} is taken modulo 65536."""
    return _HEADER.pack(ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    """Encode ERROR (message as UTF-8)."""
    return _HEADER.pack(ERROR, code) + message.encode("utf-8") + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    """Encode OACK with the options in the given order."""
    return _OPCODE.pack(OACK) + _encode_pairs(options)
