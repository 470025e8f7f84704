"""The boot and metadata lookups (`sidero.protocols.http.metadata.MetadataLookup`) over objects
held in a dict, as the informers' caches hold them: for harnesses that drive the boot site
in-process (`bench.http.route_cpu`, the `http` fuzz target)."""

from __future__ import annotations

from typing import Any


class ObjectLookup:
    """Objects by (kind, namespace, name); the kinds are the lookups' own names: server,
    binding, class, environment, metalmachine, machine and secret."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[(kind, meta.get("namespace", ""), meta["name"])] = obj

    def server(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(("server", "", name))

    def server_binding(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(("binding", "", name))

    def server_class(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(("class", "", name))

    def environment(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(("environment", "", name))

    def metal_machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("metalmachine", namespace, name))

    def machine(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("machine", namespace, name))

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("secret", namespace, name))
