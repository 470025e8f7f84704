"""Read sessions and the TFTP protocol on a Clock and a fake datagram transport."""

from __future__ import annotations

import os

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from sidero.protocols.tftp import codec
from sidero.protocols.tftp.codec import Ack, Data, Error, ErrorCode, OptionAck
from sidero.protocols.tftp.session import SessionConfig, negotiate

from .fakes import OTHER, PEER, Harness


def data_blocks(packets: list[codec.Datagram]) -> list[int]:
    return [p.block for p in packets if isinstance(p, Data)]


class NegotiationTests(SynchronousTestCase):
    """Option negotiation (RFC 2347-2349, 7440) as a pure decision."""

    def test_echoes_accepted_options_in_client_order(self) -> None:
        """Accepted options come back in the order the client sent them, tsize as the size."""
        agreed = negotiate(
            {"tsize": "0", "windowsize": "4", "blksize": "1428", "timeout": "3"},
            12345, SessionConfig(),
        )
        self.assertEqual(
            list(agreed.oack.items()),
            [("tsize", "12345"), ("windowsize", "4"), ("blksize", "1428"), ("timeout", "3")],
        )
        self.assertEqual((agreed.blksize, agreed.windowsize, agreed.timeout), (1428, 4, 3.0))

    def test_caps_blksize_and_window(self) -> None:
        """blksize is capped by the server maximum and the window by its byte budget."""
        agreed = negotiate(
            {"blksize": "65464", "windowsize": "1000"},
            1, SessionConfig(max_blksize=1468, max_window_bytes=1468 * 10),
        )
        self.assertEqual(agreed.oack, {"blksize": "1468", "windowsize": "10"})

    def test_invalid_and_unknown_options_are_not_negotiated(self) -> None:
        """Out-of-range, non-decimal and unknown options produce no OACK at all."""
        agreed = negotiate(
            {"blksize": "7", "timeout": "0", "windowsize": "x", "tsize": "-1", "utimeout": "9"},
            100, SessionConfig(),
        )
        self.assertEqual(agreed.oack, {})
        self.assertEqual((agreed.blksize, agreed.windowsize), (512, 1))


