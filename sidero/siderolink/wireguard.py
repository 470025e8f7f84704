# -*- test-case-name: tests.siderolink.test_wireguard -*-
"""The SideroLink WireGuard interface (spec §3.8): kernel WireGuard or wireguard-go.

Two implementations of L{IWireGuardDevice}, chosen by C{--siderolink-wireguard}:

  - C{kernel}: a C{wireguard} link created and configured over netlink (pyroute2's IPRoute
    and its WireGuard generic-netlink family).  Needs the kernel module.
  - C{userspace}: the C{wireguard-go} program (Debian's wireguard-go package) run as a child
    process in the foreground; it creates a TUN interface and is configured over its UAPI
    socket (C{/var/run/wireguard/<name>.sock}, the protocol C{wg} speaks), the interface's
    address, MTU (1280, as the Go Sidero's userspace device) and state over netlink.
  - C{auto} (the default): kernel if creating a C{wireguard} link works, else userspace
    (the kernel answers EOPNOTSUPP when it has no WireGuard).

Nothing here blocks the reactor: netlink calls run in a one-thread pool (which also keeps
them in order), the UAPI is spoken over a non-blocking UNIX socket, the child is spawned with
C{spawnProcess}.  The interface is created afresh on start (a stale one left by a crashed
process is deleted first, which also ends a stale wireguard-go) and removed on stop; the
peers are the peer manager's business (L{sidero.siderolink.peers}).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from sidero.siderolink.config import key_from_hex, key_hex

#: Where wireguard-go (and wg) keep UAPI sockets; shared by every network namespace.
UAPI_DIR = "/var/run/wireguard"
#: MTU of the userspace interface (the Go Sidero's).
USERSPACE_MTU = 1280
#: IFA_F_NODAD: the tunnel address is usable at once (no duplicate detection on a tunnel).
IFA_F_NODAD = 0x02
#: Seconds wireguard-go gets to create its socket, and to exit on SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
#: Seconds one UAPI exchange may take.
UAPI_TIMEOUT = 5.0

MODES = ("auto", "kernel", "userspace")


class WireGuardError(Exception):
    """The device could not be created or configured; C{str()} says why in one line."""


class KernelUnsupported(WireGuardError):
    """The kernel has no WireGuard (creating the link answered EOPNOTSUPP)."""


class IWireGuardDevice(Interface):
    """One WireGuard interface carrying the SideroLink server address."""

    name = Attribute("The interface name.")
    backend = Attribute('"kernel" or "userspace".')

    def up(private_key: str, listen_port: int, address: ipaddress.IPv6Interface) -> Deferred[None]:
        """Create the interface (replacing a stale one), key it, give it the address, set it up."""

    def set_peer(public_key: str, allowed_ip: ipaddress.IPv6Network) -> Deferred[None]:
        """Add the peer or replace its allowed IPs with C{allowed_ip} (no endpoint, no keepalive)."""

    def remove_peer(public_key: str) -> Deferred[None]:
        """Remove the peer; a peer that is not there is not an error."""

    def peers() -> Deferred[dict[str, list[str]]]:
        """The configured peers: public key (base64) -> allowed IPs."""

    def down() -> Deferred[None]:
        """Remove the interface (and stop wireguard-go)."""

    def on_lost(callback: Callable[[str], None]) -> None:
        """Call C{callback(reason)} when the interface goes away without L{down}."""


class Runner(Protocol):
    """Runs a blocking call off the reactor (L{sidero.threads.ThreadPoolService.run})."""

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]: ...


# --- netlink (blocking; always called through a Runner) ------------------------------------------


class Netlink:
    """The few rtnetlink operations the device needs, over pyroute2 (blocking)."""

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def index(self, name: str) -> int | None:
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=name)
            return int(found[0]) if found else None

    def delete(self, name: str) -> bool:
        """Delete the link C{name} if it exists; whether it did."""
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return False
            ipr.link("del", index=found[0])
            return True

    def create_wireguard(self, name: str) -> None:
        """C{ip link add <name> type wireguard}.  @raise KernelUnsupported: no module."""
        from pyroute2.netlink.exceptions import NetlinkError

        with self._ipr() as ipr:
            try:
                ipr.link("add", ifname=name, kind="wireguard")
            except NetlinkError as e:
                if e.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
                    raise KernelUnsupported(f"the kernel has no WireGuard ({e})") from None
                raise WireGuardError(f"cannot create {name}: {e}") from None

    def configure(self, name: str, address: ipaddress.IPv6Interface, mtu: int | None) -> None:
        """Give C{name} its address (no DAD) and MTU, and set it up."""
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise WireGuardError(f"interface {name} disappeared")
            index = found[0]
            if mtu is not None:
                ipr.link("set", index=index, mtu=mtu)
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen,
                     flags=IFA_F_NODAD)
            ipr.link("set", index=index, state="up")

    def wireguard_set(self, name: str, **kwargs: Any) -> None:
        """pyroute2's WireGuard.set (kernel devices only)."""
        from pyroute2 import WireGuard

        with WireGuard() as wg:
            wg.set(name, **kwargs)

    def wireguard_peers(self, name: str) -> dict[str, list[str]]:
        from pyroute2 import WireGuard

        peers: dict[str, list[str]] = {}
        with WireGuard() as wg:
            for msg in wg.info(name):
                for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
                    key = peer.get_attr("WGPEER_A_PUBLIC_KEY")
                    if isinstance(key, bytes):
                        import base64

                        key = base64.b64encode(key).decode()
                    ips = []
                    for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []:
                        addr = ip.get_attr("WGALLOWEDIP_A_IPADDR")
                        cidr = ip.get_attr("WGALLOWEDIP_A_CIDR_MASK")
                        ips.append(f"{addr}/{cidr}")
                    peers[str(key)] = ips
        return peers


