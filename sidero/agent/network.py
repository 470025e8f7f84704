# -*- test-case-name: tests.agent.test_network -*-
"""Networking on the boot NIC (spec §4 step 4): find it by MAC, DHCPv4, apply the lease.

The DHCP exchange reuses the pure codec of the proxy (L{sidero.protocols.dhcp.codec}); lease
decoding (L{Lease.from_ack}) and the classless-route option (L{parse_classless_routes}) are
pure.  The client asks servers to broadcast their answers, so a plain UDP socket bound to
port 68 on the NIC hears them before the NIC has an address.  Everything blocks: the agent is
a one-shot program, and the caller runs this before anything else.
"""

from __future__ import annotations

import os
import random
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from twisted.logger import Logger

from sidero.protocols.dhcp import codec

log = Logger()

OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_CLASSLESS_ROUTES = 121
#: What the Go agent asks for: the library's defaults plus 121, 6, 26 and 12.
REQUESTED_OPTIONS = bytes((OPT_SUBNET_MASK, OPT_ROUTER, OPT_DOMAIN_NAME, OPT_DNS,
                           OPT_CLASSLESS_ROUTES, OPT_MTU, OPT_HOSTNAME))
RTPROT_BOOT = 3


class DHCPError(Exception):
    """No lease was obtained (per attempt or overall)."""


class InterfaceNotFound(Exception):
    """No interface has the boot MAC."""


@dataclass(frozen=True)
class Route:
    destination: str  # CIDR
    gateway: str  # "0.0.0.0" = on-link


@dataclass(frozen=True)
class Lease:
    address: str
    prefixlen: int
    server: str
    routers: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    mtu: int | None = None
    hostname: str | None = None
    classless_routes: tuple[Route, ...] = field(default_factory=tuple)

    @classmethod
    def from_ack(cls, ack: codec.DHCPMessage) -> Lease:
        """The lease an ACK grants; malformed options are ignored, a missing mask is /32."""
        mask = ack.get(OPT_SUBNET_MASK)
        prefix = 32
        if mask is not None and len(mask) == 4:
            try:
                prefix = IPv4Network(f"0.0.0.0/{IPv4Address(mask)}").prefixlen
            except ValueError:
                prefix = 32
        mtu_raw = ack.get(OPT_MTU)
        mtu = int.from_bytes(mtu_raw, "big") if mtu_raw and len(mtu_raw) == 2 else None
        host = ack.get(OPT_HOSTNAME)
        hostname = host.rstrip(b"\x00").decode("ascii", "replace") if host else None
        try:
            routes = tuple(parse_classless_routes(ack.get(OPT_CLASSLESS_ROUTES) or b""))
        except ValueError as e:
            log.warn("ignoring malformed classless routes: {error}", error=e)
            routes = ()
        server = ack.get(codec.OPT_SERVER_ID)
        return cls(
            address=ack.yiaddr, prefixlen=prefix,
            server=str(IPv4Address(server)) if server and len(server) == 4 else ack.siaddr,
            routers=_addresses(ack.get(OPT_ROUTER)), dns=_addresses(ack.get(OPT_DNS)),
            mtu=mtu if mtu and mtu >= 68 else None, hostname=hostname or None,
            classless_routes=routes,
        )


def _addresses(raw: bytes | None) -> tuple[str, ...]:
    if not raw or len(raw) % 4:
        return ()
    return tuple(str(IPv4Address(raw[i : i + 4])) for i in range(0, len(raw), 4))


def parse_classless_routes(data: bytes) -> list[Route]:
    """RFC 3442: (width, significant destination octets, router) entries."""
    routes = []
    i = 0
    while i < len(data):
        width = data[i]
        if width > 32:
            raise ValueError(f"prefix length {width} > 32")
        octets = (width + 7) // 8
        end = i + 1 + octets + 4
        if end > len(data):
            raise ValueError("truncated route")
        dest = data[i + 1 : i + 1 + octets] + bytes(4 - octets)
        network = IPv4Network((IPv4Address(dest), width), strict=False)
        routes.append(Route(str(network), str(IPv4Address(data[end - 4 : end]))))
        i = end
    return routes


# --- the DHCP exchange --------------------------------------------------------------------------

