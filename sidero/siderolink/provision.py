# -*- test-case-name: tests.siderolink.test_provision -*-
"""SideroLink provisioning (spec §3.8): C{/sidero.link.ProvisionService/Provision}.

A Talos node that boots with C{siderolink.api=} (or a SideroLinkConfig document) calls this on
the API port with its UUID and a fresh WireGuard public key.  The answer is the tunnel address
kept in its ServerBinding (C{spec.siderolink.address}, made once and then reused, so the node
keeps it across reboots and when this implementation replaces the Go one), plus the server's
key, WireGuard endpoint and tunnel address.  The peer itself is added to the WireGuard device
from the binding (L{sidero.siderolink.peers}), not here.

Like the agent API, this awaits the store: the binding must be read and written back without
losing a concurrent change (a node address handed out twice would put two nodes on one
address), so it is a read-modify-write with the resourceVersion as precondition, retried from
a fresh read on conflict.  A cached read could answer an address the store no longer holds.

Two layers, as in L{sidero.protocols.grpc.server}: L{ProvisionAPI} (a coroutine on the reactor
thread, tested without threads) and L{ProvisionServicer} (grpcio's worker threads hand each
call to the reactor, with deadlines on both sides).
"""

from __future__ import annotations

import copy
import ipaddress
import os
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
from twisted.logger import Logger

from sidero.api.registry import SERVER_BINDING
from sidero.proto import provision_pb2 as pb
from sidero.proto import provision_pb2_grpc as pb_grpc
from sidero.protocols.grpc.server import ReactorUnavailable, call_on_reactor, call_timeout
from sidero.siderolink.config import InvalidKey, SideroLinkConfig, parse_key
from sidero.store.errors import BadRequest, Conflict, NotFound, StoreError
from sidero.store.interfaces import IResourceStore, Object
from sidero.threads import CallTimeout

T = TypeVar("T")

#: Writes retried on a resourceVersion conflict before giving up.
_CONFLICT_RETRIES = 5