# --- the UAPI protocol (pure) --------------------------------------------------------------------


def uapi_set(*, private_key: str | None = None, listen_port: int | None = None,
             replace_peers: bool = False, peers: list[list[tuple[str, str]]] | None = None) -> bytes:
    """A C{set=1} request: device settings, then one block of lines per peer."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={key_hex(private_key)}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    for peer in peers or []:
        lines.extend(f"{k}={v}" for k, v in peer)
    return ("\n".join(lines) + "\n\n").encode()


def uapi_peer(public_key: str, allowed_ip: ipaddress.IPv6Network) -> list[tuple[str, str]]:
    """Add or update a peer, its allowed IPs replaced by C{allowed_ip}."""
    return [("public_key", key_hex(public_key)), ("replace_allowed_ips", "true"),
            ("allowed_ip", allowed_ip.with_prefixlen)]


def uapi_remove(public_key: str) -> list[tuple[str, str]]:
    return [("public_key", key_hex(public_key)), ("remove", "true")]


UAPI_GET = b"get=1\n\n"


def parse_uapi(data: bytes) -> list[tuple[str, str]]:
    """The C{key=value} lines of one response (up to its blank line), C{errno} checked.

    @raise WireGuardError: C{errno} is not 0, or the response is not C{key=value} lines.
    """
    pairs: list[tuple[str, str]] = []
    for line in data.decode("utf-8", "replace").split("\n"):
        if not line:
            break
        key, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(f"unreadable UAPI response line {line!r}")
        pairs.append((key, value))
    codes = [v for k, v in pairs if k == "errno"]
    if not codes:
        raise WireGuardError("UAPI response without errno")
    if codes[-1] != "0":
        raise WireGuardError(f"UAPI request failed: errno={codes[-1]}")
    return [(k, v) for k, v in pairs if k != "errno"]


def peers_from_uapi(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Public key (base64) -> allowed IPs, from a C{get=1} response."""
    peers: dict[str, list[str]] = {}
    current: list[str] | None = None
    for key, value in pairs:
        if key == "public_key":
            current = peers.setdefault(key_from_hex(value), [])
        elif key == "allowed_ip" and current is not None:
            current.append(value)
    return peers


