# -*- test-case-name: tests.management.test_cli_kubernetes -*-
"""The C{sidero} command against a Kubernetes API server instead of the management socket.

The management API is Kubernetes-shaped (same paths, verbs, Status errors), so the CLI's
client differs only in how one request is sent: here through the official client, with the
kubeconfig's credentials. Every command then works the same on both stores.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from sidero.k8s import client as kc
from sidero.management.client import ManagementClient


class KubeClient(ManagementClient):
    """L{ManagementClient} over a kubeconfig (or C{$KUBECONFIG}, or in-cluster)."""

    def __init__(self, kubeconfig: str | None, timeout: float = 30.0) -> None:
        super().__init__(socket_path="", timeout=timeout)
        self.kubeconfig = kubeconfig
        self.api_client = kc.load_api_client(kubeconfig)

    @property
    def where(self) -> str:
        return kc.host_of(self.api_client)

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json",
    ) -> Any:
        path, _, query = path.partition("?")
        _, decoded = kc.request(
            self.api_client, method, path, query=parse_qsl(query), body=body,
            content_type=content_type, timeout=(5.0, self.timeout),
        )
        return decoded

    def timeline(self, server: str) -> None:
        """A Kubernetes API server keeps no boot timeline (the service's memory does)."""
        return None

    def logs(self, server: str, follow: bool = False, tail: int | None = None) -> Any:
        from sidero.management.client import ServiceUnreachable

        raise ServiceUnreachable(
            self.where, "server logs are kept by the sidero service, not the API server; run "
            "sidero logs on the sidero host (its management socket)")

    def close(self) -> None:
        self.api_client.close()