def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def build_discover(mac: str, xid: int) -> codec.DHCPMessage:
    return codec.DHCPMessage(
        op=codec.BOOTREQUEST, xid=xid, flags=codec.FLAG_BROADCAST, chaddr=_mac_bytes(mac),
        options=((codec.OPT_MESSAGE_TYPE, bytes((codec.DHCPDISCOVER,))),
                 (codec.OPT_PARAMETER_REQUEST_LIST, REQUESTED_OPTIONS)),
    )


def build_request(mac: str, xid: int, offer: codec.DHCPMessage) -> codec.DHCPMessage:
    options: list[tuple[int, bytes]] = [
        (codec.OPT_MESSAGE_TYPE, bytes((codec.DHCPREQUEST,))),
        (codec.OPT_REQUESTED_IP, IPv4Address(offer.yiaddr).packed),
    ]
    server = offer.get(codec.OPT_SERVER_ID)
    if server:
        options.append((codec.OPT_SERVER_ID, server))
    options.append((codec.OPT_PARAMETER_REQUEST_LIST, REQUESTED_OPTIONS))
    return codec.DHCPMessage(op=codec.BOOTREQUEST, xid=xid, flags=codec.FLAG_BROADCAST,
                             chaddr=_mac_bytes(mac), options=tuple(options))


