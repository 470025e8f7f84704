# -*- test-case-name: tests.agent.test_client -*-
"""The agent's side of the Agent gRPC API (spec §3.7, §4 steps 5-10).

Plaintext HTTP/2 (h2c) to C{sidero.endpoint}.  Every call except the heartbeat is retried on
any error but RESOURCE_EXHAUSTED (a request past the server's 4 MiB limit, which no retry
can fix): one attempt per C{retry_interval} (30 s), each bounded by C{call_timeout} (30 s),
until C{retry_timeout} (5 min) has passed; then the last error is raised.  Sleeping and the
clock are injectable so unit tests never wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc
from twisted.logger import Logger

from sidero.proto import agent_pb2 as pb
from sidero.proto import agent_pb2_grpc as pb_grpc

log = Logger()

T = TypeVar("T")

RETRY_INTERVAL = 30.0
RETRY_TIMEOUT = 300.0
CALL_TIMEOUT = 30.0
ADDRESS_TYPE = "InternalIP"


class AgentStub(Protocol):
    """The generated stub's methods the client uses (a fake in unit tests)."""

    CreateServer: Callable[..., pb.CreateServerResponse]
    MarkServerAsWiped: Callable[..., pb.MarkServerAsWipedResponse]
    ReconcileServerAddresses: Callable[..., pb.ReconcileServerAddressesResponse]
    Heartbeat: Callable[..., pb.HeartbeatResponse]
    UpdateBMCInfo: Callable[..., pb.UpdateBMCInfoResponse]


class RetriesExhausted(Exception):
    """A call kept failing for the whole retry window; the message names the call and error."""


class RequestTooLarge(RetriesExhausted):
    """The server refused the request's size (RESOURCE_EXHAUSTED: its 4 MiB message limit).

    Sending the same bytes again cannot succeed, so this is raised after the first attempt;
    it is a L{RetriesExhausted}, so the agent handles it as any call that cannot get through.
    """


def _too_large(error: BaseException) -> bool:
    return (isinstance(error, grpc.RpcError) and hasattr(error, "code")
            and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)


def describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return f"{code.name if code else 'error'}: {details}"
    return str(error) or type(error).__name__


def retry(
    name: str, call: Callable[[], T], *, interval: float = RETRY_INTERVAL,
    timeout: float = RETRY_TIMEOUT, sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> T:
    """Call until it succeeds; wait C{interval} after each failure; give up after C{timeout}."""
    deadline = monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as e:
            error = describe(e)
            if _too_large(e):
                raise RequestTooLarge(f"{name} refused by the server as too large: {error}") from e
            if monotonic() + interval > deadline:
                raise RetriesExhausted(f"{name} failed after {attempt} attempts: {error}") from e
            log.info("{name} failed (attempt {attempt}): {error}; retrying in {interval}s",
                     name=name, attempt=attempt, error=error, interval=interval)
            sleep(interval)


class AgentClient:
    """The five RPCs with the agent's retry rules.

    @param stub: the generated C{AgentStub} (or a fake); L{connect} builds a real one.
    """

    def __init__(
        self, stub: AgentStub, *, retry_interval: float = RETRY_INTERVAL,
        retry_timeout: float = RETRY_TIMEOUT, call_timeout: float = CALL_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.stub = stub
        self.retry_interval = retry_interval
        self.retry_timeout = retry_timeout
        self.call_timeout = call_timeout
        self.sleep = sleep
        self.monotonic = monotonic
        self.channel = channel

    @classmethod
    def connect(cls, endpoint: str, **kwargs: Any) -> AgentClient:
        """An insecure (plaintext HTTP/2) channel to C{host:port}; connects lazily.

        gRPC's own reconnect backoff (growing to 120 s, during which calls fail at once with
        the last connection error) is capped at the retry interval: a sidero that was down and
        came back (a restart, a crash) is reached at the next attempt, not minutes later.
        """
        backoff_ms = max(100, int(float(kwargs.get("retry_interval", RETRY_INTERVAL)) * 1000))
        channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ])
        return cls(pb_grpc.AgentStub(channel), channel=channel, **kwargs)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()

    def _retry(self, name: str, call: Callable[[], T]) -> T:
        return retry(name, call, interval=self.retry_interval, timeout=self.retry_timeout,
                     sleep=self.sleep, monotonic=self.monotonic)

    def create_server(self, hardware: pb.HardwareInformation,
                      hostname: str) -> pb.CreateServerResponse:
        request = pb.CreateServerRequest(hardware=hardware, hostname=hostname)
        return self._retry("CreateServer", lambda: self.stub.CreateServer(
            request, timeout=self.call_timeout))

    def reconcile_addresses(self, uuid: str, addresses: list[str]) -> None:
        request = pb.ReconcileServerAddressesRequest(
            uuid=uuid, address=[pb.Address(type=ADDRESS_TYPE, address=a) for a in addresses])
        self._retry("ReconcileServerAddresses", lambda: self.stub.ReconcileServerAddresses(
            request, timeout=self.call_timeout))

    def mark_wiped(self, uuid: str) -> None:
        request = pb.MarkServerAsWipedRequest(uuid=uuid)
        self._retry("MarkServerAsWiped", lambda: self.stub.MarkServerAsWiped(
            request, timeout=self.call_timeout))

    def update_bmc_info(self, uuid: str, info: pb.BMCInfo) -> None:
        request = pb.UpdateBMCInfoRequest(uuid=uuid, bmc_info=info)
        self._retry("UpdateBMCInfo", lambda: self.stub.UpdateBMCInfo(
            request, timeout=self.call_timeout))

    def heartbeat(self, uuid: str, timeout: float) -> None:
        """One heartbeat, no retry (the next one comes soon enough)."""
        self.stub.Heartbeat(pb.HeartbeatRequest(uuid=uuid), timeout=timeout)


class Heartbeat:
    """Sends a heartbeat at once and then every C{interval} until L{stop} (errors logged).

    The server needs them more often than its reboot timeout, hence C{interval} =
    C{reboot_timeout / 3}; each call may take at most one interval.
    """

    def __init__(self, client: AgentClient, uuid: str, interval: float) -> None:
        self.client = client
        self.uuid = uuid
        self.interval = max(interval, 0.1)
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.heartbeat(self.uuid, self.interval)
                self.sent += 1
            except Exception as e:
                self.failed += 1
                log.warn("heartbeat failed: {error}", error=describe(e))
            if self._stop.wait(self.interval):
                break

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)