class _UAPIClient(TwistedProtocol):
    """One request, one response (ended by a blank line), then the connection closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n\n" in self.buffer and not self.done.called:
            self.done.callback(self.buffer[: self.buffer.index(b"\n\n") + 2])
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.done.errback(WireGuardError(f"UAPI connection closed: {why}"))


async def uapi_call(reactor: Any, path: str, request: bytes,
                    timeout: float = UAPI_TIMEOUT) -> list[tuple[str, str]]:
    """Send one UAPI request to the socket at C{path}; its checked C{key=value} pairs."""
    client = _UAPIClient(request)
    endpoint = UNIXClientEndpoint(reactor, path, timeout=timeout)
    try:
        await connectProtocol(endpoint, client)
    except Exception as e:
        raise WireGuardError(f"cannot reach {path}: {e}") from e
    def expire() -> None:
        if not client.done.called:
            client.done.errback(WireGuardError(f"no UAPI answer from {path} within {timeout:g}s"))

    timer = reactor.callLater(timeout, expire)
    try:
        data = await client.done
    finally:
        if timer.active():
            timer.cancel()
        if client.transport is not None:
            client.transport.loseConnection()
    return parse_uapi(data)


# --- devices -------------------------------------------------------------------------------------


class _Lost:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[str], None]] = []

    def add(self, callback: Callable[[str], None]) -> None:
        self.callbacks.append(callback)

    def fire(self, reason: str) -> None:
        for cb in list(self.callbacks):
            cb(reason)


@implementer(IWireGuardDevice)
class KernelDevice:
    """Kernel WireGuard over netlink; every call in the (one-thread) C{runner}."""

    backend = "kernel"
    log = Logger()

    def __init__(self, name: str, runner: Runner, netlink: Netlink | None = None) -> None:
        self.name = name
        self.runner = runner
        self.netlink = netlink or Netlink()
        self._lost = _Lost()
        self._created = False

    def _run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self.runner.run(f, *args, **kwargs)

    async def create(self) -> None:
        """Replace any stale link and create ours.  @raise KernelUnsupported: no module."""
        if await self._run(self.netlink.delete, self.name):
            self.log.info("removed the stale interface {name}", name=self.name)
        await self._run(self.netlink.create_wireguard, self.name)
        self._created = True

    def up(self, private_key: str, listen_port: int,
           address: ipaddress.IPv6Interface) -> Deferred[None]:
        async def run() -> None:
            if not self._created:
                await self.create()
            await self._run(self.netlink.wireguard_set, self.name, private_key=private_key,
                            listen_port=listen_port)
            await self._run(self.netlink.configure, self.name, address, None)
        return Deferred.fromCoroutine(run())

    def set_peer(self, public_key: str, allowed_ip: ipaddress.IPv6Network) -> Deferred[None]:
        peer = {"public_key": public_key, "allowed_ips": [allowed_ip.with_prefixlen],
                "replace_allowed_ips": True}
        d: Deferred[None] = self._run(self.netlink.wireguard_set, self.name, peer=peer)
        return d

    def remove_peer(self, public_key: str) -> Deferred[None]:
        d: Deferred[None] = self._run(self.netlink.wireguard_set, self.name,
                                      peer={"public_key": public_key, "remove": True})
        return d

    def peers(self) -> Deferred[dict[str, list[str]]]:
        d: Deferred[dict[str, list[str]]] = self._run(self.netlink.wireguard_peers, self.name)
        return d

    def down(self) -> Deferred[None]:
        self._created = False
        return self._run(self.netlink.delete, self.name).addCallback(lambda _: None)

    def on_lost(self, callback: Callable[[str], None]) -> None:
        self._lost.add(callback)


class _WireGuardGo(ProcessProtocol):
    """wireguard-go's output goes to our log; its exit is reported."""

    log = Logger()

    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: Deferred[str] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace").strip()
            if text and not text.startswith(("┌", "│", "└")):  # the kernel-module banner
                self.log.debug("{interface}: {line}", interface=self.name, line=text)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.getErrorMessage())


