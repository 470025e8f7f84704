# -*- test-case-name: tests.talos.test_configpatch -*-
"""Talos machine-config patching as Talos' C{configpatcher} does it (spec §3.6), with no I/O.

Functions take text and values and return values; every failure is a L{ConfigPatchError}
whose message is safe to show: it names paths, keys and line numbers, never values of the
machine config (which holds the cluster's secrets).

* L{load_patch}: a strategic merge patch (Talos config documents, C{$patch: delete}), else
  a JSON array of RFC 6902 operations, else a YAML list of them.
* L{apply_patch} on a L{MachineConfig}, which, like Talos' C{configOrBytes}, is either text
  (what RFC 6902 patches work on, single document only) or documents (what strategic merges
  work on), converted lazily.
* L{add_node_label} (§3.6 step 10) and L{add_siderolink_documents} (step 11).

YAML is read with a bounded, safe reader (no Python tags, YAML 1.2 core scalars as Go's
yaml.v3 reads them, aliases counted as their expansion) and written with libyaml when present.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonpatch
import jsonpointer
import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    DocumentStartEvent,
    MappingEndEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

V1ALPHA1 = "v1alpha1"
MULTI_DOCUMENT_JSON6902 = "JSON6902 patches are not supported for multi-document machine configuration"
NODE_LABEL = "metal.sidero.dev/uuid"
LOG_RECEIVER_PORT = 4001
EVENT_SINK_PORT = 4002

#: Bounds on what the YAML reader accepts: input size, nodes after alias expansion, nesting.
MAX_TEXT_BYTES = 4 << 20
MAX_NODES = 500_000
MAX_DEPTH = 100

#: Keys whose presence marks a document without apiVersion/kind as the v1alpha1 config.
_LEGACY_KEYS = ("machine", "cluster", "debug", "persist")
#: Keys that identify a document; a patch document left with only these does nothing.
_IDENTITY_KEYS = frozenset(("apiVersion", "kind", "name", "version"))

#: Fields replaced, not merged, by a strategic merge (Talos' C{merge:"replace"} tags).
_REPLACE_V1ALPHA1 = frozenset({
    ("cluster", "network", "podSubnets"),
    ("cluster", "network", "serviceSubnets"),
    ("cluster", "apiServer", "auditPolicy"),
})
_REPLACE_BY_KIND = {"NetworkRuleConfig": frozenset({("ingress",), ("portSelector", "ports")})}
_INTERFACES = ("machine", "network", "interfaces")
_ANY = "*"  # a list element in a merge path


class ConfigPatchError(ValueError):
    """A patch or machine config that cannot be read or applied; the message says why."""


# --- YAML ------------------------------------------------------------------------------------

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"

_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|[-+]?0o[0-7]+|[-+]?0x[0-9a-fA-F]+|[-+]?0b[01]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _CoreResolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core schema, as Go's yaml.v3 reads plain scalars: C{yes}/C{on} stay strings,
    dates stay strings, C{0o17}/C{0x1f}/C{0b1} and Go-style C{017} are integers."""


