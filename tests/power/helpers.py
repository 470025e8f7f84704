"""Small fakes shared by the power tests: a Secret store, a recording IPMI session, a pool."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from sidero.api import registry
from sidero.power.interfaces import BMCCommandError
from sidero.store import errors


def secret(namespace: str, name: str, **values: str) -> dict[str, Any]:
    """A core/v1 Secret as Kubernetes serialises it (data base64-encoded)."""
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    }


class SecretStore:
    """Just enough IResourceStore for credential resolution; records every get."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}
        self.gets: list[tuple[str, str, str | None]] = []
        self.error: Exception | None = None

    def get(self, kind: registry.ResourceType, name: str, namespace: str | None = None) -> Deferred[Any]:
        self.gets.append((kind.kind, name, namespace))
        if self.error is not None:
            return fail(self.error)
        obj = self.objects.get((namespace or "", name))
        if kind is not registry.SECRET or obj is None:
            return fail(errors.not_found(kind.resource, name))
        return succeed(obj)


class RecordingSession:
    """An IPMISession that records raw requests and answers from a script.

    C{answers} maps (netfn, cmd, first data byte or None) to response bytes or to a completion
    code (int) that raises L{BMCCommandError}.
    """

    def __init__(self, answers: dict[tuple[int, int, int | None], bytes | int] | None = None) -> None:
        self.answers = answers or {}
        self.requests: list[tuple[int, int, tuple[int, ...]]] = []
        self.closed = False

    def raw(self, netfn: int, command: int, data: Sequence[int] = ()) -> bytes:
        data = tuple(data)
        self.requests.append((netfn, command, data))
        key = (netfn, command, data[0] if data else None)
        answer = self.answers.get(key, self.answers.get((netfn, command, None), b""))
        if isinstance(answer, int):
            raise BMCCommandError(f"completion code 0x{answer:02x}", answer)
        return answer

    def close(self) -> None:
        self.closed = True


class ManualPool:
    """A runner whose calls run only when the test says so, to observe overlap and hangs.

    C{run(f)} returns a Deferred; C{pending} holds (f, deferred) pairs not yet run;
    C{complete(i)} runs the i-th pending call inline and fires its Deferred.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.started = 0

    def run(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.started += 1
        self.pending.append((f, d))
        return d

    def complete(self, index: int = 0) -> None:
        f, d = self.pending.pop(index)
        try:
            result = f()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


def inline_run(f: Callable[[], Any]) -> Deferred[Any]:
    """A runner that runs the call at once (a pool of one, without threads)."""
    try:
        return succeed(f())
    except Exception as e:
        return fail(e)
