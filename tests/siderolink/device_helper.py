"""Drive one real WireGuard device of L{sidero.siderolink.wireguard} from stdin (run inside a
network namespace by L{tests.siderolink.test_wireguard}: the device and wireguard-go live in
the namespace of the process that creates them).

Commands, one per line; each answers one JSON line on stdout:
  open <mode> <name>            -> {"backend": ...} or {"error": ...}
  up <private key> <port> <address/64>
  set <public key> <ip/128>     remove <public key>     peers     down     pid     quit
"""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any

from twisted.internet import reactor, stdio
from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver

from sidero.siderolink.wireguard import IWireGuardDevice, UserspaceDevice, open_device
from sidero.threads import ThreadPoolService


class Driver(LineReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.pool = ThreadPoolService(reactor, "helper", max_threads=1)
        self.pool.startService()
        self.device: IWireGuardDevice | None = None

    def lineReceived(self, line: bytes) -> None:
        Deferred.fromCoroutine(self.run(line.decode().split())).addBoth(self.answer)

    def answer(self, result: Any) -> None:
        if hasattr(result, "getErrorMessage"):
            result = {"error": result.getErrorMessage()}
        self.sendLine(json.dumps(result).encode())

    async def run(self, argv: list[str]) -> Any:
        cmd, args = argv[0], argv[1:]
        if cmd == "open":
            self.device = await open_device(reactor, args[0], args[1], self.pool)
            return {"backend": self.device.backend}
        assert self.device is not None
        if cmd == "up":
            await self.device.up(args[0], int(args[1]), ipaddress.IPv6Interface(args[2]))
            return {"ok": True}
        if cmd == "set":
            await self.device.set_peer(args[0], ipaddress.IPv6Network(args[1]))
            return {"ok": True}
        if cmd == "remove":
            await self.device.remove_peer(args[0])
            return {"ok": True}
        if cmd == "peers":
            return await self.device.peers()
        if cmd == "pid":
            return {"pid": self.device.pid if isinstance(self.device, UserspaceDevice) else None}
        if cmd == "down":
            await self.device.down()
            return {"ok": True}
        if cmd == "quit":
            reactor.callLater(0, reactor.stop)  # type: ignore[attr-defined]
            return {"ok": True}
        return {"error": f"unknown command {cmd}"}


if __name__ == "__main__":
    stdio.StandardIO(Driver())
    reactor.run()  # type: ignore[attr-defined]
    sys.exit(0)
