"""REQUEST→ACK load on a proxyDHCP port (UDP 4011), for bench_proxy (not a test).

perfdhcp cannot drive this exchange: sent to 4011 its DISCOVER is (rightly) ignored by both
proxies, and a REQUEST template alone makes it abort on the first ACK ("Packets exchange not
specified"). So this small generator sends what EDK2 sends after a boot menu (a REQUEST from
its leased address with option 43 asking for boot item 0x8000, REAL-CLIENTS 3) from
C{--clients} distinct MACs, and times each ACK by xid. It is Python, so at full speed it may
be the bottleneck: bench_proxy runs it against both peers and reports the ratio.

Modes: C{--rate N} sends N/s open-loop (latency); C{--rate 0} keeps C{--window} requests
outstanding (closed loop: throughput). Prints one JSON line.

Run inside the load namespace: ``python -m bench.dhcp.ack_load SERVER --source IP``
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time

GUID = b"\x00" + bytes.fromhex("11111111222233334444555555555555")


def request(xid: int, client: int, source: bytes) -> bytes:
    def opt(code: int, value: bytes) -> bytes:
        return bytes((code, len(value))) + value

    chaddr = b"\x52\x54" + struct.pack("!I", client)
    header = struct.pack("!BBBBIHH", 1, 1, 6, 0, xid, 0, 0) + source + bytes(12)
    header += chaddr.ljust(16, b"\0") + bytes(64 + 128)
    options = (opt(53, b"\x03") + opt(93, b"\x00\x07") + opt(97, GUID)
               + opt(60, b"PXEClient:Arch:00007:UNDI:003000")
               + opt(43, opt(71, b"\x80\x00\x00\x00") + b"\xff") + b"\xff")
    return (header + b"\x63\x82\x53\x63" + options).ljust(300, b"\0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("server")
    ap.add_argument("--source", required=True, help="our address (ciaddr, bound)")
    ap.add_argument("--port", type=int, default=4011)
    ap.add_argument("--rate", type=int, default=1000, help="requests/s; 0 = closed loop")
    ap.add_argument("--window", type=int, default=64, help="outstanding, closed loop")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--clients", type=int, default=100000)
    args = ap.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((args.source, 0))
    sock.setblocking(False)
    source = socket.inet_aton(args.source)
    dest = (args.server, args.port)
    sent_at: dict[int, float] = {}
    delays: list[float] = []
    sent = 0
    start = time.monotonic()
    end = start + args.seconds
    xid = 1

    def send_one() -> None:
        nonlocal sent, xid
        try:
            sock.sendto(request(xid, xid % args.clients, source), dest)
        except BlockingIOError:
            return
        sent_at[xid] = time.monotonic()
        sent += 1
        xid = (xid + 1) & 0xFFFFFFFF or 1

    def receive(timeout: float) -> None:
        ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
        if not ready:
            return
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            now = time.monotonic()
            if len(data) >= 8:
                t = sent_at.pop(struct.unpack_from("!I", data, 4)[0], None)
                if t is not None:
                    delays.append(now - t)

    now = start
    while now < end:
        if args.rate:
            due = start + sent / args.rate
            if now >= due:
                send_one()
            receive(due - time.monotonic() if now < due else 0)
        else:
            for _ in range(args.window - len(sent_at)):
                send_one()
            receive(0.05)
            stale = now - 0.5
            for k in [k for k, t in sent_at.items() if t < stale]:
                del sent_at[k]  # lost: counted as unanswered, the window moves on
        now = time.monotonic()
    drain = time.monotonic() + 0.5
    while sent_at and time.monotonic() < drain:
        receive(drain - time.monotonic())
    elapsed = args.seconds
    delays.sort()
    out = {"sent": sent, "received": len(delays), "rate": len(delays) / elapsed}
    if delays:
        out["p50_ms"] = delays[len(delays) // 2] * 1000
        out["p99_ms"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
