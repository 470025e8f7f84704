# -*- test-case-name: tests.api.test_crdgen -*-
"""Generate the CustomResourceDefinitions of sidero's kinds from the schemas and the registry.

C{python -m sidero.api.crdgen [--output deploy/crds]} writes one C{apiextensions.k8s.io/v1}
CRD per kind, named C{<group>_<plural>.yaml}.  The output is deterministic (sorted keys,
versions in registry order) so the committed manifests can be compared with fresh ones.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from sidero.api import registry, schema
from sidero.api.registry import ResourceType

WEBHOOK_SERVICE_NAMESPACE = "sidero-system"
WEBHOOK_SERVICE_NAME = "sidero-webhook-service"
CONVERSION_PATH = "/convert"


def conversion(kind: ResourceType) -> dict[str, Any] | None:
    """Webhook conversion for multi-version kinds; None (the default, C{None} strategy) otherwise."""
    if len(kind.served_versions) < 2:
        return None
    return {
        "strategy": "Webhook",
        "webhook": {
            "conversionReviewVersions": ["v1", "v1beta1"],
            "clientConfig": {
                "service": {
                    "namespace": WEBHOOK_SERVICE_NAMESPACE,
                    "name": WEBHOOK_SERVICE_NAME,
                    "path": CONVERSION_PATH,
                },
            },
        },
    }


def _printer_columns(kind: ResourceType) -> list[dict[str, Any]]:
    columns = []
    for column in kind.printer_columns:
        entry: dict[str, Any] = {"jsonPath": column.json_path, "name": column.name, "type": column.type}
        if column.priority:
            entry["priority"] = column.priority
        description = column.description or ("The age of this resource" if column is registry.AGE else "")
        if description:
            entry["description"] = description
        columns.append(entry)
    return columns


def crd(kind: ResourceType) -> dict[str, Any]:
    """The CustomResourceDefinition object for one custom kind."""
    if not kind.custom:
        raise ValueError(f"{kind.kind} is not a custom resource")
    names: dict[str, Any] = {
        "kind": kind.kind,
        "listKind": f"{kind.kind}List",
        "plural": kind.plural,
        "singular": kind.singular,
    }
    if kind.short_names:
        names["shortNames"] = list(kind.short_names)
    if kind.categories:
        names["categories"] = list(kind.categories)
    versions = []
    for version in kind.served_versions:
        entry: dict[str, Any] = {
            "name": version,
            "served": True,
            "storage": version == kind.storage_version,
            "schema": {"openAPIV3Schema": schema.schema_for(kind, version)},
            "additionalPrinterColumns": _printer_columns(kind),
        }
        if kind.selectable_fields:
            entry["selectableFields"] = [{"jsonPath": path} for path in kind.selectable_fields]
        if kind.status_subresource:
            entry["subresources"] = {"status": {}}
        versions.append(entry)
    spec: dict[str, Any] = {
        "group": kind.group,
        "names": names,
        "scope": "Namespaced" if kind.namespaced else "Cluster",
        "versions": versions,
    }
    conv = conversion(kind)
    if conv is not None:
        spec["conversion"] = conv
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.resource,
            "labels": dict(kind.labels),
        },
        "spec": spec,
    }


def file_name(kind: ResourceType) -> str:
    return f"{kind.group}_{kind.plural}.yaml"


def render(kind: ResourceType) -> str:
    """The YAML text of one CRD, byte-for-byte stable."""
    return "---\n" + yaml.safe_dump(crd(kind), sort_keys=True, default_flow_style=False, width=100)


def manifests() -> dict[str, str]:
    """File name -> YAML for every custom kind."""
    return {file_name(kind): render(kind) for kind in registry.CUSTOM_KINDS}


def write(output: str) -> list[str]:
    """Write every CRD into C{output}; return the paths written."""
    os.makedirs(output, exist_ok=True)
    written = []
    for name, text in sorted(manifests().items()):
        path = os.path.join(output, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidero.api.crdgen", description=__doc__)
    parser.add_argument("--output", default="deploy/crds", help="directory to write the CRDs into")
    args = parser.parse_args(argv)
    for path in write(args.output):
        sys.stdout.write(path + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
