"""What the sidero process does to the Kubernetes API, derived from its source code.

The RBAC of C{deploy/clusterctl/infrastructure-components.yaml} is a table in
L{sidero.api.clusterctl}; this module reads C{sidero/} with L{ast} to find every call that
reaches the API server, so the tests can check the table covers them without anyone copying
lists by hand:

* calls of the resource store (C{<...>.store.get(KIND, ...)}, C{store.create(obj)}, ...) and
  informers (C{Informer(store, KIND)}, C{manager.informer(KIND)}); the kind is the call's kind
  argument when it names a registry kind, else every registry kind the enclosing function (or
  class, or module) names. Store methods map to the HTTP requests
  L{sidero.k8s.store.KubernetesStore} makes for them (an update without a resourceVersion reads
  the object first; a watch lists before it watches);
* the typed-client calls of the webhook self-registration (C{read_custom_resource_definition},
  C{create_validating_webhook_configuration}, ...).

Skipped, with the reason: C{sidero/management/} (the unix-socket API runs only with the embedded
store, see C{sidero.tap._make_management}), the store backends themselves and the agent (a
separate program on the servers, speaking gRPC).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from sidero.api import registry
from sidero.api.registry import ResourceType
from tests.paths import REPO

PACKAGE = REPO / "sidero"

SKIPPED = {
    "sidero/management": "the management API runs only with the embedded store",
    "sidero/store": "store interfaces and the embedded backend",
    "sidero/k8s/store.py": "the Kubernetes backend itself (its verbs are STORE_VERBS below)",
    "sidero/agent": "the agent runs on servers and speaks gRPC only",
    "sidero/api": "pure model code (no API calls)",
}

#: Store method -> (verbs on the object, verbs on its status subresource), as KubernetesStore
#: issues them.
STORE_VERBS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "get": (("get",), ()),
    "list": (("list",), ()),
    "watch": (("list", "watch"), ()),
    "create": (("create",), ()),
    "update": (("get", "update"), ()),
    "update_status": (("get",), ("update",)),
    "patch": (("patch",), ()),
    "delete": (("delete",), ()),
}
INFORMER_VERBS = ("list", "watch")

#: Typed-client calls of sidero.k8s.webhook.install_webhooks: (group, resource) by name suffix.
CLIENT_RESOURCES = {
    "custom_resource_definition": ("apiextensions.k8s.io", "customresourcedefinitions"),
    "validating_webhook_configuration": ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
}
CLIENT_VERBS = {"read": "get", "list": "list", "create": "create", "patch": "patch",
                "replace": "update", "delete": "delete"}
_CLIENT_CALL = re.compile(f"^({'|'.join(CLIENT_VERBS)})_({'|'.join(CLIENT_RESOURCES)})$")

KINDS_BY_NAME = {name: value for name, value in vars(registry).items() if isinstance(value, ResourceType)}


@dataclass(frozen=True)
class Use:
    """One (group, resource, verb) the code needs, and where."""

    group: str
    resource: str
    verb: str
    where: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.group, self.resource, self.verb


@dataclass
class Scan:
    uses: list[Use] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)

    def needed(self) -> set[tuple[str, str, str]]:
        return {u.key for u in self.uses}

    def where(self, key: tuple[str, str, str]) -> list[str]:
        return sorted({u.where for u in self.uses if u.key == key})


def _skipped(rel: str) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in SKIPPED)


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if not _skipped(rel):
            yield rel, ast.parse(path.read_text(), rel)


class _Module:
    def __init__(self, tree: ast.Module) -> None:
        self.aliases: dict[str, ResourceType] = {}
        self.registry_names = {"registry"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "sidero.api.registry":
                for a in node.names:
                    if a.name in KINDS_BY_NAME:
                        self.aliases[a.asname or a.name] = KINDS_BY_NAME[a.name]
            elif isinstance(node, ast.ImportFrom) and node.module == "sidero.api":
                for a in node.names:
                    if a.name == "registry":
                        self.registry_names.add(a.asname or a.name)

    def kind(self, node: ast.AST) -> ResourceType | None:
        if isinstance(node, ast.Name) and node.id in self.aliases:
            return self.aliases[node.id]
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in self.registry_names and node.attr in KINDS_BY_NAME):
            return KINDS_BY_NAME[node.attr]
        return None

    def kinds_in(self, node: ast.AST) -> list[ResourceType]:
        found = []
        for n in ast.walk(node):
            k = self.kind(n)
            if k is not None and k not in found:
                found.append(k)
        return found


def _is_store(node: ast.AST) -> bool:
    """C{store}, C{self.store}, C{context.store}, C{self._store} ..."""
    if isinstance(node, ast.Name):
        return node.id in ("store", "_store")
    if isinstance(node, ast.Attribute):
        return node.attr in ("store", "_store")
    return False


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _enclosing(node: ast.AST, parents: dict[ast.AST, ast.AST], wanted: tuple[type, ...]) -> ast.AST | None:
    n: ast.AST | None = parents.get(node)
    while n is not None and not isinstance(n, wanted):
        n = parents.get(n)
    return n


def _function_kinds(mod: _Module, func: ast.AST, cls: ast.AST | None) -> list[ResourceType]:
    """Kinds a function names, and those named by the methods of its class it calls
    (C{self._get_server(uuid)} names SERVER for C{_write_server})."""
    found = mod.kinds_in(func)
    if cls is None:
        return found
    methods = {n.name: n for n in ast.iter_child_nodes(cls) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for n in ast.walk(func):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                and n.func.value.id == "self" and n.func.attr in methods and methods[n.func.attr] is not func):
            found += [k for k in mod.kinds_in(methods[n.func.attr]) if k not in found]
    return found


def _scope_kinds(mod: _Module, node: ast.AST, parents: dict[ast.AST, ast.AST], tree: ast.Module) -> list[ResourceType]:
    """Kinds named in the nearest enclosing function (and the methods it calls), else its
    class, else the module."""
    func = _enclosing(node, parents, (ast.FunctionDef, ast.AsyncFunctionDef))
    cls = _enclosing(node, parents, (ast.ClassDef,))
    if func is not None:
        found = _function_kinds(mod, func, cls)
        if found:
            return found
    if cls is not None:
        found = mod.kinds_in(cls)
        if found:
            return found
    return mod.kinds_in(tree)


def _resource(kind: ResourceType) -> tuple[str, str]:
    return kind.group, kind.plural


def scan() -> Scan:
    result = Scan()
    for rel, tree in modules():
        mod = _Module(tree)
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{rel}:{node.lineno}"
            func = node.func
            # store.<method>(...)
            if isinstance(func, ast.Attribute) and func.attr in STORE_VERBS and _is_store(func.value):
                kinds: list[ResourceType] = []
                if node.args and mod.kind(node.args[0]) is not None:
                    kinds = [mod.kind(node.args[0])]  # type: ignore[list-item]
                else:
                    kinds = _scope_kinds(mod, node, parents, tree)
                if not kinds:
                    result.unresolved.append(where)
                    continue
                verbs, status_verbs = STORE_VERBS[func.attr]
                if func.attr == "patch" and any(
                        k.arg == "subresource" and isinstance(k.value, ast.Constant) and k.value.value == "status"
                        for k in node.keywords):
                    verbs, status_verbs = (), ("patch",)
                for kind in kinds:
                    group, plural = _resource(kind)
                    result.uses += [Use(group, plural, v, where) for v in verbs]
                    result.uses += [Use(group, plural + "/status", v, where) for v in status_verbs]
                continue
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            # store_serves(store, KIND): a discovery probe, one list of KIND.
            if name == "store_serves":
                kind = mod.kind(node.args[1]) if len(node.args) > 1 else None
                if kind is None:
                    result.unresolved.append(where)
                    continue
                group, plural = _resource(kind)
                result.uses.append(Use(group, plural, "list", where))
                continue
            # patch_changes(store, KIND, ...): the patch helper writes the object and its status.
            if name == "patch_changes":
                kind = mod.kind(node.args[1]) if len(node.args) > 1 else None
                if kind is None:
                    result.unresolved.append(where)
                    continue
                group, plural = _resource(kind)
                result.uses += [Use(group, plural, "patch", where), Use(group, plural + "/status", "patch", where)]
                continue
            # Informer(store, KIND) / manager.informer(KIND)
            if name in ("Informer", "informer"):
                args = node.args[1:] if name == "Informer" else node.args[:1]
                kinds = [k for k in (mod.kind(a) for a in args) if k is not None]
                if not kinds:
                    kinds = _scope_kinds(mod, node, parents, tree)
                if not kinds and name == "Informer":
                    result.unresolved.append(where)
                for kind in kinds:
                    group, plural = _resource(kind)
                    result.uses += [Use(group, plural, v, where) for v in INFORMER_VERBS]
                continue
            # typed client calls (webhook self-registration)
            if isinstance(func, ast.Attribute):
                m = _CLIENT_CALL.match(func.attr)
                if m:
                    group, resource = CLIENT_RESOURCES[m.group(2)]
                    result.uses.append(Use(group, resource, CLIENT_VERBS[m.group(1)], where))
    return result