@implementer(IWireGuardDevice)
class UserspaceDevice:
    """C{wireguard-go -f <name>} as a child process, configured over its UAPI socket.

    @param binary: the wireguard-go program (looked up on C{PATH} by the caller).
    @param uapi_dir: where its UAPI socket appears (tests never change it: wireguard-go's
        directory is fixed, so interface names must be unique across namespaces).
    """

    backend = "userspace"
    log = Logger()

    def __init__(self, reactor: Any, name: str, runner: Runner, binary: str,
                 netlink: Netlink | None = None, uapi_dir: str = UAPI_DIR,
                 mtu: int = USERSPACE_MTU) -> None:
        self.reactor = reactor
        self.name = name
        self.runner = runner
        self.binary = binary
        self.netlink = netlink or Netlink()
        self.uapi_dir = uapi_dir
        self.mtu = mtu
        self._process: Any = None
        self._protocol: _WireGuardGo | None = None
        self._lost = _Lost()
        self._stopping = False

    @property
    def socket_path(self) -> str:
        return os.path.join(self.uapi_dir, f"{self.name}.sock")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _uapi(self, request: bytes) -> Deferred[list[tuple[str, str]]]:
        return Deferred.fromCoroutine(uapi_call(self.reactor, self.socket_path, request))

    def up(self, private_key: str, listen_port: int,
           address: ipaddress.IPv6Interface) -> Deferred[None]:
        return Deferred.fromCoroutine(self._up(private_key, listen_port, address))

    async def _up(self, private_key: str, listen_port: int,
                  address: ipaddress.IPv6Interface) -> None:
        self._stopping = False
        if await self.runner.run(self.netlink.delete, self.name):
            self.log.info("removed the stale interface {name}", name=self.name)
        await self._clear_socket()
        protocol = _WireGuardGo(self.name)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "WG_PROCESS_FOREGROUND": "1",
               # Newer wireguard-go refuses to run beside a kernel module without this.
               "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        try:
            self._process = self.reactor.spawnProcess(
                protocol, self.binary, [self.binary, "-f", self.name], env=env)
        except OSError as e:
            raise WireGuardError(f"cannot run {self.binary}: {e}") from e
        self._protocol = protocol
        protocol.ended.addCallback(self._ended, protocol)
        deadline = self.reactor.seconds() + START_TIMEOUT
        while True:
            if protocol.ended.called:
                raise WireGuardError(f"{self.binary} exited at start (is /dev/net/tun there,"
                                     " and are we root or CAP_NET_ADMIN?)")
            if os.path.exists(self.socket_path):
                try:
                    await uapi_call(self.reactor, self.socket_path, UAPI_GET)
                    break
                except WireGuardError:
                    pass
            if self.reactor.seconds() >= deadline:
                await self.down()
                raise WireGuardError(f"{self.binary} did not open {self.socket_path} within "
                                     f"{START_TIMEOUT:g}s")
            await deferLater(self.reactor, 0.05, lambda: None)
        await self._uapi(uapi_set(private_key=private_key, listen_port=listen_port,
                                  replace_peers=True))
        await self.runner.run(self.netlink.configure, self.name, address, self.mtu)

    async def _clear_socket(self) -> None:
        """Remove a stale UAPI socket; refuse one that still answers after a grace period.

        A wireguard-go whose interface was just deleted exits and removes its socket; one that
        keeps answering runs in another network namespace under the same name (the socket
        directory is shared by all of them), and must not be clobbered.
        """
        deadline = self.reactor.seconds() + 2.0
        while os.path.exists(self.socket_path):
            try:
                await uapi_call(self.reactor, self.socket_path, UAPI_GET, timeout=1.0)
            except WireGuardError:
                await self.runner.run(_unlink, self.socket_path)
                return
            if self.reactor.seconds() >= deadline:
                raise WireGuardError(
                    f"another wireguard-go answers on {self.socket_path}: the interface name"
                    f" {self.name} is in use (choose another with --siderolink-interface)")
            await deferLater(self.reactor, 0.1, lambda: None)

    def _ended(self, reason: str, protocol: _WireGuardGo) -> None:
        if protocol is not self._protocol:
            return
        self._process = None
        self._protocol = None
        if not self._stopping:
            self.log.error("wireguard-go for {name} exited: {reason}", name=self.name, reason=reason)
            self._lost.fire(f"wireguard-go exited: {reason}")

    def set_peer(self, public_key: str, allowed_ip: ipaddress.IPv6Network) -> Deferred[None]:
        return self._uapi(uapi_set(peers=[uapi_peer(public_key, allowed_ip)])).addCallback(
            lambda _: None)

    def remove_peer(self, public_key: str) -> Deferred[None]:
        return self._uapi(uapi_set(peers=[uapi_remove(public_key)])).addCallback(lambda _: None)

    def peers(self) -> Deferred[dict[str, list[str]]]:
        return self._uapi(UAPI_GET).addCallback(peers_from_uapi)

    def down(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._down())

    async def _down(self) -> None:
        self._stopping = True
        protocol, process = self._protocol, self._process
        if process is not None and protocol is not None:
            try:
                process.signalProcess(signal.SIGTERM)
            except ierror.ProcessExitedAlready:
                pass
            deadline = self.reactor.seconds() + STOP_TIMEOUT
            while not protocol.ended.called and self.reactor.seconds() < deadline:
                await deferLater(self.reactor, 0.05, lambda: None)
            if not protocol.ended.called:
                try:
                    process.signalProcess(signal.SIGKILL)
                except ierror.ProcessExitedAlready:
                    pass
        self._process = self._protocol = None
        # wireguard-go removes its interface on exit; make sure of it.
        await self.runner.run(self.netlink.delete, self.name)

    def on_lost(self, callback: Callable[[str], None]) -> None:
        self._lost.add(callback)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def find_wireguard_go(path: str | None = None) -> str | None:
    """The wireguard-go program on C{PATH}, or None."""
    import shutil

    return shutil.which("wireguard-go", path=path)


