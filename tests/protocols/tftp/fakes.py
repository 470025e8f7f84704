"""In-memory fakes for the TFTP tests: assets, transfer ports, and a tiny client."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from zope.interface import implementer

from sidero.protocols.tftp import codec
from sidero.protocols.tftp.backend import (
    AccessViolation,
    AssetNotFound,
    BackendError,
    IAssetReader,
    IBootAssets,
)
from sidero.protocols.tftp.protocol import TFTPProtocol
from sidero.protocols.tftp.session import SessionConfig

PEER = ("192.0.2.10", 2000)
OTHER = ("192.0.2.11", 3000)


@implementer(IAssetReader)
class MemoryReader:
    """Reads from bytes; with C{hold=True} reads wait until L{release} is called."""

    def __init__(self, data: bytes, hold: bool = False, broken: bool = False) -> None:
        self.data = data
        self.size = len(data)
        self.hold = hold
        self.broken = broken
        self.closed = False
        self.pending: list[tuple[Deferred[bytes], int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self.closed:
            return fail(BackendError("read after close"))
        self.reads.append((offset, length))
        if self.broken:
            return fail(BackendError("disk on fire"))
        if self.hold:
            d: Deferred[bytes] = Deferred()
            self.pending.append((d, offset, length))
            return d
        return succeed(self.data[offset:offset + length])

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, offset, length in pending:
            d.callback(self.data[offset:offset + length])

    def close(self) -> None:
        self.closed = True


@implementer(IBootAssets)
class MemoryAssets:
    """Files by exact name; C{denied} names are access violations; C{hold_open} delays."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files = files or {}
        self.denied: set[str] = set()
        self.hold_open = False
        self.hold_reads = False
        self.broken_reads = False
        self.pending_opens: list[tuple[Deferred[IAssetReader], str]] = []
        self.readers: list[MemoryReader] = []

    def _make(self, name: str) -> Deferred[IAssetReader]:
        if name in self.denied:
            return fail(AccessViolation(name))
        if name not in self.files:
            return fail(AssetNotFound(name))
        reader = MemoryReader(self.files[name], hold=self.hold_reads, broken=self.broken_reads)
        self.readers.append(reader)
        return succeed(reader)

    def open(self, name: str) -> Deferred[IAssetReader]:
        if self.hold_open:
            d: Deferred[IAssetReader] = Deferred()
            self.pending_opens.append((d, name))
            return d
        return self._make(name)

    def release_opens(self) -> None:
        pending, self.pending_opens = self.pending_opens, []
        for d, name in pending:
            self._make(name).chainDeferred(d)


class FakePort:
    """What L{TFTPProtocol}'s C{listen_transfer} returns in tests."""

    def __init__(self, protocol: DatagramProtocol) -> None:
        self.protocol = protocol
        self.transport = FakeDatagramTransport()
        self.stopped = False
        protocol.makeConnection(self.transport)

    def stopListening(self) -> None:
        self.stopped = True


class Harness:
    """A protocol wired to a Clock, a fake transport and memory assets."""

    def __init__(
        self,
        files: dict[str, bytes] | None = None,
        *,
        single_port: bool = True,
        max_sessions: int = 1000,
        config: SessionConfig | None = None,
    ) -> None:
        self.clock = Clock()
        self.assets = MemoryAssets(files)
        self.ports: list[FakePort] = []
        self.transport = FakeDatagramTransport()
        self.protocol = TFTPProtocol(
            self.assets,
            clock=self.clock,
            single_port=single_port,
            listen_transfer=None if single_port else self._listen,
            max_sessions=max_sessions,
            config=config or SessionConfig(timeout=5.0, max_retries=3),
        )
        self.protocol.makeConnection(self.transport)

    def _listen(self, protocol: DatagramProtocol) -> Any:
        port = FakePort(protocol)
        self.ports.append(port)
        return port

    def rrq(self, name: str, options: dict[str, str] | None = None, peer: Any = PEER,
            mode: str = "octet") -> None:
        self.protocol.datagramReceived(
            codec.encode_request(codec.RRQ, name, mode, options), peer
        )

    def send(self, datagram: bytes, peer: Any = PEER) -> None:
        """Deliver a datagram where the peer would send it (the transfer port if any)."""
        if self.ports and not self.protocol.single_port:
            self.ports[-1].protocol.datagramReceived(datagram, peer)
        else:
            self.protocol.datagramReceived(datagram, peer)

    def ack(self, block: int, peer: Any = PEER) -> None:
        self.send(codec.encode_ack(block), peer)

    def sent(self, clear: bool = True) -> list[tuple[codec.Datagram, Any]]:
        """Decoded packets written so far (server port and transfer ports)."""
        out = list(self.transport.written)
        for port in self.ports:
            out.extend(port.transport.written)
            if clear:
                port.transport.written.clear()
        if clear:
            self.transport.written.clear()
        return [(codec.decode(p), addr) for p, addr in out]

    def packets(self) -> list[codec.Datagram]:
        return [p for p, _ in self.sent()]