class ProvisionError(Exception):
    """An answer other than OK, with the gRPC status code Go's server gives it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LinkState(Protocol):
    """What Provision needs of the SideroLink service (L{sidero.siderolink.service})."""

    @property
    def identity(self) -> SideroLinkConfig | None: ...

    @property
    def public_endpoint(self) -> str | None: ...

    @property
    def unavailable(self) -> str | None:
        """Why nodes cannot be provisioned now (starting, or the tunnel failed), or None."""


def format_endpoint(host: str, port: int) -> str:
    """C{<ip>:<port>}, an IPv6 address bracketed (Go's C{netip.AddrPort} spelling)."""
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def node_address_of(binding: Object) -> ipaddress.IPv6Interface | ipaddress.IPv4Interface | None:
    """The binding's stored tunnel address (with prefix), or None when it has none yet.

    @raise ValueError: the stored value is not an address with a prefix length.
    """
    text = str(((binding.get("spec") or {}).get("siderolink") or {}).get("address") or "")
    if not text:
        return None
    if "/" not in text:
        raise ValueError(f"netip.ParsePrefix({text!r}): no '/'")
    return ipaddress.ip_interface(text)


class ProvisionAPI:
    """Provision on the reactor thread, over the store.

    @param random_bytes: the salt source of new node addresses (tests pass a fixed one).
    @ivar timeline: where each answered Provision is recorded (C{siderolink-provision}).
    """

    log = Logger()

    def __init__(
        self, store: IResourceStore, link: LinkState,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.store = store
        self.link = link
        self.random_bytes = random_bytes
        self.timeline: Any = None

    async def provision(self, request: pb.ProvisionRequest) -> pb.ProvisionResponse:
        reason = self.link.unavailable
        identity, endpoint = self.link.identity, self.link.public_endpoint
        if reason is not None or identity is None or endpoint is None:
            raise ProvisionError(grpc.StatusCode.UNAVAILABLE,
                                 f"SideroLink is not available: {reason or 'starting'}")
        uuid = request.node_uuid
        if not uuid:
            raise BadRequest("resource name may not be empty")
        for attempt in range(_CONFLICT_RETRIES):
            try:
                binding = await self.store.get(SERVER_BINDING, uuid)
            except NotFound:
                raise ProvisionError(grpc.StatusCode.NOT_FOUND,
                                     f'server binding "{uuid}" not found') from None
            edited = copy.deepcopy(binding)
            link = edited.setdefault("spec", {}).setdefault("siderolink", {})
            address = node_address_of(binding)
            if address is None:
                address = identity.new_node_address(self.random_bytes)
                link["address"] = address.with_prefixlen
            try:
                key = parse_key(request.node_public_key)
            except InvalidKey as e:
                raise ProvisionError(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"error parsing Wireguard key: {e}") from None
            link["publicKey"] = key
            if edited != binding:
                try:
                    await self.store.update(edited)
                except Conflict:
                    if attempt == _CONFLICT_RETRIES - 1:
                        raise
                    self.log.debug("ServerBinding {uuid} changed under us; retrying", uuid=uuid)
                    continue
            self.log.info("SideroLink: node {uuid} provisioned at {address}", uuid=uuid,
                          address=address.with_prefixlen)
            if self.timeline is not None:
                self.timeline.record("siderolink-provision", source="siderolink", uuid=uuid,
                                     address=address.with_prefixlen, endpoint=endpoint)
            return pb.ProvisionResponse(
                server_endpoint=[endpoint],
                server_public_key=identity.public_key,
                server_address=str(identity.server_address),
                node_address_prefix=address.with_prefixlen,
            )
        raise AssertionError("not reached")


class ProvisionServicer(pb_grpc.ProvisionServiceServicer):
    """grpcio servicer of C{sidero.link.ProvisionService}, on the API port's gRPC server.

    Errors are Go's: the codes above, C{UNKNOWN} with the Kubernetes text for store failures,
    C{INTERNAL} for a bug (Go's recovery interceptor turns a panic into INTERNAL).
    """

    log = Logger()

    def __init__(self, reactor: Any, api: ProvisionAPI, call_timeout: float = 30.0) -> None:
        self.reactor = reactor
        self.api = api
        self.call_timeout = call_timeout

    def _call(self, context: grpc.ServicerContext,
              f: Callable[[], Coroutine[Any, Any, T]]) -> T:
        timeout = call_timeout(context, self.call_timeout)
        code: grpc.StatusCode
        try:
            return call_on_reactor(self.reactor, f, timeout)
        except ProvisionError as e:
            code, detail = e.code, e.message
        except StoreError as e:
            code, detail = grpc.StatusCode.UNKNOWN, e.message
        except ValueError as e:  # an unreadable stored address
            code, detail = grpc.StatusCode.UNKNOWN, str(e)
        except CallTimeout:
            code, detail = grpc.StatusCode.DEADLINE_EXCEEDED, f"Provision took longer than {timeout:g}s"
        except ReactorUnavailable as e:
            code, detail = grpc.StatusCode.UNAVAILABLE, str(e)
        except Exception as e:
            self.log.failure("SideroLink Provision failed")
            code, detail = grpc.StatusCode.INTERNAL, str(e) or type(e).__name__
        self.log.info("SideroLink Provision failed: {code} {detail}", code=code.name, detail=detail)
        context.abort(code, detail)
        raise AssertionError("not reached")  # abort() raises

    def Provision(self, request: pb.ProvisionRequest,
                  context: grpc.ServicerContext) -> pb.ProvisionResponse:
        return self._call(context, lambda: self.api.provision(request))


def add_to_server(servicer: ProvisionServicer, server: grpc.Server) -> None:
    """Register C{servicer} on a (not yet started) grpcio server."""
    pb_grpc.add_ProvisionServiceServicer_to_server(servicer, server)