class DHCPSocket:
    """UDP :68 on one interface, sending broadcasts to :67 (the real I/O; tests fake it)."""

    def __init__(self, interface: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                 interface.encode() + b"\x00")
            self.sock.bind(("0.0.0.0", 68))
        except OSError:
            self.sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("255.255.255.255", 67))

    def receive(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return None
        return self.sock.recv(4096)

    def close(self) -> None:
        self.sock.close()


class DHCPClient:
    """DISCOVER → OFFER → REQUEST → ACK with retransmissions, per spec timings (injectable).

    @param attempt_timeout: seconds one exchange may take (30).
    @param retry_interval: pause between failed exchanges (10).
    @param overall_timeout: give up after this long (300).
    @param retransmit: seconds before a DISCOVER/REQUEST is sent again within an exchange.
    """

    def __init__(
        self, mac: str, transport: DHCPSocket, *, attempt_timeout: float = 30.0,
        retry_interval: float = 10.0, overall_timeout: float = 300.0, retransmit: float = 4.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.mac = mac.lower()
        self.transport = transport
        self.attempt_timeout = attempt_timeout
        self.retry_interval = retry_interval
        self.overall_timeout = overall_timeout
        self.retransmit = retransmit
        self.monotonic = monotonic
        self.sleep = sleep
        self.dropped = 0

    def _wait_for(self, xid: int, types: tuple[int, ...], resend: bytes,
                  deadline: float) -> codec.DHCPMessage:
        next_send = self.monotonic()
        while True:
            now = self.monotonic()
            if now >= deadline:
                raise DHCPError("no answer from a DHCP server")
            if now >= next_send:
                self.transport.send(resend)
                next_send = now + self.retransmit
            data = self.transport.receive(min(deadline, next_send) - now)
            if data is None:
                continue
            try:
                msg = codec.decode(data)
            except codec.MalformedPacket as e:
                self.dropped += 1
                log.debug("dropped a malformed DHCP packet: {reason}", reason=e.reason)
                continue
            if (msg.op != codec.BOOTREPLY or msg.xid != xid
                    or msg.mac != _mac_bytes(self.mac) or msg.message_type not in types):
                continue
            return msg

    def exchange(self) -> Lease:
        """One DHCP exchange; L{DHCPError} on timeout or NAK."""
        deadline = self.monotonic() + self.attempt_timeout
        xid = random.getrandbits(32)
        offer = self._wait_for(xid, (codec.DHCPOFFER,),
                               codec.encode(build_discover(self.mac, xid)), deadline)
        if offer.yiaddr == "0.0.0.0":
            raise DHCPError("the offer has no address")
        ack = self._wait_for(xid, (codec.DHCPACK, codec.DHCPNAK),
                             codec.encode(build_request(self.mac, xid, offer)), deadline)
        if ack.message_type == codec.DHCPNAK:
            raise DHCPError("the server refused the request (NAK)")
        return Lease.from_ack(ack)

    def obtain(self) -> Lease:
        """Exchanges until one succeeds or C{overall_timeout} passes."""
        deadline = self.monotonic() + self.overall_timeout
        while True:
            try:
                return self.exchange()
            except DHCPError as e:
                if self.monotonic() + self.retry_interval >= deadline:
                    raise DHCPError(f"no DHCP lease within {self.overall_timeout:g}s: {e}") from e
                log.info("DHCP failed ({error}); retrying in {interval}s", error=e,
                         interval=self.retry_interval)
                self.sleep(self.retry_interval)


# --- links and addresses (pyroute2, current network namespace) ----------------------------------

def find_interface(mac: str, timeout: float = 60.0, poll: float = 1.0,
                   monotonic: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[int, str]:
    """(index, name) of the interface whose MAC is C{mac}, polling until C{timeout}."""
    from pyroute2 import IPRoute

    wanted = mac.lower()
    deadline = monotonic() + timeout
    while True:
        with IPRoute() as ipr:
            for link in ipr.get_links():
                if (link.get_attr("IFLA_ADDRESS") or "").lower() == wanted:
                    return link["index"], link.get_attr("IFLA_IFNAME")
        if monotonic() + poll > deadline:
            raise InterfaceNotFound(f"no interface with MAC {mac} after {timeout:g}s")
        sleep(poll)


def link_up(index: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=index, state="up")


def apply_lease(index: int, lease: Lease, *, resolv_conf: str = "/etc/resolv.conf",
                set_hostname: Callable[[str], None] | None = None) -> list[str]:
    """Configure the NIC from the lease; return the problems met (logged, not fatal).

    Address (scope universe), MTU, routes (option 121 if present, else a default route via each
    router; protocol boot, table main), hostname, resolv.conf.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    problems: list[str] = []
    with IPRoute() as ipr:
        ipr.link("set", index=index, state="up")
        if lease.mtu:
            try:
                ipr.link("set", index=index, mtu=lease.mtu)
            except NetlinkError as e:
                problems.append(f"MTU {lease.mtu}: {e}")
        try:
            ipr.addr("add", index=index, address=lease.address, prefixlen=lease.prefixlen)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: already configured (a second run)
                raise
        routes = [(r.destination, r.gateway) for r in lease.classless_routes] or [
            ("0.0.0.0/0", router) for router in lease.routers]
        for destination, gateway in routes:
            spec: dict[str, object] = {"dst": destination, "oif": index, "proto": RTPROT_BOOT}
            if gateway != "0.0.0.0":
                spec["gateway"] = gateway
            else:
                spec["scope"] = 253  # link
            try:
                ipr.route("add", **spec)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST: the same route from an earlier run
                    problems.append(f"route {destination} via {gateway}: {e}")
    if lease.hostname and set_hostname is not None:
        try:
            set_hostname(lease.hostname)
        except OSError as e:
            problems.append(f"hostname {lease.hostname}: {e}")
    if lease.dns:
        try:
            with open(resolv_conf, "w") as f:
                f.writelines(f"nameserver {ip}\n" for ip in lease.dns)
        except OSError as e:
            problems.append(f"{resolv_conf}: {e}")
    for p in problems:
        log.warn("lease not fully applied: {problem}", problem=p)
    return problems


def configure(mac: str, *, resolv_conf: str = "/etc/resolv.conf",
              set_hostname: Callable[[str], None] | None = socket.sethostname,
              find_timeout: float = 60.0, dhcp: dict[str, float] | None = None) -> Lease:
    """Step 4 end to end: find the NIC, bring it up, DHCP, apply the lease."""
    index, name = find_interface(mac, timeout=find_timeout)
    log.info("boot interface {name} ({mac})", name=name, mac=mac)
    link_up(index)
    transport = DHCPSocket(name)
    try:
        lease = DHCPClient(mac, transport, **(dhcp or {})).obtain()  # type: ignore[arg-type]
    finally:
        transport.close()
    log.info("DHCP lease {address}/{prefix} from {server}", address=lease.address,
             prefix=lease.prefixlen, server=lease.server)
    apply_lease(index, lease, resolv_conf=resolv_conf, set_hostname=set_hostname)
    return lease


def is_pid1() -> bool:
    return os.getpid() == 1
