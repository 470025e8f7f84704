"""Simulated PXE machines for the boot storm (one process drives many; run in a namespace).

Each machine does what a BIOS PXE ROM and then iPXE do, in order:

1. DHCP DISCOVER as the PXE ROM (option 60 C{PXEClient:Arch:00000}, 93 = 0, 97 = its UUID),
   relayed: this process is the relay agent (giaddr, UDP 67 on C{--relay}), so the proxy
   answers unicast and two proxies never hear each other's clients;
2. TFTP RRQ of the boot file the OFFER named, from the server it named (C{blksize 1456},
   C{tsize 0}, as firmware asks; lock-step ACKs, 1 s retransmission);
3. DHCP DISCOVER as iPXE (user class C{iPXE}, option 175): the OFFER names the script URL;
4. HTTP GET of that script; its C{chain} URL with the machine's C{${uuid}} and
   C{${net0/mac:hexhyp}} filled in;
5. HTTP GET of that (C{/ipxe?uuid=..&mac=..}): a script with C{kernel} and C{initrd} lines;
6. HTTP GET of the kernel, then of the initrd (a new connection each, as iPXE opens them).

Every machine has its own address (C{--net}.C{first+i}) and MAC/UUID from C{--id-base}. At
C{--start-at} (wall clock) all start together. One JSON line per machine on stdout: C{ok},
C{error}, C{done} (wall clock when its initrd was complete), and per-step seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import socket
import struct
import sys
import time
import uuid as uuid_module
from typing import Any
from urllib.parse import urlsplit

from sidero.protocols.dhcp import codec
from sidero.protocols.dhcp.codec import DHCPMessage

#: Seconds to wait for each OFFER: iPXE's DHCP (and the chain script's rounds) keep trying
#: for about a minute before giving up, PXE ROMs four times over 60 s.
DHCP_TRIES = (2.0, 4.0, 8.0, 16.0, 32.0)
#: Receive buffers of the relay and TFTP sockets: a hundred machines' replies arrive at once
#: while this process may be busy reading downloads.
RCVBUF = 4 << 20
SO_RCVBUFFORCE = 33  # Linux; not in the socket module
TFTP_TIMEOUT = 1.0
TFTP_RETRIES = 8
HTTP_TIMEOUT = 120.0
BLKSIZE = 1456
#: Seconds a machine may take to boot before it counts as failed (nothing may hang a run).
BOOT_DEADLINE = 900.0


class BootFailed(Exception):
    pass


class Relay(asyncio.DatagramProtocol):
    """The relay agent's UDP 67: DISCOVERs out with giaddr, OFFERs back by xid."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[DHCPMessage]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # SO_RCVBUFFORCE (root) is not capped by net.core.rmem_max.
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            msg = codec.decode(data)
        except codec.MalformedPacket:
            return
        fut = self.waiting.get(msg.xid)
        if fut is not None and not fut.done() and msg.op == codec.BOOTREPLY:
            fut.set_result(msg)

    async def discover(self, msg: DHCPMessage, server: tuple[str, int],
                       result: dict[str, Any]) -> DHCPMessage:
        assert self.transport is not None
        fut: asyncio.Future[DHCPMessage] = asyncio.get_running_loop().create_future()
        self.waiting[msg.xid] = fut
        try:
            for wait in DHCP_TRIES:
                result["dhcp_sends"] = result.get("dhcp_sends", 0) + 1
                self.transport.sendto(codec.encode(msg), server)
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), wait)
                except TimeoutError:
                    continue
            raise BootFailed("no DHCP offer")
        finally:
            self.waiting.pop(msg.xid, None)