async def open_device(
    reactor: Any, mode: str, name: str, runner: Runner, *,
    netlink: Netlink | None = None,
    wireguard_go: Callable[[], str | None] = find_wireguard_go,
) -> IWireGuardDevice:
    """The device for C{mode} (auto, kernel, userspace), created but not yet L{up}.

    For C{auto} and C{kernel} the kernel link is created here (that is how the kernel is
    asked whether it has WireGuard); C{auto} falls back to wireguard-go when it has not.

    @raise WireGuardError: the chosen implementation cannot work here (its reason).
    """
    if mode not in MODES:
        raise ValueError(f"unknown WireGuard mode {mode!r}")
    netlink = netlink or Netlink()
    log = Logger(namespace=__name__)
    if mode in ("auto", "kernel"):
        kernel = KernelDevice(name, runner, netlink)
        try:
            await kernel.create()
            log.info("SideroLink uses kernel WireGuard on {name}", name=name)
            return kernel
        except KernelUnsupported as e:
            if mode == "kernel":
                raise
            log.info("SideroLink: {reason}; using wireguard-go", reason=str(e))
    binary = wireguard_go()
    if binary is None:
        raise WireGuardError("no kernel WireGuard and wireguard-go is not installed"
                             " (apt-get install wireguard-go)")
    log.info("SideroLink uses wireguard-go ({binary}) on {name}", binary=binary, name=name)
    return UserspaceDevice(reactor, name, runner, binary, netlink)
