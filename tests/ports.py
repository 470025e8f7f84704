"""Ports for tests that must name one before something binds it (a child process, a peer's config).

Binding port 0 and reading it back is the right way wherever the test owns the socket; a port
for another process can only be chosen and handed over. The classic way (bind 0, close, pass
the number on) races: the kernel hands the same ephemeral port to the next outgoing connection
or bind-0 of any process (these tests make thousands, to the API server and between helpers),
and the child then fails to bind. So the ports here come from below the kernel's ephemeral
range, where the kernel never allocates on its own; each is checked bindable, and this process
never hands one out twice.
"""

from __future__ import annotations

import random
import socket

_handed_out: set[int] = set()
_LOWEST = 10_000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port of C{kind} (TCP or UDP) on C{host} that no socket holds now and that the kernel
    will not give to an ephemeral socket meanwhile."""
    high = max(_ephemeral_low(), _LOWEST + 1000)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(500):
        port = random.randrange(_LOWEST, high)
        if port in _handed_out:
            continue
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port of kind {kind} on {host} below {high}")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    return free_port(socket.SOCK_STREAM, host)


def free_udp_port(host: str = "127.0.0.1") -> int:
    return free_port(socket.SOCK_DGRAM, host)
