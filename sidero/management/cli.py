# -*- test-case-name: tests.management.test_cli -*-
"""C{sidero}: apply, get, delete and edit resources of the embedded store, like kubectl.

It talks to the running service over its local management socket (see
L{sidero.management.server}); being allowed to open that socket is being allowed in.  Output
and error messages follow kubectl's so that runbooks written for a Kubernetes install read
the same here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from sidero.api import registry
from sidero.api.registry import ResourceType, UnknownKind
from sidero.management import printers
from sidero.management.client import ManagementClient, ServiceUnreachable
from sidero.management.codec import DecodeError, load_documents
from sidero.management.common import SOCKET_ENV, default_socket_path, merge_patch
from sidero.store.errors import Invalid, NotFound, StoreError

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
EDIT_HEADER = (
    "# Please edit the object below. Lines beginning with a '#' will be ignored,\n"
    "# and an empty file will abort the edit. If an error occurs while saving this file will be\n"
    "# reopened with the relevant failures.\n"
    "#\n"
)

Object = dict[str, Any]


class CLIError(Exception):
    """A usage or input problem, printed as C{error: ...}."""


# --- error rendering ----------------------------------------------------------------------------


def format_error(err: StoreError) -> str:
    """What kubectl prints for an API failure (C{cmdutil.CheckErr})."""
    if isinstance(err, Invalid):
        details = err.details or {}
        causes = err.causes
        if details.get("kind") or details.get("name"):
            head = f'The {details.get("kind", "")} "{details.get("name", "")}" is invalid'
        else:
            head = "The request is invalid"
            if err.message and not causes:
                head += ": " + err.message
        if not causes:
            return head
        lines = [f"{c['field']}: {c['message']}" if c.get("field") else c.get("message", "")
                 for c in causes]
        if len(lines) == 1:
            return f"{head}: {lines[0]}"
        return f"{head}: \n" + "\n".join(f"* {line}" for line in lines)
    if err.reason:
        return f"Error from server ({err.reason}): {err.message}"
    return f"Error from server: {err.message}"


def unreachable_message(e: ServiceUnreachable) -> str:
    hint = (f"is the sidero service running? Pass --socket PATH (or set {SOCKET_ENV}) "
            "to the socket it serves")
    if e.why == "permission denied":
        hint = ("run as the service user, or as a member of the socket's group")
    return f"error: cannot connect to the sidero management socket {e.path}: {e.why}; {hint}"


# --- manifests ----------------------------------------------------------------------------------


def read_manifests(paths: Sequence[str], stdin: TextIO) -> Iterator[tuple[str, Object]]:
    """C{(source, object)} for every object in the files, directories (their .yaml/.yml/.json
    files, sorted, not recursive, as kubectl without -R) or C{-} (standard input)."""
    for path in paths:
        if path == "-":
            sources = [("-", stdin.read())]
        elif os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.endswith(MANIFEST_SUFFIXES))
            sources = [(os.path.join(path, n), _read(os.path.join(path, n))) for n in names]
        else:
            sources = [(path, _read(path))]
        for source, text in sources:
            try:
                docs = load_documents(text, source)
            except DecodeError as e:
                raise CLIError(str(e)) from None
            for doc in docs:
                yield source, doc


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CLIError(f'the path "{path}" cannot be read: {e.strerror}') from None
    except UnicodeDecodeError:
        raise CLIError(f'the path "{path}" is not UTF-8 text') from None


def kind_of(obj: Object, source: str) -> ResourceType:
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    name = (obj.get("metadata") or {}).get("name", "")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not api_version or not kind:
        raise CLIError(f'error validating "{source}": apiVersion and kind must be set ({name!r})')
    try:
        return registry.by_api_version_kind(api_version, kind)
    except UnknownKind:
        raise CLIError(
            f'resource mapping not found for name: "{name}" namespace: "" from "{source}": '
            f'no matches for kind "{kind}" in version "{api_version}"'
        ) from None


def _place(kind: ResourceType, obj: Object, default_namespace: str) -> Object:
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise CLIError("metadata must be a mapping")
    if kind.namespaced:
        if not meta.get("namespace"):
            meta["namespace"] = default_namespace
    else:
        meta.pop("namespace", None)
    return meta


def _api_version_of(obj: Object) -> str:
    return registry.split_api_version(obj["apiVersion"])[1]


def three_way_patch(original: Object, modified: Object, current: Object) -> Object:
    """kubectl's three-way JSON merge patch: set what the manifest says where the live object
    differs, and delete what the previous apply set but the manifest no longer has."""
    patch: Object = {}
    for key in original:
        if key not in modified and key in current:
            patch[key] = None
    for key, value in modified.items():
        if value is None:
            if key in current:
                patch[key] = None
            continue
        live = current.get(key)
        if isinstance(value, dict) and isinstance(live, dict):
            before = original.get(key)
            sub = three_way_patch(before if isinstance(before, dict) else {}, value, live)
            if sub:
                patch[key] = sub
        elif key not in current or live != value:
            patch[key] = value
    return patch


def apply_one(client: ManagementClient, kind: ResourceType, obj: Object, default_namespace: str) -> str:
    """Create or update one object; the kubectl verb for what happened."""
    obj = copy.deepcopy(obj)
    meta = _place(kind, obj, default_namespace)
    name = meta.get("name")
    if not name:
        raise CLIError("resource name may not be empty")
    if kind.status_subresource:
        obj.pop("status", None)  # the server would ignore it; don't report a change for it
    annotations = meta.get("annotations") or {}
    annotations.pop(LAST_APPLIED, None)
    meta["annotations"] = annotations
    applied = copy.deepcopy(obj)
    if not annotations:
        applied["metadata"].pop("annotations")
    annotations[LAST_APPLIED] = json.dumps(applied, sort_keys=True, separators=(",", ":")) + "\n"
    version = _api_version_of(obj)
    for _attempt in range(3):
        try:
            current = client.get(kind, name, meta.get("namespace"), version)
        except NotFound:
            client.create(kind, obj)
            return "created"
        previous_text = ((current.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
        try:
            previous = json.loads(previous_text) if previous_text else {}
        except ValueError:
            previous = {}
        patch = three_way_patch(previous if isinstance(previous, dict) else {}, obj, current)
        if not patch:
            return "unchanged"
        merged = merge_patch(current, patch)
        merged["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion", "")
        try:
            client.update(kind, merged)
        except StoreError as e:
            if e.reason == "Conflict" and "resourceVersion" not in patch.get("metadata", {}):
                continue  # changed between our read and write: recompute against the new state
            raise
        return "configured"
    raise CLIError(f"{printers.name_of(kind, obj)} kept changing while it was being applied")


# --- commands -----------------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    if not args.filename:
        raise CLIError("must specify one of -f and -k")
    status = 0
    for source, obj in read_manifests(args.filename, sys.stdin):
        try:
            kind = kind_of(obj, source)
            verb = apply_one(client, kind, obj, args.namespace or "default")
        except CLIError as e:
            err.write(f"error: {e}\n")
            status = 1
            continue
        except StoreError as e:
            err.write(format_error(e) + "\n")
            status = 1
            continue
        out.write(f"{printers.name_of(kind, obj)} {verb}\n")
    return status


def _split_kind_names(kind_arg: str, names: list[str]) -> tuple[ResourceType, list[str]]:
    if "/" in kind_arg and not names:
        kind_text, _, name = kind_arg.partition("/")
        names = [name]
    else:
        kind_text = kind_arg
    try:
        kind = registry.by_name(kind_text)
    except UnknownKind as e:
        raise CLIError(str(e)) from None
    return kind, names


def _namespace(kind: ResourceType, args: argparse.Namespace) -> str | None:
    if not kind.namespaced:
        return None
    if getattr(args, "all_namespaces", False):
        return None
    return args.namespace or "default"


def cmd_get(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    kind, names = _split_kind_names(args.kind, list(args.names))
    if names and args.all_namespaces:
        raise CLIError("a resource cannot be retrieved by name across all namespaces")
    if names and (args.selector or args.field_selector):
        raise CLIError("when retrieving resources by name, a selector cannot be used")
    ns = _namespace(kind, args)
    status = 0
    objects: list[Object] = []
    if names:
        for name in names:
            try:
                objects.append(client.get(kind, name, ns))
            except StoreError as e:
                err.write(format_error(e) + "\n")
                status = 1
    else:
        objects = client.list(kind, ns, args.selector, args.field_selector).get("items", [])
    output = args.output or ""
    if output in ("", "wide"):
        if not objects:
            if status == 0:
                where = f" in {ns} namespace." if ns is not None else ""
                err.write(f"No resources found{where}\n")
            return status
        rows = printers.table(kind, objects, wide=output == "wide", no_headers=args.no_headers,
                              with_namespace=kind.namespaced and args.all_namespaces)
        out.write(printers.tabwrite(rows))
    elif output in ("yaml", "json"):
        if not objects and names:
            return status
        doc: Any = objects[0] if names and len(names) == 1 else printers.as_list(objects)
        out.write(printers.to_yaml(doc) if output == "yaml" else printers.to_json(doc))
    elif output == "name":
        for obj in objects:
            out.write(printers.name_of(kind, obj) + "\n")
    else:
        raise CLIError(
            f'unable to match a printer suitable for the output format "{output}", allowed '
            "formats are: json,name,wide,yaml"
        )
    return status


def _deleted(kind: ResourceType, name: str) -> str:
    return f'{printers.resource_prefix(kind)} "{name}" deleted\n'


def cmd_delete(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    targets: list[tuple[ResourceType, str, str | None]] = []
    if args.filename:
        if args.kind:
            raise CLIError("resource(s) were provided, but no name was specified")
        for source, obj in read_manifests(args.filename, sys.stdin):
            kind = kind_of(obj, source)
            meta = _place(kind, obj, args.namespace or "default")
            targets.append((kind, str(meta.get("name", "")), meta.get("namespace")))
    else:
        if not args.kind:
            raise CLIError("You must provide one or more resources by argument or filename.")
        kind, names = _split_kind_names(args.kind, list(args.names))
        ns = _namespace(kind, args)
        if args.selector or args.all:
            if names:
                raise CLIError("name cannot be provided when a selector is specified")
            items = client.list(kind, ns, args.selector or None).get("items", [])
            names_ns = [((i.get("metadata") or {}).get("name", ""), (i.get("metadata") or {}).get("namespace"))
                        for i in items]
            if not names_ns:
                where = f" in {ns} namespace." if ns is not None else ""
                err.write(f"No resources found{where}\n")
            targets.extend((kind, n, s) for n, s in names_ns)
        elif not names:
            raise CLIError('resource(s) were provided, but no name was specified')
        else:
            targets.extend((kind, n, ns) for n in names)
    status = 0
    for kind, name, ns in targets:
        try:
            client.delete(kind, name, ns)
        except StoreError as e:
            if args.ignore_not_found and isinstance(e, NotFound):
                continue
            err.write(format_error(e) + "\n")
            status = 1
            continue
        out.write(_deleted(kind, name))
    return status


def _editor() -> list[str]:
    for var in ("SIDERO_EDITOR", "VISUAL", "EDITOR"):
        value = os.environ.get(var, "").strip()
        if value:
            return shlex.split(value)
    return ["vi"]


def _strip_comments(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("#"))


def _error_comment(kind: ResourceType, name: str, e: Exception) -> str:
    if isinstance(e, Invalid) and e.causes:
        lines = [f"{c['field']}: {c['message']}" if c.get("field") else c.get("message", "")
                 for c in e.causes]
    elif isinstance(e, StoreError):
        lines = [f"{e.reason}: {e.message}"]
    else:
        lines = [str(e)]
    body = "".join(f"# * {line}\n" for line in lines)
    return f'# {kind.resource} "{name}" was not valid:\n{body}#\n'


def cmd_edit(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    kind, names = _split_kind_names(args.kind, list(args.names))
    if len(names) != 1:
        raise CLIError("edit needs exactly one KIND NAME")
    name = names[0]
    ns = _namespace(kind, args)
    original = client.get(kind, name, ns)
    original_text = printers.to_yaml(original)
    content = original_text
    error_block = ""
    last_failed: str | None = None
    fd, path = tempfile.mkstemp(prefix="sidero-edit-", suffix=".yaml")
    os.close(fd)
    keep = False
    try:
        while True:
            with open(path, "w", encoding="utf-8") as f:
                f.write(EDIT_HEADER + error_block + content)
            try:
                rc = subprocess.call([*_editor(), path])
            except OSError as e:
                raise CLIError(f"cannot run the editor: {e.strerror}") from None
            if rc != 0:
                raise CLIError(f"the editor exited with status {rc}; no changes were made")
            with open(path, encoding="utf-8") as f:
                edited_text = _strip_comments(f.read())
            if not edited_text.strip():
                err.write("Edit cancelled, saved file was empty.\n")
                return 0
            if edited_text == original_text and last_failed is None:
                err.write("Edit cancelled, no changes made.\n")
                return 0
            if last_failed is not None and edited_text == last_failed:
                keep = True
                err.write(f'A copy of your changes has been stored to "{path}"\n')
                raise CLIError("Edit cancelled, no valid changes were saved.")
            try:
                docs = load_documents(edited_text, path)
                if len(docs) != 1:
                    raise CLIError("the edited file must hold exactly one object")
                edited = docs[0]
                for key in ("apiVersion", "kind"):
                    if edited.get(key) != original.get(key):
                        raise CLIError("At least one of apiVersion, kind and name was changed")
                emeta = edited.get("metadata") or {}
                ometa = original.get("metadata") or {}
                if emeta.get("name") != ometa.get("name") or emeta.get("namespace") != ometa.get("namespace"):
                    raise CLIError("At least one of apiVersion, kind and name was changed")
                patch = create_merge_patch(original, edited)
                if not patch:
                    err.write("Edit cancelled, no changes made.\n")
                    return 0
                client.patch(kind, name, patch, ns)
            except (DecodeError, CLIError, StoreError) as e:
                last_failed = edited_text
                content = edited_text
                error_block = _error_comment(kind, name, e)
                continue
            out.write(f"{printers.name_of(kind, original)} edited\n")
            return 0
    finally:
        if not keep:
            try:
                os.unlink(path)
            except OSError:
                pass


def create_merge_patch(original: Any, modified: Any) -> Any:
    """The RFC 7386 patch turning C{original} into C{modified} (lists replace whole)."""
    if not isinstance(original, dict) or not isinstance(modified, dict):
        return modified
    patch: Object = {}
    for key in original:
        if key not in modified:
            patch[key] = None
    for key, value in modified.items():
        if key not in original:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(original[key], dict):
            sub = create_merge_patch(original[key], value)
            if sub:
                patch[key] = sub
        elif value != original[key]:
            patch[key] = value
    return patch


# --- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", dest="socket_sub", metavar="PATH", default=None,
                        help=f"management socket (default: ${SOCKET_ENV} or the service default)")
    common.add_argument("-n", "--namespace", default=None, help="namespace (default: default)")

    parser = argparse.ArgumentParser(
        prog="sidero", description="Manage the resources of an embedded-mode sidero service.",
    )
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help=f"management socket (default: ${SOCKET_ENV} or {default_socket_path({})})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("apply", parents=[common], help="create or update resources from manifests")
    p.add_argument("-f", "--filename", action="append", default=[], metavar="FILE",
                   help="file, directory or - for standard input (repeatable)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("get", parents=[common], help="list or show resources")
    p.add_argument("kind", metavar="KIND")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", default=None, help="label selector")
    p.add_argument("--field-selector", default=None)
    p.add_argument("-o", "--output", default=None, help="wide, yaml, json or name")
    p.add_argument("--no-headers", action="store_true")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", parents=[common], help="delete resources")
    p.add_argument("kind", nargs="?", metavar="KIND")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-f", "--filename", action="append", default=[], metavar="FILE")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", default=None)
    p.add_argument("--all", action="store_true", help="delete every resource of the kind")
    p.add_argument("--ignore-not-found", action="store_true")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("edit", parents=[common], help="edit a resource in $EDITOR")
    p.add_argument("kind", metavar="KIND")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.set_defaults(func=cmd_edit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    socket_path = args.socket_sub or args.socket or default_socket_path()
    client = ManagementClient(socket_path)
    out, err = sys.stdout, sys.stderr
    try:
        code: int = args.func(args, client, out, err)
        return code
    except ServiceUnreachable as e:
        err.write(unreachable_message(e) + "\n")
    except StoreError as e:
        err.write(format_error(e) + "\n")
    except CLIError as e:
        err.write(f"error: {e}\n")
    except KeyboardInterrupt:
        err.write("interrupted\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