class TransferTests(SynchronousTestCase):
    """Whole transfers driven packet by packet."""

    def test_small_file_without_options(self) -> None:
        """Without options DATA 1 goes out at once, and ACK 1 ends the transfer."""
        h = Harness({"f": b"hello"})
        h.rrq("f")
        self.assertEqual(h.sent(), [(Data(1, b"hello"), PEER)])
        h.ack(1)
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(h.protocol.stats.outcomes["complete"], 1)
        self.assertTrue(h.assets.readers[0].closed)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_exact_multiple_ends_with_empty_block(self) -> None:
        """A file that is a multiple of the block size ends with a zero-length block."""
        body = os.urandom(1024)
        h = Harness({"f": body})
        h.rrq("f")
        self.assertEqual(h.packets(), [Data(1, body[:512])])
        h.ack(1)
        self.assertEqual(h.packets(), [Data(2, body[512:])])
        h.ack(2)
        self.assertEqual(h.packets(), [Data(3, b"")])
        h.ack(3)
        self.assertEqual(h.protocol.active, 0)

    def test_empty_file(self) -> None:
        """An empty file is one empty DATA block."""
        h = Harness({"f": b""})
        h.rrq("f", {"tsize": "0"})
        self.assertEqual(h.packets(), [OptionAck({"tsize": "0"})])
        h.ack(0)
        self.assertEqual(h.packets(), [Data(1, b"")])
        h.ack(1)
        self.assertEqual(h.protocol.stats.outcomes["complete"], 1)

    def test_oack_waits_for_ack_zero(self) -> None:
        """After an OACK nothing is sent until ACK 0, then blocks of the agreed size."""
        body = os.urandom(3000)
        h = Harness({"f": body})
        h.rrq("f", {"blksize": "1000", "tsize": "0"})
        self.assertEqual(h.packets(), [OptionAck({"blksize": "1000", "tsize": "3000"})])
        h.ack(5)  # not ACK 0: ignored
        self.assertEqual(h.packets(), [])
        h.ack(0)
        self.assertEqual(h.packets(), [Data(1, body[:1000])])

    def test_window_is_sent_back_to_back(self) -> None:
        """With windowsize 4 four blocks go out, and the window's last ACK sends the next."""
        body = os.urandom(512 * 9 + 7)
        h = Harness({"f": body})
        h.rrq("f", {"windowsize": "4"})
        h.sent()
        h.ack(0)
        self.assertEqual(data_blocks(h.packets()), [1, 2, 3, 4])
        h.ack(4)
        self.assertEqual(data_blocks(h.packets()), [5, 6, 7, 8])
        h.ack(8)
        packets = h.packets()
        self.assertEqual(data_blocks(packets), [9, 10])
        self.assertEqual(packets[-1], Data(10, body[512 * 9:]))
        h.ack(10)
        self.assertEqual(h.protocol.active, 0)

    def test_ack_inside_window_restarts_after_it(self) -> None:
        """An ACK short of the window's end (a gap) restarts the window after that block."""
        h = Harness({"f": os.urandom(512 * 20)})
        h.rrq("f", {"windowsize": "4"})
        h.sent()
        h.ack(0)
        h.sent()
        h.ack(2)
        self.assertEqual(data_blocks(h.packets()), [3, 4, 5, 6])

    def test_duplicate_ack_does_not_retransmit(self) -> None:
        """A duplicate ACK is ignored (no Sorcerer's Apprentice); only the timer resends."""
        h = Harness({"f": os.urandom(2000)})
        h.rrq("f")
        h.sent()
        h.ack(1)
        self.assertEqual(data_blocks(h.packets()), [2])
        h.ack(1)
        h.ack(1)
        self.assertEqual(h.packets(), [])
        h.ack(7)  # a block never sent: ignored too
        self.assertEqual(h.packets(), [])

    def test_retransmits_on_timeout(self) -> None:
        """Silence for the timeout resends the whole current window."""
        h = Harness({"f": os.urandom(5000)})
        h.rrq("f", {"windowsize": "2"})
        h.sent()
        h.ack(0)
        h.sent()
        h.clock.advance(4.9)
        self.assertEqual(h.packets(), [])
        h.clock.advance(0.2)
        self.assertEqual(data_blocks(h.packets()), [1, 2])

    def test_negotiated_timeout_is_used(self) -> None:
        """The client's timeout option sets the retransmission interval."""
        h = Harness({"f": os.urandom(100)})
        h.rrq("f", {"timeout": "1"})
        self.assertEqual(h.packets(), [OptionAck({"timeout": "1"})])
        h.clock.advance(1.0)
        self.assertEqual(h.packets(), [OptionAck({"timeout": "1"})])

    def test_oack_is_retransmitted(self) -> None:
        """An OACK without ACK 0 is sent again when the timer fires."""
        h = Harness({"f": b"x"})
        h.rrq("f", {"tsize": "0"})
        h.sent()
        h.clock.advance(5)
        self.assertEqual(h.packets(), [OptionAck({"tsize": "1"})])

    def test_gives_up_after_retries(self) -> None:
        """After max_retries silent timeouts an ERROR is sent and the session is gone."""
        h = Harness({"f": os.urandom(5000)})
        h.rrq("f")
        h.sent()
        for _ in range(3):
            h.clock.advance(5)
            self.assertEqual(data_blocks(h.packets()), [1])
        h.clock.advance(5)
        self.assertEqual(h.packets(), [Error(ErrorCode.NOT_DEFINED, "Timed out")])
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(h.protocol.stats.outcomes["timeout"], 1)
        self.assertEqual(h.protocol.stats.retransmits, 3)  # the fourth silence gave up
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertTrue(h.assets.readers[0].closed)

    def test_progress_resets_retries(self) -> None:
        """A new ACK resets the retry count, so slow but steady clients are served."""
        h = Harness({"f": os.urandom(512 * 10)})
        h.rrq("f")
        for block in range(1, 11):
            h.clock.pump([5] * 3)  # three timeouts per block, at the limit
            h.ack(block)
        self.assertEqual(h.protocol.active, 1)
        h.sent()
        h.ack(11)
        self.assertEqual(h.protocol.stats.outcomes["complete"], 1)

    def test_block_numbers_roll_over(self) -> None:
        """Past block 65535 the wire number wraps to 0 and the bytes stay in order."""
        blocks = 65536 + 10
        body = os.urandom(8 * blocks + 3)
        h = Harness({"f": body}, config=SessionConfig(read_ahead=4096))
        h.rrq("f", {"blksize": "8"})
        h.sent()
        h.ack(0)
        received = []
        wire = []
        for _ in range(blocks + 1):
            [packet] = h.packets()
            assert isinstance(packet, Data)
            received.append(packet.payload)
            wire.append(packet.block)
            h.ack(packet.block)
        self.assertEqual(b"".join(received), body)
        self.assertEqual(wire[65533:65538], [65534, 65535, 0, 1, 2])
        self.assertEqual(h.protocol.stats.outcomes["complete"], 1)

    def test_rollover_with_windows(self) -> None:
        """Windows that straddle the wrap are acknowledged by their wrapped numbers."""
        blocks = 65536 + 100
        body = os.urandom(8 * blocks)
        h = Harness({"f": body})
        h.rrq("f", {"blksize": "8", "windowsize": "7"})
        h.sent()
        h.ack(0)
        received = []
        while h.protocol.active:
            packets = h.packets()
            for packet in packets:
                assert isinstance(packet, Data)
                received.append(packet.payload)
            h.ack(packets[-1].block)  # type: ignore[union-attr]
        self.assertEqual(b"".join(received), body)

    def test_stalls_until_read_ahead_arrives(self) -> None:
        """A block is sent only once the backend read returns, and then at once."""
        body = os.urandom(1500)
        h = Harness({"f": body})
        h.assets.hold_reads = True
        h.rrq("f")
        self.assertEqual(h.packets(), [])
        h.assets.readers[0].release()
        self.assertEqual(h.packets(), [Data(1, body[:512])])

    def test_reads_are_chunked_ahead(self) -> None:
        """The backend is read in aligned chunks of at least read_ahead, not per block."""
        h = Harness({"f": os.urandom(100_000)}, config=SessionConfig(read_ahead=10_000))
        h.rrq("f", {"blksize": "1000"})
        h.ack(0)
        for block in range(1, 30):
            h.ack(block)
        reads = h.assets.readers[0].reads
        self.assertEqual(reads[0], (0, 10_000))
        self.assertTrue(all(offset % 1000 == 0 for offset, _ in reads))
        self.assertLessEqual(len(reads), 5)