def discover_message(mac: bytes, guid: bytes, relay: str, ipxe: bool) -> DHCPMessage:
    options: list[tuple[int, bytes]] = [
        (codec.OPT_MESSAGE_TYPE, bytes((codec.DHCPDISCOVER,))),
        (codec.OPT_VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
        (codec.OPT_CLIENT_ARCH, b"\x00\x00"),
        (codec.OPT_CLIENT_UUID, b"\x00" + guid),
        (55, bytes((1, 3, 6, 43, 60, 66, 67, 97))),
    ]
    if ipxe:
        options += [(codec.OPT_USER_CLASS, b"iPXE"), (codec.OPT_IPXE_ENCAP, b"\x13\x01\x01")]
    return DHCPMessage(
        op=codec.BOOTREQUEST, htype=1, hlen=6, hops=1, xid=random.getrandbits(32), secs=0,
        flags=0, ciaddr="0.0.0.0", yiaddr="0.0.0.0", siaddr="0.0.0.0", giaddr=relay,
        chaddr=mac + b"\x00" * 10, file=b"", options=tuple(options))


class _Replies(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


def menu_item(offer: DHCPMessage) -> bytes | None:
    """The first boot menu item of a PXE OFFER (option 43, sub-option 9), layer 0."""
    raw = offer.get(codec.OPT_VENDOR_SPECIFIC)
    if not raw:
        return None
    menu = dict(codec.decode_suboptions(raw)).get(codec.PXE_BOOT_MENU)
    return menu[:2] + b"\x00\x00" if menu and len(menu) >= 3 else None


async def boot_server_request(ip: str, offer: DHCPMessage, discover: DHCPMessage) -> DHCPMessage:
    """PXE boot server discovery (the OFFER held a menu, not a file): REQUEST to :4011."""
    item = menu_item(offer)
    if item is None:
        raise BootFailed("the OFFER names neither a boot file nor a boot menu")
    server = offer.get(codec.OPT_SERVER_ID)
    target = ".".join(str(b) for b in server) if server and len(server) == 4 else offer.siaddr
    options = [(codec.OPT_MESSAGE_TYPE, bytes((codec.DHCPREQUEST,)))] + [
        o for o in discover.options if o[0] != codec.OPT_MESSAGE_TYPE] + [
        (codec.OPT_VENDOR_SPECIFIC, codec.encode_suboptions([(codec.PXE_BOOT_ITEM, item)]))]
    msg = dataclasses.replace(discover, ciaddr=ip, giaddr="0.0.0.0", hops=0,
                              xid=random.getrandbits(32), options=tuple(options))
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Replies, local_addr=(ip, 0))
    try:
        for wait in DHCP_TRIES:
            transport.sendto(codec.encode(msg), (target, 4011))
            end = loop.time() + wait
            while loop.time() < end:
                try:
                    data = await asyncio.wait_for(proto.queue.get(), end - loop.time())
                except TimeoutError:
                    break
                try:
                    reply = codec.decode(data)
                except codec.MalformedPacket:
                    continue
                if reply.xid == msg.xid and reply.op == codec.BOOTREPLY:
                    return reply
        raise BootFailed("no ACK from the boot server (:4011)")
    finally:
        transport.close()


async def dhcp(relay: Relay, ip: str, mac: bytes, guid: bytes, server: str,
               ipxe: bool, result: dict[str, Any]) -> tuple[str, str]:
    """DISCOVER through the relay, then (for a menu) boot server discovery: (file, server)."""
    discover = discover_message(mac, guid, relay_ip, ipxe)
    offer = await relay.discover(discover, (server, 67), result)
    name, tftp_server = boot_file(offer)
    if not name:
        name, tftp_server = boot_file(await boot_server_request(ip, offer, discover))
    if not name:
        raise BootFailed("no boot file from the boot server")
    return name, tftp_server


def boot_file(offer: DHCPMessage) -> tuple[str, str]:
    """(boot file, TFTP server) of an OFFER: options 67 and 66 first, else file and siaddr."""
    name = offer.get(codec.OPT_BOOTFILE) or offer.file.rstrip(b"\x00")
    server = offer.get(codec.OPT_TFTP_SERVER)
    return (name.rstrip(b"\x00").decode(),
            server.rstrip(b"\x00").decode() if server else offer.siaddr)


class TFTPClient(asyncio.DatagramProtocol):
    """One lock-step download, driven from the datagram callbacks (no task per packet)."""

    def __init__(self, name: str, server: str) -> None:
        self.name = name
        self.rrq = (b"\x00\x01" + name.encode() + b"\x00octet\x00tsize\x000\x00blksize\x00"
                    + str(BLKSIZE).encode() + b"\x00")
        self.last: tuple[bytes, Any] = (self.rrq, (server, 69))
        self.peer: Any = None
        self.block = self.size = self.retries = 0
        self.blksize, self.tsize = 512, -1
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.transport.sendto(*self.last)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(TFTP_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self.retries += 1
        if self.retries > TFTP_RETRIES:
            self._finish(BootFailed(f"TFTP {self.name}: timed out at block {self.block}"))
        else:
            self._send()

    def _finish(self, result: int | Exception) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.done.done():
            if isinstance(result, Exception):
                self.done.set_exception(result)
            else:
                self.done.set_result(result)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.done.done():
            return
        if self.peer is None:
            self.peer = addr
        elif addr != self.peer:
            return
        op = struct.unpack("!H", data[:2])[0]
        if op == 5:
            self._finish(BootFailed(f"TFTP {self.name}: error "
                                    f"{data[4:-1].decode(errors='replace')}"))
        elif op == 6 and self.block == 0:
            parts = data[2:].split(b"\x00")
            opts = dict(zip(parts[0::2], parts[1::2], strict=False))
            self.blksize = int(opts.get(b"blksize", b"512"))
            self.tsize = int(opts.get(b"tsize", b"-1"))
            self.last = (b"\x00\x04\x00\x00", self.peer)
            self.retries = 0
            self._send()
        elif op == 3:
            n = struct.unpack("!H", data[2:4])[0]
            if n == (self.block + 1) & 0xFFFF:
                self.block += 1
                self.size += len(data) - 4
                self.retries = 0
                self.last = (b"\x00\x04" + data[2:4], self.peer)
                if len(data) - 4 < self.blksize:
                    self.transport.sendto(*self.last)
                    if 0 <= self.tsize != self.size:
                        self._finish(BootFailed(
                            f"TFTP {self.name}: {self.size} bytes, tsize said {self.tsize}"))
                    else:
                        self._finish(self.size)
                else:
                    self._send()
            elif n == self.block & 0xFFFF:
                self.transport.sendto(*self.last)  # our ACK was lost: say it again


async def tftp_get(ip: str, server: str, name: str) -> int:
    """Download C{name}; its size. @raise BootFailed: error, timeout or short transfer."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: TFTPClient(name, server), local_addr=(ip, 0))
    try:
        return await proto.done
    finally:
        transport.close()


async def http_get(ip: str, url: str, keep: bool = True) -> tuple[int, bytes, int]:
    """GET C{url} from source address C{ip}: (status, body if C{keep}, body length)."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((ip, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), HTTP_TIMEOUT)
        await loop.sock_sendall(sock, (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: iPXE/1.0.0 (bench)\r\n"
            "Connection: close\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), HTTP_TIMEOUT)
            if not chunk:
                raise BootFailed(f"GET {url}: connection closed in headers")
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = -1
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        body = [rest] if keep else []
        got = len(rest)
        buf = bytearray(1 << 20)
        while length < 0 or got < length:
            n = await asyncio.wait_for(loop.sock_recv_into(sock, buf), HTTP_TIMEOUT)
            if n == 0:
                break
            got += n
            if keep:
                body.append(bytes(buf[:n]))
        if length >= 0 and got != length:
            raise BootFailed(f"GET {url}: {got} of {length} bytes")
        return status, b"".join(body), got
    finally:
        sock.close()


def fill_chain(script: str, uuid: str, mac: str) -> str:
    """The C{chain} URL of the boot script with this machine's iPXE settings."""
    m = re.search(r"chain (?:--replace )?(\S+)", script)
    if not m:
        raise BootFailed("no chain line in the boot script")
    url = m.group(1)
    url = re.sub(r"\$\{uuid\}", uuid, url)
    url = re.sub(r"\$\{net[^}]*\}?/mac:hexhyp\}", mac.replace(":", "-"), url)
    url = url.replace("${buildarch}", "x86_64")
    return re.sub(r"\$\{[^}]*\}", "", url)


async def boot(index: int, ip: str, relay: Relay, server: str, id_base: int) -> dict[str, Any]:
    n = id_base + index
    mac = bytes((0x52, 0x54, 0x00, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF))
    uuid = str(uuid_module.UUID(int=(0xB007 << 112) | n))
    guid = uuid_module.UUID(uuid).bytes_le
    mac_text = ":".join(f"{b:02x}" for b in mac)
    steps: dict[str, float] = {}
    result: dict[str, Any] = {"machine": index, "ip": ip, "uuid": uuid, "ok": False}
    t = time.monotonic()

    def step(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        steps[name] = round(now - t, 4)
        t = now

    try:
        name, tftp_server = await dhcp(relay, ip, mac, guid, server, False, result)
        step("dhcp")
        await tftp_get(ip, tftp_server, name)
        step("tftp")
        script_url, _ = await dhcp(relay, ip, mac, guid, server, True, result)
        if not script_url.startswith("http://"):
            raise BootFailed(f"iPXE was offered {script_url!r}, not a script URL")
        step("dhcp-ipxe")
        status, script, _ = await http_get(ip, script_url)
        if status != 200:
            raise BootFailed(f"GET {script_url}: {status}")
        step("boot.ipxe")
        ipxe_url = fill_chain(script.decode(), uuid, mac_text)
        status, script, _ = await http_get(ip, ipxe_url)
        if status != 200:
            raise BootFailed(f"GET {ipxe_url}: {status}")
        step("ipxe")
        base = urlsplit(ipxe_url)
        urls = {}
        for line in script.decode().splitlines():
            words = line.split()
            if words and words[0] in ("kernel", "initrd"):
                target = words[1]
                if target.startswith("/"):
                    target = f"{base.scheme}://{base.netloc}{target}"
                urls[words[0]] = target
        if set(urls) != {"kernel", "initrd"}:
            raise BootFailed(f"/ipxe script without kernel and initrd: {script[:200]!r}")
        for what in ("kernel", "initrd"):
            status, _, size = await http_get(ip, urls[what], keep=False)
            if status != 200 or size == 0:
                raise BootFailed(f"GET {urls[what]}: {status}, {size} bytes")
            result[f"{what}_bytes"] = size
            step(what)
        result["ok"] = True
    except (TimeoutError, BootFailed, OSError, ValueError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    result["done"] = time.time()
    result["steps"] = steps
    return result


relay_ip = ""


async def main_async(args: argparse.Namespace) -> None:
    global relay_ip
    relay_ip = args.relay
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_datagram_endpoint(Relay, local_addr=(args.relay, 67))
    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    ips = [f"{args.net}.{args.first + i}" for i in range(args.machines)]
    async def bounded(i: int, ip: str) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(boot(i, ip, relay, args.server, args.id_base),
                                          BOOT_DEADLINE)
        except TimeoutError:
            return {"machine": i, "ip": ip, "ok": False, "done": time.time(), "steps": {},
                    "error": f"not booted within {BOOT_DEADLINE:g}s"}

    results = await asyncio.gather(*(bounded(i, ip) for i, ip in enumerate(ips)))
    for r in results:
        sys.stdout.write(json.dumps(r) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", required=True, help="the proxy DHCP server's address")
    ap.add_argument("--relay", required=True, help="this namespace's relay (giaddr) address")
    ap.add_argument("--net", required=True, help="first three octets of the machines' addresses")
    ap.add_argument("--first", type=int, default=10)
    ap.add_argument("--machines", type=int, default=100)
    ap.add_argument("--id-base", type=int, default=0, help="MACs and UUIDs start here")
    ap.add_argument("--start-at", type=float, default=0.0, help="wall-clock start (time.time)")
    args = ap.parse_args()
    random.seed(os.getpid() ^ args.id_base)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
