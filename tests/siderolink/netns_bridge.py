"""Reach the test's kube-apiserver (on the host's loopback) from inside a namespace.

Run in the namespace: listens on 127.0.0.1:<port> there and forwards each connection to a
UNIX socket, which the test (on the host) forwards to the API server.  The same kubeconfig
(https://127.0.0.1:<port>, a certificate for 127.0.0.1) then works on both sides.

  python netns_bridge.py <port> <unix socket path>
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.protocols import portforward


class ToUnix(portforward.ProxyServer):
    path = ""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        client = portforward.ProxyClientFactory()
        client.setServer(self)
        reactor.connectUNIX(self.path, client)  # type: ignore[attr-defined]


def main(port: int, path: str) -> None:
    ToUnix.path = path
    factory = portforward.ProxyFactory("", 0)
    factory.protocol = ToUnix
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    print("listening", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