class ErrorTests(SynchronousTestCase):
    """Refusals and aborted transfers."""

    def test_missing_file(self) -> None:
        """A missing file gets ERROR 1 and leaves no session."""
        h = Harness({})
        h.rrq("nope")
        self.assertEqual(h.sent(), [(Error(ErrorCode.FILE_NOT_FOUND, "File not found"), PEER)])
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_access_violation(self) -> None:
        """A refused name gets ERROR 2."""
        h = Harness({"secret": b"x"})
        h.assets.denied.add("secret")
        h.rrq("secret")
        self.assertEqual(h.packets(), [Error(ErrorCode.ACCESS_VIOLATION, "Access violation")])

    def test_write_request_refused(self) -> None:
        """A WRQ gets ERROR 2: the server is read-only."""
        h = Harness({"f": b"x"})
        h.protocol.datagramReceived(codec.encode_request(codec.WRQ, "f"), PEER)
        self.assertEqual(h.packets(), [Error(ErrorCode.ACCESS_VIOLATION, "Read-only server")])
        self.assertEqual(h.protocol.stats.write_requests, 1)

    def test_mail_mode_refused(self) -> None:
        """Mode mail is an illegal operation; netascii is served as bytes."""
        h = Harness({"f": b"x\n"})
        h.rrq("f", mode="mail")
        self.assertEqual(h.packets(), [Error(ErrorCode.ILLEGAL_OPERATION, "Unsupported mode")])
        h.rrq("f", mode="NetAscii".lower())
        self.assertEqual(h.packets(), [Data(1, b"x\n")])

    def test_peer_error_ends_session_silently(self) -> None:
        """An ERROR from the peer (e.g. option refused) ends the session without reply."""
        h = Harness({"f": b"x"})
        h.rrq("f", {"blksize": "1000"})
        h.sent()
        h.send(codec.encode_error(ErrorCode.OPTION_REFUSED, "no"))
        self.assertEqual(h.packets(), [])
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(h.protocol.stats.outcomes["peer-error"], 1)

    def test_data_from_peer_is_illegal(self) -> None:
        """DATA sent to a read transfer gets ERROR 4 and ends it."""
        h = Harness({"f": os.urandom(2000)})
        h.rrq("f")
        h.sent()
        h.send(codec.encode_data(1, b"zzz"))
        self.assertEqual(h.packets(), [Error(ErrorCode.ILLEGAL_OPERATION, "Unexpected DATA")])
        self.assertEqual(h.protocol.active, 0)

    def test_read_error(self) -> None:
        """A backend read failure is ERROR 0 and the end of the session."""
        h = Harness({"f": os.urandom(2000)})
        h.assets.broken_reads = True
        h.rrq("f")
        self.assertEqual(h.packets(), [Error(ErrorCode.NOT_DEFINED, "Read error")])
        self.assertEqual(h.protocol.active, 0)

    def test_slow_open_times_out(self) -> None:
        """A backend that never answers is given up on, and a late answer is closed."""
        h = Harness({"f": b"x"})
        h.assets.hold_open = True
        h.rrq("f")
        h.clock.pump([5] * 4)
        self.assertEqual(h.packets(), [Error(ErrorCode.NOT_DEFINED, "Timed out")])
        self.assertEqual(h.protocol.active, 0)
        h.assets.release_opens()
        self.assertTrue(h.assets.readers[0].closed)
        self.assertEqual(h.packets(), [])

    def test_busy(self) -> None:
        """Past max_sessions an RRQ gets ERROR 0 and creates nothing."""
        h = Harness({"f": os.urandom(2000)}, max_sessions=2)
        h.rrq("f", peer=("192.0.2.1", 1))
        h.rrq("f", peer=("192.0.2.2", 1))
        h.sent()
        h.rrq("f", peer=("192.0.2.3", 1))
        self.assertEqual(
            h.sent(), [(Error(ErrorCode.NOT_DEFINED, "Server busy"), ("192.0.2.3", 1))]
        )
        self.assertEqual(h.protocol.active, 2)
        self.assertEqual(h.protocol.stats.busy, 1)