_CoreResolver.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_CoreResolver.add_implicit_resolver(_NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_CoreResolver.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
_CoreResolver.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
_CoreResolver.add_implicit_resolver(_MERGE, re.compile(r"^<<$"), ["<"])


def _fail(node: Node, problem: str) -> ConstructorError:
    return ConstructorError(None, None, problem, node.start_mark)


class _Constructor(SafeConstructor):
    """Plain JSON-like values only: str keys, no timestamps, sets, binary or Python objects;
    duplicate keys are an error (as in yaml.v3)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, MappingNode):
            raise _fail(node, f"expected a mapping node, but found {node.id}")
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, ScalarNode):
                raise _fail(key_node, "mapping keys must be scalars")
            if key_node.value in seen:
                raise _fail(key_node, f'mapping key "{key_node.value}" already defined')
            seen.add(key_node.value)
        self.flatten_mapping(node)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise _fail(key_node, "mapping keys must be scalars")
            mapping[str(key_node.value)] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_core_int(self, node: Any) -> int:
        text = str(self.construct_scalar(node))
        sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
        try:
            if digits[:2] in ("0o", "0x", "0b"):
                return sign * int(digits[2:], {"0o": 8, "0x": 16, "0b": 2}[digits[:2]])
            if len(digits) > 1 and digits.startswith("0"):
                try:
                    return sign * int(digits, 8)  # Go's ParseInt(s, 0, 64)
                except ValueError:
                    return sign * int(digits, 10)
            return sign * int(digits, 10)
        except ValueError:
            raise _fail(node, "invalid integer") from None

    def construct_core_float(self, node: Any) -> float:
        text = str(self.construct_scalar(node)).lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if body == ".inf":
            return sign * float("inf")
        if body == ".nan":
            return float("nan")
        try:
            return float(text)
        except ValueError:
            raise _fail(node, "invalid float") from None

    def construct_core_bool(self, node: Any) -> bool:
        text = str(self.construct_scalar(node)).lower()
        if text not in ("true", "false"):
            raise _fail(node, "invalid boolean")
        return text == "true"

    def construct_unsupported(self, node: Any) -> Any:
        raise _fail(node, f"unsupported YAML tag {node.tag}")


_add_constructor: Any = _Constructor.add_constructor
_add_constructor(_INT, _Constructor.construct_core_int)
_add_constructor(_FLOAT, _Constructor.construct_core_float)
_add_constructor(_BOOL, _Constructor.construct_core_bool)
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    _add_constructor(f"tag:yaml.org,2002:{_tag}", _Constructor.construct_unsupported)

_PARSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVER = _CoreResolver()


def _yaml_error(what: str, e: Exception) -> ConfigPatchError:
    """One line naming the problem and its position, without echoing the input text."""
    if isinstance(e, yaml.MarkedYAMLError):
        parts = [p for p in (e.context, e.problem) if p]
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return ConfigPatchError(f"{what}: {'; '.join(parts) or 'invalid YAML'}{where}")
    if isinstance(e, yaml.reader.ReaderError):
        return ConfigPatchError(f"{what}: unacceptable character at position {e.position}")
    return ConfigPatchError(f"{what}: invalid YAML")


class _Frame:
    __slots__ = ("key", "node", "size", "depth")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.key: Node | None = None
        self.size = 1
        self.depth = 1


def _compose(text: str, what: str) -> list[Node]:
    """YAML documents as nodes, composed from parser events without recursion.

    Each alias counts as the nodes it stands for, so an alias bomb is refused before anything
    is built from it; an alias to a node still being composed (a recursive structure) too.
    """
    documents: list[Node] = []
    stack: list[_Frame] = []
    anchors: dict[str, Node] = {}
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, depth)
    total = 0

    def add(node: Node, size: int, depth: int) -> None:
        nonlocal total
        total += size
        if total > MAX_NODES:
            raise ConfigPatchError(f"{what}: more than {MAX_NODES} YAML nodes (after expanding aliases)")
        if len(stack) + depth > MAX_DEPTH:
            raise ConfigPatchError(f"{what}: nested deeper than {MAX_DEPTH} levels")
        if not stack:
            documents.append(node)
            return
        parent = stack[-1]
        parent.size += size
        parent.depth = max(parent.depth, depth + 1)
        if isinstance(parent.node, SequenceNode):
            parent.node.value.append(node)
        elif parent.key is None:
            parent.key = node
        else:
            parent.node.value.append((parent.key, node))
            parent.key = None

    def anchor(name: str | None, node: Node) -> None:
        if name is not None:
            anchors[name] = node

    try:
        events: Iterable[Any] = yaml.parse(text, Loader=_PARSER)
        for event in events:
            if isinstance(event, AliasEvent):
                target = anchors.get(event.anchor or "")
                if target is None:
                    raise ConfigPatchError(f"{what}: unknown alias {event.anchor!r}")
                if id(target) not in measured:
                    raise ConfigPatchError(f"{what}: recursive alias {event.anchor!r}")
                add(target, *measured[id(target)])
            elif isinstance(event, ScalarEvent):
                tag = event.tag
                if tag is None or tag == "!":
                    tag = _RESOLVER.resolve(ScalarNode, event.value, event.implicit)
                start: Any = event.start_mark
                scalar = ScalarNode(tag, event.value, start, start, style=event.style)
                anchor(event.anchor, scalar)
                measured[id(scalar)] = (1, 1)
                add(scalar, 1, 1)
            elif isinstance(event, CollectionStartEvent):
                kind: Any = SequenceNode if isinstance(event, SequenceStartEvent) else MappingNode
                tag = event.tag
                if tag is None or tag == "!":
                    tag = _RESOLVER.resolve(kind, None, event.implicit)
                collection = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
                anchor(event.anchor, collection)
                stack.append(_Frame(collection))
                if len(stack) > MAX_DEPTH:
                    raise ConfigPatchError(f"{what}: nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, (SequenceEndEvent, MappingEndEvent)):
                frame = stack.pop()
                frame.node.end_mark = event.end_mark
                measured[id(frame.node)] = (frame.size, frame.depth)
                total -= frame.size - 1  # its children were counted as they were added
                add(frame.node, frame.size, frame.depth)
            elif isinstance(event, DocumentStartEvent):
                anchors = {}
    except yaml.YAMLError as e:
        raise _yaml_error(what, e) from None
    return documents


def load_yaml(data: str | bytes, what: str = "YAML") -> list[Any]:
    """Every document of a YAML stream as plain values (None for an empty document).

    @raise ConfigPatchError: not UTF-8, too large or deep, malformed, or an unsupported tag.
    """
    if isinstance(data, bytes):
        if len(data) > MAX_TEXT_BYTES:
            raise ConfigPatchError(f"{what}: larger than {MAX_TEXT_BYTES} bytes")
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigPatchError(f"{what}: not UTF-8 (byte {e.start})") from None
    if len(data) > MAX_TEXT_BYTES:
        raise ConfigPatchError(f"{what}: larger than {MAX_TEXT_BYTES} characters")
    values = []
    for node in _compose(data, what):
        try:
            values.append(_Constructor().construct_document(node))
        except yaml.YAMLError as e:
            raise _yaml_error(what, e) from None
        except RecursionError:  # merge keys chained through many levels
            raise ConfigPatchError(f"{what}: nested too deeply") from None
    return values


def _str_representer(dumper: Any, data: str) -> Any:
    return dumper.represent_scalar(_STR, data, style="|" if "\n" in data else None)


_SafeDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_SafeDumper):
    """libyaml's emitter when present; YAML 1.1's implicit types plus Go yaml.v3's, so any
    string either would read as something else is written quoted; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
_Dumper.add_representer(str, _str_representer)


def dump_yaml(documents: Sequence[Any], sort_keys: bool = False) -> str:
    """A YAML stream of C{documents}: block style, multi-line strings as literal blocks, no
    anchors; documents after the first start with C{---}."""
    try:
        return yaml.dump_all(
            list(documents), Dumper=_Dumper, sort_keys=sort_keys, allow_unicode=True,
            width=1 << 30, explicit_start=False,
        )
    except yaml.YAMLError as e:  # a value YAML cannot represent
        raise ConfigPatchError(f"cannot encode the config as YAML: {e}") from None


# --- documents -------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class DocumentID:
    """What Talos matches documents by: apiVersion/kind[/name]; the v1alpha1 config has
    neither apiVersion nor kind and is C{/v1alpha1}."""

    api_version: str
    kind: str
    name: str = ""

    @property
    def is_v1alpha1(self) -> bool:
        return self.api_version == "" and self.kind == V1ALPHA1

    def __str__(self) -> str:
        return f"{self.api_version}/{self.kind}" + (f"/{self.name}" if self.name else "")


V1ALPHA1_ID = DocumentID("", V1ALPHA1)


def document_id(doc: Any, index: int = 0) -> DocumentID:
    """The identity of one config document, as Talos' decoder works it out.

    @raise ConfigPatchError: not a mapping, or apiVersion without kind (or the reverse).
    """
    where = f"document {index + 1}"
    if not isinstance(doc, dict):
        raise ConfigPatchError(f"{where}: expected a YAML mapping, found {_type_name(doc)}")
    api_version, kind, name = doc.get("apiVersion"), doc.get("kind"), doc.get("name")
    for key, value in (("apiVersion", api_version), ("kind", kind), ("name", name)):
        if value is not None and not isinstance(value, str):
            raise ConfigPatchError(f"{where}: {key} must be a string")
    legacy = any(k in doc for k in _LEGACY_KEYS) or (not api_version and doc.get("version") == V1ALPHA1)
    version = V1ALPHA1 if legacy else (api_version or "")
    if version == V1ALPHA1 and not kind:
        return V1ALPHA1_ID
    if not kind:
        raise ConfigPatchError(f"{where}: missing kind")
    if not api_version:
        raise ConfigPatchError(f"{where}: missing apiVersion")
    return DocumentID(api_version, kind, name or "")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "mapping", list: "sequence", str: "string", bool: "boolean",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def load_documents(data: str | bytes, what: str = "machine config") -> list[dict[str, Any]]:
    """The documents of a machine config (empty documents skipped, duplicates refused)."""
    docs: list[dict[str, Any]] = []
    seen: set[DocumentID] = set()
    for value in load_yaml(data, what):
        if value is None:
            continue
        doc_id = document_id(value, len(docs))
        if doc_id in seen:
            raise ConfigPatchError(f"{what}: duplicate document {doc_id} is not allowed")
        seen.add(doc_id)
        docs.append(value)
    return docs


def ordered(documents: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The v1alpha1 document first, the others in their order (how Talos encodes them)."""
    docs = list(documents)
    first = [d for d in docs if _is_v1alpha1(d)]
    return first + [d for d in docs if not _is_v1alpha1(d)]


def _is_v1alpha1(doc: dict[str, Any]) -> bool:
    try:
        return document_id(doc).is_v1alpha1
    except ConfigPatchError:
        return False


def render(documents: Iterable[dict[str, Any]]) -> str:
    """Documents as the YAML stream Talos reads (v1alpha1 first)."""
    return dump_yaml(ordered(documents))


# --- patches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeleteSelector:
    """A C{$patch: delete} found in a strategic patch.

    @ivar path: keys from the document root to what is deleted; empty = the whole document.
    @ivar item: for an element of a list, the C{(key, value)} that picks it.
    """

    document: DocumentID
    path: tuple[str, ...] = ()
    item: tuple[str, Any] | None = None

    def __str__(self) -> str:
        where = ".".join(self.path) or "(document)"
        if self.item is not None:
            where += f"[{self.item[0]}={self.item[1]}]"
        return f"{where} in document {self.document}"


@dataclass(frozen=True)
class StrategicPatch:
    """Config documents merged into the config, after the deletes they carried."""

    documents: tuple[dict[str, Any], ...] = ()
    deletes: tuple[DeleteSelector, ...] = ()


@dataclass(frozen=True)
class JSONPatch:
    """RFC 6902 operations, validated by C{jsonpatch}."""

    operations: tuple[dict[str, Any], ...] = ()


Patch = StrategicPatch | JSONPatch


def _is_delete(value: Any) -> bool:
    return isinstance(value, dict) and value.get("$patch") == "delete"


def _extract_deletes(doc: dict[str, Any], doc_id: DocumentID) -> tuple[dict[str, Any] | None, list[DeleteSelector]]:
    """Split C{$patch: delete} markers out of a patch document (Talos' delete selectors)."""
    deletes: list[DeleteSelector] = []
    if _is_delete(doc):
        if doc_id.is_v1alpha1:
            raise ConfigPatchError("$patch: delete: can't delete the root of the legacy document")
        return None, [DeleteSelector(doc_id)]

    def walk(value: Any, path: tuple[str, ...], through_list: bool) -> tuple[Any, bool]:
        """(cleaned value, whether it became empty and must go)."""
        if isinstance(value, dict):
            if "$patch" in value:
                raise ConfigPatchError(
                    f"unsupported $patch directive at '{'.'.join(path) or '(document root)'}' "
                    "(only $patch: delete is)")
            out: dict[str, Any] = {}
            for key, child in value.items():
                if _is_delete(child):
                    if through_list:
                        raise ConfigPatchError(
                            f"$patch: delete: cannot delete an inner key in '{'.'.join((*path, key))}'")
                    deletes.append(DeleteSelector(doc_id, (*path, key)))
                    continue
                cleaned, empty = walk(child, (*path, key), through_list)
                if not empty:
                    out[key] = cleaned
            return out, bool(value) and not out
        if isinstance(value, list):
            items = []
            for child in value:
                if _is_delete(child):
                    if through_list:
                        raise ConfigPatchError(
                            f"$patch: delete: searching for complex paths in lists is not supported "
                            f"('{'.'.join(path)}')")
                    selector = [(k, v) for k, v in child.items() if k != "$patch"]
                    if not selector or isinstance(selector[0][1], (dict, list)):
                        raise ConfigPatchError(
                            f"$patch: delete: no key: value found in list item at '{'.'.join(path)}'")
                    deletes.append(DeleteSelector(doc_id, path, selector[0]))
                    continue
                cleaned, empty = walk(child, path, True)
                if not empty:
                    items.append(cleaned)
            return items, bool(value) and not items
        return value, False

    cleaned, _ = walk(doc, (), False)
    if set(cleaned) <= _IDENTITY_KEYS and deletes:
        return None, deletes
    return cleaned, deletes


def _strategic(data: str | bytes) -> StrategicPatch:
    documents: list[dict[str, Any]] = []
    deletes: list[DeleteSelector] = []
    seen: set[DocumentID] = set()
    values = load_yaml(data, "strategic merge patch")
    for index, value in enumerate(values):
        if value is None:
            continue
        doc_id = document_id(value, index)
        cleaned, found = _extract_deletes(value, doc_id)
        deletes.extend(found)
        if cleaned is None:
            continue
        if doc_id in seen:
            raise ConfigPatchError(f"duplicate document {doc_id} is not allowed")
        seen.add(doc_id)
        documents.append(cleaned)
    return StrategicPatch(tuple(documents), tuple(deletes))


def json_patch(operations: Any) -> JSONPatch:
    """Validate RFC 6902 operations (a list of mappings, as a Server's C{configPatches}).

    @raise ConfigPatchError: not a list of valid operations.
    """
    if not isinstance(operations, list):
        raise ConfigPatchError(f"a JSON patch is a list of operations, not a {_type_name(operations)}")
    try:
        jsonpatch.JsonPatch(operations)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
        raise ConfigPatchError(f"invalid JSON patch: {_patch_message(e)}") from None
    except (TypeError, ValueError, KeyError, AttributeError):
        raise ConfigPatchError("invalid JSON patch: malformed operation") from None
    _check_depth(operations, "JSON patch")
    return JSONPatch(tuple(copy.deepcopy(operations)))


def _check_depth(value: Any, what: str) -> None:
    stack = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ConfigPatchError(f"{what}: nested deeper than {MAX_DEPTH} levels")
        if count > MAX_NODES:
            raise ConfigPatchError(f"{what}: more than {MAX_NODES} values")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def load_patch(data: str | bytes) -> Patch:
    """A patch as Talos loads one: config documents (strategic merge), else a JSON array of
    RFC 6902 operations, else a YAML list of them.

    @raise ConfigPatchError: none of the three; the message is the likeliest one's error.
    """
    try:
        return _strategic(data)
    except ConfigPatchError as e:
        strategic_error = e
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        operations = json.loads(text)
    except (ValueError, RecursionError) as e:
        json_error = ConfigPatchError(f"invalid JSON patch: {_json_problem(e)}")
    else:
        return json_patch(operations)
    try:
        values = load_yaml(text, "JSON patch")
    except ConfigPatchError:
        values = None
    if values is not None and len(values) == 1 and isinstance(values[0], list) \
            and all(isinstance(op, dict) for op in values[0]):
        return json_patch(values[0])
    raise json_error if text.strip().startswith("[") else strategic_error


def _json_problem(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno}, column {e.colno}"
    return "nested too deeply"


def _patch_message(e: Exception) -> str:
    """The jsonpatch/jsonpointer error text, minus any echo of the document or values."""
    if isinstance(e, jsonpatch.JsonPatchTestFailed):
        return "test operation failed: the value differs"
    text = str(e)
    if isinstance(e, jsonpointer.JsonPointerException) or isinstance(e, jsonpatch.JsonPatchConflict):
        found = re.match(r"^(member '[^']*' not found)", text)
        if found:
            return found.group(1)
        if re.match(r"^(index '[^']*' is out of bounds|can't (remove|replace) a non-existent object '[^']*'"
                    r"|can't (insert|replace) outside of list|can't remove the whole document"
                    r"|Cannot move values into their own children|invalid array index '[^']*'"
                    r"|'[^']*' is not a valid sequence index)$", text):
            return text
        if text.startswith("unable to fully resolve json pointer"):
            return "path does not resolve"
        if text.startswith("Cannot apply token"):
            return "path goes through a scalar value"
        return "path cannot be applied"
    if isinstance(e, jsonpatch.InvalidJsonPatch):
        return text
    return "operation failed"


# --- application -----------------------------------------------------------------------------


def apply_json6902(text: str, patch: JSONPatch) -> str:
    """Apply RFC 6902 operations to a single-document config (YAML → JSON → patch → YAML).

    @raise ConfigPatchError: the config is not exactly one document, or an operation fails.
    """
    values = load_yaml(text, "machine config")
    if len(values) != 1:
        raise ConfigPatchError(MULTI_DOCUMENT_JSON6902)
    doc = copy.deepcopy(values[0])
    for index, operation in enumerate(patch.operations):
        where = f"operation {index + 1} ({operation.get('op')} {operation.get('path')})"
        try:
            doc = jsonpatch.JsonPatch([operation]).apply(doc, in_place=True)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise ConfigPatchError(f"{where}: {_patch_message(e)}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError):
            raise ConfigPatchError(f"{where}: operation failed") from None
    return dump_yaml([doc], sort_keys=True)


def strategic_merge(documents: Sequence[dict[str, Any]], patch: StrategicPatch) -> list[dict[str, Any]]:
    """Merge a strategic patch into config documents, as Talos does (spec §3.6).

    Deletes first; then each patch document is deep-merged into the document with the same
    apiVersion/kind/name, or appended.  Merging: mappings key by key; a scalar replaces only
    when not zero ("" or 0; booleans always); null changes nothing; lists are appended,
    except the replace fields; C{extraArgs} key by key; C{machine.network.interfaces} by
    C{interface} or C{deviceSelector}, their C{vlans} by C{vlanId}.
    """
    left = [copy.deepcopy(d) for d in documents]
    for selector in patch.deletes:
        _apply_delete(left, selector)
    for right in patch.documents:
        right_id = document_id(right)
        context = _MergeContext(right_id)
        for index, doc in enumerate(left):
            if document_id(doc, index) == right_id:
                left[index] = context.merge(doc, right, ())
                break
        else:
            left.append(copy.deepcopy(right))
    return left


def _apply_delete(documents: list[dict[str, Any]], selector: DeleteSelector) -> None:
    failed = f"patch delete: {selector}"
    index = next((i for i, d in enumerate(documents) if document_id(d, i) == selector.document), None)
    if index is None:
        raise ConfigPatchError(f"{failed}: no such document")
    if not selector.path:
        del documents[index]
        return
    parent: Any = documents[index]
    *walk, last = selector.path
    for key in walk:
        parent = parent.get(key) if isinstance(parent, dict) else None
        if parent is None:
            raise ConfigPatchError(f"{failed}: lookup failed")
    if not isinstance(parent, dict):
        raise ConfigPatchError(f"{failed}: lookup failed")
    if selector.item is None:
        parent.pop(last, None)  # an unset field is already deleted
        return
    items = parent.get(last)
    key, value = selector.item
    if isinstance(items, list):
        for i, item in enumerate(items):
            if isinstance(item, dict) and _same_scalar(item.get(key), value):
                del items[i]
                return
    raise ConfigPatchError(f"{failed}: lookup failed")


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a is not None and a == b


def _is_zero(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return value is None or value == "" or (isinstance(value, (int, float)) and value == 0)


def _same_device(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if b.get("interface"):
        return bool(a.get("interface") == b["interface"])
    if b.get("deviceSelector") is not None:
        return a.get("deviceSelector") is not None and bool(a["deviceSelector"] == b["deviceSelector"])
    return False


def _same_vlan(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a.get("vlanId") == b.get("vlanId"))


class _MergeContext:
    """The rules that depend on which document is merged (replace fields, keyed lists)."""

    def __init__(self, doc_id: DocumentID) -> None:
        self.doc = str(doc_id)
        self.v1alpha1 = doc_id.is_v1alpha1
        self.replace = _REPLACE_V1ALPHA1 if self.v1alpha1 else _REPLACE_BY_KIND.get(doc_id.kind, frozenset())

    def merge(self, left: Any, right: Any, path: tuple[str, ...]) -> Any:
        """Merge C{right} into C{left} (which it may modify) and return the result."""
        if right is None:
            return left
        if left is None or path in self.replace:
            return copy.deepcopy(right)
        if isinstance(right, dict):
            if not isinstance(left, dict):
                raise self.mismatch(path, left, right)
            if path and path[-1] == "extraArgs":
                left.update((k, copy.deepcopy(v)) for k, v in right.items() if v is not None)
                return left
            for key, value in right.items():
                if left.get(key) is None:
                    if value is not None:
                        left[key] = copy.deepcopy(value)
                else:
                    left[key] = self.merge(left[key], value, (*path, key))
            return left
        if isinstance(right, list):
            if not isinstance(left, list):
                raise self.mismatch(path, left, right)
            if self.v1alpha1 and path == _INTERFACES:
                return self.merge_keyed(left, right, path, _same_device)
            if self.v1alpha1 and path == (*_INTERFACES, _ANY, "vlans"):
                return self.merge_keyed(left, right, path, _same_vlan)
            return left + copy.deepcopy(right)
        if isinstance(left, (dict, list)):
            raise self.mismatch(path, left, right)
        return left if _is_zero(right) else right

    def merge_keyed(self, left: list[Any], right: list[Any], path: tuple[str, ...],
                    same: Callable[[dict[str, Any], dict[str, Any]], bool]) -> list[Any]:
        for item in right:
            if item is None:
                continue
            if not isinstance(item, dict):
                raise ConfigPatchError(
                    f"merge: {'.'.join(path)} in document {self.doc} holds a {_type_name(item)}, "
                    "not a mapping")
            for index, existing in enumerate(left):
                if isinstance(existing, dict) and same(existing, item):
                    left[index] = self.merge(existing, item, (*path, _ANY))
                    break
            else:
                left.append(copy.deepcopy(item))
        return left

    def mismatch(self, path: tuple[str, ...], left: Any, right: Any) -> ConfigPatchError:
        where = ".".join(p for p in path if p != _ANY) or "(document root)"
        return ConfigPatchError(
            f"merge type mismatch at {where} in document {self.doc}: "
            f"{_type_name(left)} in the config, {_type_name(right)} in the patch")


class MachineConfig:
    """A machine config as text or as documents, converted only when a patch needs the other
    form (Talos' C{configOrBytes}): RFC 6902 patches see the text, merges the documents."""

    def __init__(self, text: str | None = None, documents: list[dict[str, Any]] | None = None) -> None:
        if (text is None) == (documents is None):
            raise TypeError("give either text or documents")
        self._text = text
        self._documents = documents

    @classmethod
    def from_text(cls, data: str | bytes) -> MachineConfig:
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise ConfigPatchError(f"machine config: not UTF-8 (byte {e.start})") from None
        return cls(text=data)

    def text(self) -> str:
        if self._text is None:
            assert self._documents is not None
            self._text = render(self._documents)
        return self._text

    def documents(self) -> list[dict[str, Any]]:
        if self._documents is None:
            assert self._text is not None
            self._documents = load_documents(self._text)
        return self._documents


def apply_patch(config: MachineConfig, patch: Patch) -> MachineConfig:
    """The config with one patch applied (the input is not modified)."""
    if isinstance(patch, JSONPatch):
        return MachineConfig(text=apply_json6902(config.text(), patch))
    return MachineConfig(documents=strategic_merge(config.documents(), patch))


# --- sidero's own additions ------------------------------------------------------------------


def add_node_label(text: str, server_name: str) -> MachineConfig:
    """Append C{metal.sidero.dev/uuid=<server>} to kubelet's C{node-labels} (§3.6 step 10).

    A multi-document config (text holding C{---\\n}) gets a strategic merge; a single document
    the legacy RFC 6902 patch (add the missing level, or replace C{extraArgs}).

    @raise ConfigPatchError: with the spec's message (C{unknown config type}, C{failure
        creating config struct: ...}) or C{failure adding node label: ...}.
    """
    try:
        values = load_yaml(text, "machine config")
        first = values[0] if values else None
        if first is not None and not isinstance(first, dict):
            raise ConfigPatchError(f"expected a YAML mapping, found {_type_name(first)}")
        first = first or {}
        machine = _optional_mapping(first, "machine", "machine")
        kubelet = _optional_mapping(machine or {}, "kubelet", "machine.kubelet")
        extra_args = _optional_mapping(kubelet or {}, "extraArgs", "machine.kubelet.extraArgs")
        args = {k: _arg_text(v, k) for k, v in (extra_args or {}).items()}
    except ConfigPatchError as e:
        raise ConfigPatchError(f"failure creating config struct: {e}") from None
    if first.get("version") != V1ALPHA1:
        raise ConfigPatchError("unknown config type")
    label = f"{NODE_LABEL}={server_name}"
    value = f"{args['node-labels']},{label}" if "node-labels" in args else label
    try:
        if "---\n" in text:
            patch = StrategicPatch(({"machine": {"kubelet": {"extraArgs": {"node-labels": value}}}},))
            return MachineConfig(documents=strategic_merge(load_documents(text), patch))
        if machine is None:
            op = {"op": "add", "path": "/machine", "value": {"kubelet": {"extraArgs": {"node-labels": label}}}}
        elif kubelet is None:
            op = {"op": "add", "path": "/machine/kubelet", "value": {"extraArgs": {"node-labels": label}}}
        elif extra_args is None:
            op = {"op": "add", "path": "/machine/kubelet/extraArgs", "value": {"node-labels": label}}
        else:
            op = {"op": "replace", "path": "/machine/kubelet/extraArgs", "value": {**args, "node-labels": value}}
        return MachineConfig(text=apply_json6902(text, JSONPatch((op,))))
    except ConfigPatchError as e:
        raise ConfigPatchError(f"failure adding node label: {e}") from None


def _optional_mapping(parent: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = parent.get(key)
    if value is not None and not isinstance(value, dict):
        raise ConfigPatchError(f"{where} must be a mapping, not a {_type_name(value)}")
    return value


def _arg_text(value: Any, key: str) -> str:
    """A kubelet argument as Go's map[string]string decodes it (scalars as their text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return json.dumps(value)
    raise ConfigPatchError(f"machine.kubelet.extraArgs.{key} must be a string, not a {_type_name(value)}")


def join_host_port(host: str, port: int) -> str:
    """C{host:port}, bracketing a bare IPv6 literal (Go's net.JoinHostPort)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def siderolink_documents(api_endpoint: str, api_port: int, tunnel_address: str) -> list[dict[str, Any]]:
    """The SideroLinkConfig, EventSinkConfig and KmsgLogConfig documents of §3.6 step 11.

    @raise ConfigPatchError: they would not validate (no endpoint, bad port or address).
    """
    if not api_endpoint or any(c.isspace() for c in api_endpoint):
        raise ConfigPatchError(f"invalid API endpoint {api_endpoint!r}")
    if not 0 < api_port < 65536:
        raise ConfigPatchError(f"invalid API port {api_port}")
    try:
        tunnel = ipaddress.ip_address(tunnel_address)
    except ValueError:
        raise ConfigPatchError(f"invalid SideroLink server address {tunnel_address!r}") from None
    api_url = f"grpc://{join_host_port(api_endpoint, api_port)}"
    parsed = urllib.parse.urlsplit(api_url)
    try:
        valid = bool(parsed.hostname) and parsed.port == api_port
    except ValueError:
        valid = False
    if not valid:
        raise ConfigPatchError(f"invalid SideroLink API URL {api_url!r}")
    return [
        {"apiVersion": V1ALPHA1, "kind": "SideroLinkConfig", "apiUrl": api_url},
        {"apiVersion": V1ALPHA1, "kind": "EventSinkConfig",
         "endpoint": join_host_port(str(tunnel), EVENT_SINK_PORT)},
        {"apiVersion": V1ALPHA1, "kind": "KmsgLogConfig", "name": "remote-log",
         "url": f"tcp://{join_host_port(str(tunnel), LOG_RECEIVER_PORT)}"},
    ]


def add_siderolink_documents(config: MachineConfig, documents: Sequence[dict[str, Any]]) -> MachineConfig:
    """Merge the SideroLink documents into the config: same kind/name merged, others appended."""
    return MachineConfig(documents=strategic_merge(config.documents(), StrategicPatch(tuple(documents))))


__all__ = [
    "MULTI_DOCUMENT_JSON6902", "V1ALPHA1", "ConfigPatchError", "DeleteSelector", "DocumentID",
    "JSONPatch", "MachineConfig", "Patch", "StrategicPatch", "add_node_label",
    "add_siderolink_documents", "apply_json6902", "apply_patch", "document_id", "dump_yaml",
    "join_host_port", "json_patch", "load_documents", "load_patch", "load_yaml", "ordered",
    "render", "siderolink_documents", "strategic_merge",
]
