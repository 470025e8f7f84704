"""Pure parts of the Kubernetes backend: REST paths, Status decoding, error wording, the
watch stream's framing.  No server needed."""

from __future__ import annotations

import json
from typing import Any

import urllib3
from twisted.trial.unittest import SynchronousTestCase

from sidero.api import registry
from sidero.k8s.client import resource_path
from sidero.k8s.errors import from_response, unreachable
from sidero.k8s.store import _lines
from sidero.store import errors


class ResourcePathTests(SynchronousTestCase):
    """REST paths from the registry's kinds."""

    def test_custom_cluster_scoped(self) -> None:
        """A cluster-scoped CRD ignores the namespace; the status subresource is a suffix."""
        self.assertEqual(resource_path(registry.SERVER, "default", "s-1", "status"),
                         "/apis/metal.sidero.dev/v1alpha2/servers/s-1/status")
        self.assertEqual(resource_path(registry.SERVER), "/apis/metal.sidero.dev/v1alpha2/servers")

    def test_core_namespaced(self) -> None:
        """A core kind lives under /api/v1; no namespace means every namespace."""
        self.assertEqual(resource_path(registry.SECRET, "kube-public", "a"),
                         "/api/v1/namespaces/kube-public/secrets/a")
        self.assertEqual(resource_path(registry.SECRET), "/api/v1/secrets")
        self.assertEqual(resource_path(registry.LEASE, "x"),
                         "/apis/coordination.k8s.io/v1/namespaces/x/leases")

    def test_name_is_quoted(self) -> None:
        """A name cannot escape its path segment."""
        self.assertEqual(resource_path(registry.SERVER, None, "../x"),
                         "/apis/metal.sidero.dev/v1alpha2/servers/..%2Fx")


def status(reason: str, code: int, message: str) -> bytes:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "reason": reason, "code": code, "message": message}).encode()


class FromResponseTests(SynchronousTestCase):
    """The API server's Status becomes the store error of the same reason and message."""

    def test_status_reasons(self) -> None:
        """NotFound, Conflict, Invalid and AlreadyExists keep the server's message."""
        cases: list[tuple[str, int, type[errors.StoreError]]] = [
            ("NotFound", 404, errors.NotFound), ("Conflict", 409, errors.Conflict),
            ("AlreadyExists", 409, errors.AlreadyExists), ("Invalid", 422, errors.Invalid),
            ("BadRequest", 400, errors.BadRequest),
        ]
        for reason, code, cls in cases:
            err = from_response(code, status(reason, code, f"m {reason}"))
            self.assertIsInstance(err, cls)
            self.assertEqual(err.message, f"m {reason}")

    def test_expired_and_gone_are_gone(self) -> None:
        """A 410 is Gone whether the reason says Expired or Gone."""
        self.assertIsInstance(from_response(410, status("Expired", 410, "too old")), errors.Gone)
        self.assertIsInstance(from_response(410, status("Gone", 410, "too old")), errors.Gone)

    def test_non_status_body_maps_by_code(self) -> None:
        """A body that is not a Status (a proxy's HTML) still gives the class of its code."""
        err = from_response(503, b"<html>bad gateway</html>", "GET /x")
        self.assertIsInstance(err, errors.Unavailable)
        self.assertEqual(err.message, "GET /x: <html>bad gateway</html>")
        odd = from_response(418, b"", "GET /y")
        self.assertEqual((type(odd), odd.code), (errors.StoreError, 418))

    def test_unreachable_names_root_cause(self) -> None:
        """A refused connection reads as one sentence with the server and the reason."""
        cause = urllib3.exceptions.NewConnectionError(
            urllib3.connection.HTTPSConnection("127.0.0.1", 6443), "Failed to establish a new connection: [Errno 111] Connection refused")
        wrapped = urllib3.exceptions.MaxRetryError(None, "/version", cause)  # type: ignore[arg-type]
        err = unreachable("https://127.0.0.1:6443", wrapped)
        self.assertIsInstance(err, errors.Unavailable)
        self.assertEqual(err.message, "cannot reach the Kubernetes API server at https://127.0.0.1:6443: "
                                      "Failed to establish a new connection: [Errno 111] Connection refused")


class FakeStream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        return iter(self.chunks)


class LinesTests(SynchronousTestCase):
    """Watch events are newline-framed, whatever the chunking."""

    def test_events_split_across_chunks(self) -> None:
        """Events split over chunks, or sharing one, come out one per line, blank lines dropped."""
        stream = FakeStream([b'{"a":', b'1}\n{"b":2}\n\n{"c"', b":3}"])
        self.assertEqual(list(_lines(stream)), [b'{"a":1}', b'{"b":2}', b'{"c":3}'])