class SinglePortTests(SynchronousTestCase):
    """Demultiplexing by peer on one port."""

    def test_sessions_are_per_peer(self) -> None:
        """Two peers get independent transfers on the same port."""
        h = Harness({"a": b"A" * 600, "b": b"B" * 10})
        h.rrq("a", peer=PEER)
        h.rrq("b", peer=OTHER)
        self.assertEqual(
            h.sent(), [(Data(1, b"A" * 512), PEER), (Data(1, b"B" * 10), OTHER)]
        )
        h.ack(1, peer=OTHER)
        self.assertEqual(h.protocol.active, 1)
        h.ack(1, peer=PEER)
        self.assertEqual(h.sent(), [(Data(2, b"A" * 88), PEER)])

    def test_new_request_replaces_session(self) -> None:
        """A different RRQ from the same peer replaces its session."""
        h = Harness({"a": os.urandom(2000), "b": b"bee"})
        h.rrq("a")
        h.ack(1)
        h.sent()
        h.rrq("b")
        self.assertEqual(h.packets(), [Data(1, b"bee")])
        self.assertEqual(h.protocol.active, 1)
        self.assertEqual(h.protocol.stats.replaced, 1)
        self.assertTrue(h.assets.readers[0].closed)

    def test_repeated_request_resends(self) -> None:
        """The same RRQ repeated before any ACK resends the first packet, not a new session."""
        h = Harness({"a": os.urandom(2000)})
        h.rrq("a", {"blksize": "1024"})
        first = h.packets()
        h.rrq("a", {"blksize": "1024"})
        self.assertEqual(h.packets(), first)
        self.assertEqual(len(h.assets.readers), 1)
        self.assertEqual(h.protocol.stats.duplicate_requests, 1)

    def test_stray_ack_is_dropped(self) -> None:
        """ACK/ERROR from a peer without a session is counted and not answered."""
        h = Harness({"a": b"x"})
        h.ack(1)
        h.send(codec.encode_error(0, "x"))
        self.assertEqual(h.packets(), [])
        self.assertEqual(h.protocol.stats.stray, 2)

    def test_malformed_is_dropped_and_rate_limited(self) -> None:
        """Malformed datagrams are counted and logged at most burst times per period."""
        h = Harness({"a": b"x"})
        with capturedLogs() as events:
            for _ in range(50):
                h.protocol.datagramReceived(b"\x00\x09junk", PEER)
        self.assertEqual(h.packets(), [])
        self.assertEqual(h.protocol.stats.malformed, 50)
        warned = [e for e in events if "reason" in e]
        self.assertEqual(len(warned), 10)
        h.clock.advance(61)
        with capturedLogs() as events:
            h.protocol.datagramReceived(b"\x00", PEER)
        self.assertEqual([e["suppressed"] for e in events if "reason" in e], [40])

    def test_shutdown_aborts_sessions(self) -> None:
        """Stopping the protocol ends every session and leaves no timers."""
        h = Harness({"a": os.urandom(5000)})
        h.rrq("a", peer=PEER)
        h.rrq("a", peer=OTHER)
        h.protocol.doStop()
        self.assertEqual(h.protocol.active, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.protocol.stats.outcomes["aborted"], 2)


