# -*- test-case-name: tests.management.test_cli -*-
"""C{sidero}: apply, get, describe, delete and edit resources, accept, cordon and reboot
servers, follow their logs, like kubectl.

It talks to the running service over its local management socket (see
L{sidero.management.server}); being allowed to open that socket is being allowed in. With
C{--kubeconfig} (or C{$KUBECONFIG} when no management socket exists) the same commands go to a
Kubernetes API server instead (L{sidero.management.kubeclient}). Output and error messages
follow kubectl's so that runbooks written for a Kubernetes install read the same here.
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
from sidero.management.template import Template, TemplateError
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


OUTPUT_FORMATS = "json,jsonpath,name,wide,yaml"


def _targets(kind_arg: str, names: list[str]) -> list[tuple[ResourceType, list[str]]]:
    """What C{get}/C{describe} were asked for: C{KIND[,KIND...] [NAME...]} or
    C{KIND/NAME [KIND/NAME...]}; kinds in the order given, each once."""
    groups: dict[str, tuple[ResourceType, list[str]]] = {}

    def add(kind_text: str, found: list[str]) -> None:
        try:
            kind = registry.by_name(kind_text)
        except UnknownKind as e:
            raise CLIError(str(e)) from None
        groups.setdefault(kind.resource, (kind, []))[1].extend(found)

    if "/" in kind_arg:
        for arg in [kind_arg, *names]:
            kind_text, slash, name = arg.partition("/")
            if not slash or not name or not kind_text:
                raise CLIError("there is no need to specify a resource type as a separate "
                               "argument when passing arguments in resource/name form")
            add(kind_text, [name])
        return list(groups.values())
    kinds = [k for k in kind_arg.split(",") if k]
    if not kinds:
        raise CLIError("you must specify the type of resource to get")
    for kind_text in kinds:
        add(kind_text, list(names))
    return list(groups.values())


def _fetch(client: ManagementClient, kind: ResourceType, names: list[str], ns: str | None,
           args: argparse.Namespace, err: TextIO) -> tuple[list[Object], int]:
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
        selector = getattr(args, "selector", None)
        fields = getattr(args, "field_selector", None)
        objects = client.list(kind, ns, selector, fields).get("items", [])
    return objects, status


def _output_format(value: str | None) -> tuple[str, Template | None]:
    """The output name and, for C{jsonpath=TEMPLATE}, the parsed template (before any fetch)."""
    output = value or ""
    if output.startswith("jsonpath"):
        _, eq, source = output.partition("=")
        if not eq or not source:
            raise CLIError("template format specified but no template given")
        try:
            return "jsonpath", Template(source)
        except TemplateError as e:
            raise CLIError(f"error parsing jsonpath {source}, {e}") from None
    if output not in ("", "wide", "yaml", "json", "name"):
        raise CLIError(
            f'unable to match a printer suitable for the output format "{output}", allowed '
            f"formats are: {OUTPUT_FORMATS}"
        )
    return output, None


def cmd_get(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    targets = _targets(args.kind, list(args.names))
    by_name = any(names for _, names in targets)
    if by_name and args.all_namespaces:
        raise CLIError("a resource cannot be retrieved by name across all namespaces")
    if by_name and (args.selector or args.field_selector):
        raise CLIError("when retrieving resources by name, a selector cannot be used")
    output, template = _output_format(args.output)
    several = len(targets) > 1
    status = 0
    fetched: list[tuple[ResourceType, list[Object], str | None]] = []
    for kind, names in targets:
        ns = _namespace(kind, args)
        objects, failed = _fetch(client, kind, names, ns, args, err)
        status |= failed
        fetched.append((kind, objects, ns))
    everything = [obj for _, objects, _ in fetched for obj in objects]
    if output in ("", "wide"):
        printed = 0
        for kind, objects, _ns in fetched:
            if not objects:
                continue
            rows = printers.table(kind, objects, wide=output == "wide", no_headers=args.no_headers,
                                  with_namespace=kind.namespaced and args.all_namespaces)
            if several:  # kubectl names each row kind/name when several kinds are listed
                for row in rows[0 if args.no_headers else 1:]:
                    i = 1 if kind.namespaced and args.all_namespaces else 0
                    row[i] = f"{printers.resource_prefix(kind)}/{row[i]}"
            if printed:
                out.write("\n")
            out.write(printers.tabwrite(rows))
            printed += 1
        if not printed and status == 0:
            ns = fetched[0][2] if len(fetched) == 1 else None
            where = f" in {ns} namespace." if ns is not None else ""
            err.write(f"No resources found{where}\n")
        return status
    single = len(targets) == 1 and len(targets[0][1]) == 1
    if not everything and by_name:
        return status
    doc: Any = everything[0] if single and everything else printers.as_list(everything)
    if output == "yaml":
        out.write(printers.to_yaml(doc))
    elif output == "json":
        out.write(printers.to_json(doc))
    elif output == "name":
        for kind, objects, _ in fetched:
            for obj in objects:
                out.write(printers.name_of(kind, obj) + "\n")
    else:
        assert template is not None
        out.write(template.render(doc))
    return status


def _events_for(client: ManagementClient, kind: ResourceType, obj: Object) -> list[Object]:
    """The Events whose involvedObject is C{obj} (any namespace: cluster-scoped objects have
    theirs in C{default})."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    try:
        items = client.list(registry.EVENT, None, None, f"involvedObject.name={name}").get("items", [])
    except StoreError:
        return []
    uid = meta.get("uid")
    found = []
    for event in items:
        ref = event.get("involvedObject") or {}
        if ref.get("kind") != kind.kind or ref.get("name") != name:
            continue
        if uid and ref.get("uid") and ref.get("uid") != uid:
            continue
        if kind.namespaced and ref.get("namespace") != meta.get("namespace"):
            continue
        found.append(event)
    return found


