# -*- test-case-name: tests.protocols.grpc.test_h2guard -*-
"""Control-frame flood detection for the h2c connections the API port splices onto grpcio.

grpcio answers a PING flood with GOAWAY (its ping strikes), but it acknowledges SETTINGS
frames one by one for as long as a client sends them, and it takes HEADERS+RST_STREAM pairs
("rapid reset", CVE-2023-44487) at line rate: each costs a stream set-up in its C core.  No
client of the agent API or of Provision does either: they open a few streams and cancel one
only on a deadline.  So the splice reads the frame headers going to grpcio (9 bytes each; the
payloads are skipped unread) and, when one connection sends more control frames of a kind in
a window than any real client would, the connection is aborted and counted.

Pure: fed bytes and a clock reading, it answers which kind flooded (or None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

#: The HTTP/2 client connection preface (RFC 9113 §3.4), skipped before the first frame.
PREFACE_LENGTH = 24
HEADER_LENGTH = 9

HEADERS, RST_STREAM, SETTINGS, PING, CONTINUATION = 0x1, 0x3, 0x4, 0x6, 0x9
NAMES = {HEADERS: "headers", RST_STREAM: "rst-stream", SETTINGS: "settings", PING: "ping",
         CONTINUATION: "continuation"}

#: Frames of a kind one connection may send per window.  Generous: the agent sends a handful
#: of HEADERS per boot and no RST_STREAM unless a deadline expires.
DEFAULT_LIMITS: Mapping[int, int] = {
    RST_STREAM: 200,
    SETTINGS: 100,
    PING: 100,
    CONTINUATION: 1000,
    HEADERS: 5000,
}
DEFAULT_WINDOW = 10.0


class FrameGuard:
    """Counts the frames of one client connection (see the module docstring)."""

    def __init__(self, now: Callable[[], float], limits: Mapping[int, int] = DEFAULT_LIMITS,
                 window: float = DEFAULT_WINDOW) -> None:
        self.now = now
        self.limits = limits
        self.window = window
        self._skip = PREFACE_LENGTH
        self._header = b""
        self._window_start = now()
        self._counts: dict[int, int] = {}
        self.frames = 0

    def feed(self, data: bytes) -> str | None:
        """Account for C{data} (the next bytes from the client); the name of the frame kind
        past its limit, or None."""
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = HEADER_LENGTH - len(self._header)
            self._header += bytes(view[pos:pos + need])
            pos += need
            if len(self._header) < HEADER_LENGTH:
                break
            header, self._header = self._header, b""
            self._skip = int.from_bytes(header[0:3], "big")
            flooded = self._count(header[3])
            if flooded is not None:
                return flooded
        return None

    def _count(self, kind: int) -> str | None:
        self.frames += 1
        limit = self.limits.get(kind)
        if limit is None:
            return None
        now = self.now()
        if now - self._window_start >= self.window:
            self._window_start = now
            self._counts.clear()
        count = self._counts.get(kind, 0) + 1
        self._counts[kind] = count
        return NAMES.get(kind, str(kind)) if count > limit else None