class StandardModeTests(SynchronousTestCase):
    """RFC 1350 mode: one ephemeral port per transfer."""

    def test_transfer_uses_its_own_port(self) -> None:
        """DATA leaves from the transfer port, and the port closes when done."""
        h = Harness({"f": b"abc"}, single_port=False)
        h.rrq("f")
        self.assertEqual(h.transport.written, [])
        self.assertEqual(len(h.ports), 1)
        self.assertEqual(h.ports[0].transport.written, [(codec.encode_data(1, b"abc"), PEER)])
        h.ack(1)
        self.assertTrue(h.ports[0].stopped)
        self.assertEqual(h.protocol.active, 0)

    def test_other_peer_gets_unknown_tid(self) -> None:
        """A packet from another address on a transfer port gets ERROR 5; the transfer goes on."""
        h = Harness({"f": os.urandom(1000)}, single_port=False)
        h.rrq("f")
        h.sent()
        h.send(codec.encode_ack(1), OTHER)
        self.assertEqual(h.sent(), [(Error(ErrorCode.UNKNOWN_TID, "Unknown transfer ID"), OTHER)])
        h.ack(1)
        self.assertEqual(data_blocks(h.packets()), [2])

    def test_requests_from_same_peer_are_independent(self) -> None:
        """In standard mode a second RRQ from the same peer does not replace the first."""
        h = Harness({"f": os.urandom(1000)}, single_port=False)
        h.rrq("f")
        h.rrq("f")
        self.assertEqual(h.protocol.active, 2)
        self.assertEqual(len(h.ports), 2)

    def test_ack_on_server_port_is_stray(self) -> None:
        """In standard mode ACKs to the server port belong to no transfer."""
        h = Harness({"f": os.urandom(1000)}, single_port=False)
        h.rrq("f")
        h.sent()
        h.protocol.datagramReceived(codec.encode_ack(1), PEER)
        self.assertEqual(h.protocol.stats.stray, 1)
        self.assertEqual(h.packets(), [])


class AckTypeTests(SynchronousTestCase):
    """The fast ACK path agrees with the full decoder."""

    def test_fast_path_matches_decode(self) -> None:
        """decode_ack_fast returns the ACK block, and -1 for anything else."""
        self.assertEqual(codec.decode_ack_fast(codec.encode_ack(65535)), 65535)
        self.assertEqual(codec.decode(codec.encode_ack(65535)), Ack(65535))
        self.assertEqual(codec.decode_ack_fast(codec.encode_data(1, b"")), -1)
        self.assertEqual(codec.decode_ack_fast(b"\x00\x04\x00"), -1)