def cmd_describe(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    from sidero.management.describe import describe_object

    status = 0
    first = True
    for kind, names in _targets(args.kind, list(args.names)):
        ns = _namespace(kind, args)
        objects, failed = _fetch(client, kind, names, ns, args, err)
        status |= failed
        for obj in objects:
            timeline = None
            if kind is registry.SERVER:
                timeline = client_timeline(client, str((obj.get("metadata") or {}).get("name", "")))
            if not first:
                out.write("\n\n")
            first = False
            out.write(describe_object(obj, _events_for(client, kind, obj), timeline))
        if not objects and not names and status == 0:
            where = f" in {ns} namespace." if ns is not None else ""
            err.write(f"No resources found{where}\n")
    return status


def client_timeline(client: ManagementClient, name: str) -> list[Object] | None:
    """The service's boot timeline of a server, or None where the service cannot be asked
    (a Kubernetes API server holds no timeline)."""
    fetch = getattr(client, "timeline", None)
    if fetch is None:
        return None
    try:
        result: list[Object] | None = fetch(name)
        return result
    except StoreError:
        return None


def _server_flag(client: ManagementClient, names: list[str], field: str, value: bool,
                 verb: str, out: TextIO, err: TextIO) -> int:
    """Set C{spec.<field>} of each server (accept, cordon, uncordon), kubectl cordon style."""
    if not names:
        raise CLIError("you must specify at least one server")
    status = 0
    for name in names:
        kind, server = registry.SERVER, name
        if "/" in name:
            kind_text, _, server = name.partition("/")
            if registry.by_name(kind_text) is not registry.SERVER:
                raise CLIError(f"{verb} works on servers, not {kind_text}")
        try:
            obj = client.get(kind, server)
            label = printers.name_of(kind, obj)
            if bool((obj.get("spec") or {}).get(field)) is value:
                out.write(f"{label} already {verb}\n")
                continue
            client.patch(kind, server, {"spec": {field: value}})
        except StoreError as e:
            err.write(format_error(e) + "\n")
            status = 1
            continue
        out.write(f"{label} {verb}\n")
    return status


def cmd_accept(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    return _server_flag(client, list(args.names), "accepted", True, "accepted", out, err)


def cmd_cordon(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    return _server_flag(client, list(args.names), "cordoned", True, "cordoned", out, err)


def cmd_uncordon(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    return _server_flag(client, list(args.names), "cordoned", False, "uncordoned", out, err)


def cmd_reboot(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    """Power cycle servers through their BMC or power API, with the service's power code."""
    from sidero.management.power import reboot_servers

    if not args.names:
        raise CLIError("you must specify at least one server")
    status = 0
    for name, error in reboot_servers(client, [n.rpartition("/")[2] for n in args.names],
                                      pxe=args.pxe, timeout=args.timeout):
        label = f"{printers.resource_prefix(registry.SERVER)}/{name}"
        if error is None:
            out.write(f"{label} rebooted" + (" (next boot from the network)" if args.pxe else "")
                      + "\n")
        else:
            err.write(f"error: {label}: {error}\n")
            status = 1
    return status


def cmd_logs(args: argparse.Namespace, client: ManagementClient, out: TextIO, err: TextIO) -> int:
    """The kernel and agent log lines the service holds for a server; -f follows new ones."""
    name = args.server.rpartition("/")[2]
    client.get(registry.SERVER, name)  # kubectl's NotFound for a server that does not exist
    try:
        for line in client.logs(name, follow=args.follow, tail=args.tail):
            out.write(line + "\n")
            out.flush()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
    return 0


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
    common.add_argument("--kubeconfig", dest="kubeconfig_sub", metavar="PATH", default=None,
                        help="talk to this Kubernetes API server instead of the socket")
    common.add_argument("-n", "--namespace", default=None, help="namespace (default: default)")

    parser = argparse.ArgumentParser(
        prog="sidero", description="Manage the resources of a sidero service (its management "
        "socket, or with --kubeconfig the Kubernetes API server it uses).",
    )
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help=f"management socket (default: ${SOCKET_ENV} or {default_socket_path({})})")
    parser.add_argument("--kubeconfig", metavar="PATH", default=None,
                        help="use this kubeconfig (default when no management socket exists: "
                        "$KUBECONFIG, or the in-cluster service account)")
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
    p.add_argument("-o", "--output", default=None,
                   help="wide, yaml, json, name or jsonpath=TEMPLATE")
    p.add_argument("--no-headers", action="store_true")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("describe", parents=[common],
                       help="show a resource in detail, with its events (and a server's boot timeline)")
    p.add_argument("kind", metavar="KIND")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-l", "--selector", default=None, help="label selector")
    p.set_defaults(func=cmd_describe)

    for verb, func, text in (("accept", cmd_accept, "accept servers (spec.accepted)"),
                             ("cordon", cmd_cordon, "keep servers from being allocated"),
                             ("uncordon", cmd_uncordon, "let cordoned servers be allocated again")):
        p = sub.add_parser(verb, parents=[common], help=text)
        p.add_argument("names", nargs="*", metavar="SERVER")
        p.set_defaults(func=func)

    p = sub.add_parser("logs", parents=[common], help="print a server's log lines; -f follows")
    p.add_argument("server", metavar="SERVER")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines kept")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("reboot", parents=[common],
                       help="power cycle servers through their BMC or power API")
    p.add_argument("names", nargs="*", metavar="SERVER")
    p.add_argument("--pxe", action="store_true", help="make the next boot a PXE boot first")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per server (default 60)")
    p.set_defaults(func=cmd_reboot)

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


def make_client(args: argparse.Namespace, environ: Any = None) -> ManagementClient:
    """The management socket unless a kubeconfig is asked for: explicitly (C{--kubeconfig}),
    or implicitly when no socket was named and none exists but C{$KUBECONFIG} or an in-cluster
    service account does (the service's own C{--store auto} rule)."""
    environ = os.environ if environ is None else environ
    socket_path = args.socket_sub or args.socket
    kubeconfig = args.kubeconfig_sub or args.kubeconfig
    if socket_path:
        return ManagementClient(socket_path)
    if kubeconfig:
        from sidero.management.kubeclient import KubeClient

        return KubeClient(kubeconfig)
    socket_path = default_socket_path()
    if not environ.get(SOCKET_ENV) and not os.path.exists(socket_path) and (
            environ.get("KUBECONFIG") or environ.get("KUBERNETES_SERVICE_HOST")):
        from sidero.management.kubeclient import KubeClient

        return KubeClient(None)
    return ManagementClient(socket_path)


def main(argv: Sequence[str] | None = None) -> int:
    from sidero.k8s.errors import KubeconfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        client = make_client(args)
    except KubeconfigError as e:
        err.write(f"error: {e}\n")
        return 1
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
