# -*- test-case-name: tests.management.test_codec -*-
"""Decoding manifests and request bodies (JSON or YAML), shared by the server and the CLI.

YAML is loaded with the safe loader and with anchors/aliases refused: an alias lets a few
hundred bytes expand into gigabytes once serialised back to JSON (the "billion laughs"), and
Kubernetes manifests never need them.
"""

from __future__ import annotations

import json
from typing import Any

import yaml


class DecodeError(ValueError):
    """The text is not a JSON/YAML object (or stream of objects)."""


#: Both parsers recurse per nesting level; brackets nested past the interpreter's limit end
#: in RecursionError, which is bad input like any other.
_TOO_DEEP = "nested too deeply"


#: Deepest YAML nesting accepted (manifests nest a dozen levels). The pure-Python scanner
#: re-checks every open flow level per token, so 5 000 "[" cost seconds (bench/fuzz found it).
MAX_YAML_DEPTH = 100


class _NoAliasLoader(yaml.SafeLoader):
    _depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_YAML_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases are not allowed", event.start_mark,
            )
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_object(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise DecodeError(f"{where}: expected an object, got {type(doc).__name__}")
    return doc


def load_documents(text: str, source: str = "<input>") -> list[dict[str, Any]]:
    """Every object of a multi-document YAML (or JSON) stream; empty documents are skipped
    and a C{kind: List} is expanded into its items, as kubectl does."""
    stripped = text.lstrip()
    docs: list[Any]
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError as e:
            raise DecodeError(f"error parsing {source}: {e}") from None
        except RecursionError:
            raise DecodeError(f"error parsing {source}: {_TOO_DEEP}") from None
        docs = parsed if isinstance(parsed, list) else [parsed]
    else:
        try:
            docs = list(yaml.load_all(text, Loader=_NoAliasLoader))
        except yaml.YAMLError as e:
            raise DecodeError(f"error parsing {source}: {e}") from None
        except RecursionError:
            raise DecodeError(f"error parsing {source}: {_TOO_DEEP}") from None
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        obj = _check_object(doc, f"{source} document {i}")
        if obj.get("kind") == "List" and isinstance(obj.get("items"), list):
            out.extend(_check_object(item, f"{source} List item") for item in obj["items"])
        else:
            out.append(obj)
    return out


def load_body(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    """One object from a request body; YAML when the content type says so."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("request body is not UTF-8") from None
    media = content_type.split(";")[0].strip().lower()
    if "yaml" in media:
        try:
            docs = [d for d in yaml.load_all(text, Loader=_NoAliasLoader) if d is not None]
        except yaml.YAMLError as e:
            raise DecodeError(f"error decoding YAML: {e}") from None
        except RecursionError:
            raise DecodeError(f"error decoding YAML: {_TOO_DEEP}") from None
        if len(docs) != 1:
            raise DecodeError(f"expected exactly one YAML document, got {len(docs)}")
        return _check_object(docs[0], "request body")
    try:
        parsed = json.loads(text)
    except ValueError as e:
        raise DecodeError(f"error decoding JSON: {e}") from None
    except RecursionError:
        raise DecodeError(f"error decoding JSON: {_TOO_DEEP}") from None
    return _check_object(parsed, "request body")
