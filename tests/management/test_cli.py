"""The C{sidero} command run as a real subprocess against a real management socket."""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any

import yaml
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase

from sidero.management.cli import create_merge_patch, format_error, three_way_patch
from sidero.store.errors import Invalid, NotFound, StoreError, invalid, not_found
from tests.management.fixtures import ServerTestCase, server_manifest
from tests.paths import REPO

SERVERS_YAML = """\
apiVersion: metal.sidero.dev/v1alpha2
kind: Server
metadata:
  name: s1
  labels:
    rack: a
spec:
  hostname: node-1
  accepted: true
---
# an empty document is skipped
---
apiVersion: metal.sidero.dev/v1alpha2
kind: Server
metadata:
  name: s2
  labels:
    rack: b
spec:
  accepted: false
  bmc:
    endpoint: 10.0.0.5
"""

MACHINE_YAML = """\
apiVersion: infrastructure.cluster.x-k8s.io/v1alpha3
kind: MetalMachine
metadata:
  name: mm1
  namespace: ns1
  labels:
    cluster.x-k8s.io/cluster-name: c1
spec:
  serverRef:
    name: s1
"""


class CLITestCase(ServerTestCase):
    def write(self, name: str, text: str, mode: int = 0o644) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    async def sidero(self, *args: str, env: dict[str, str] | None = None,
                  shell: str | None = None) -> tuple[str, str, int]:
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("VISUAL", "EDITOR", "SIDERO_EDITOR", "SIDERO_MANAGEMENT_SOCKET")}
        environ["PYTHONPATH"] = str(REPO)
        environ["SIDERO_MANAGEMENT_SOCKET"] = self.socket_path
        environ.update(env or {})
        if shell is not None:
            argv = ["-c", shell]
            exe = "/bin/sh"
        else:
            argv = ["-m", "sidero.management.cli", *args]
            exe = sys.executable
        out, err, code = await getProcessOutputAndValue(exe, argv, env=environ, path=str(REPO))
        return out.decode(), err.decode(), code

    async def apply_fixtures(self) -> None:
        out, err, code = await self.sidero("apply", "-f", self.write("servers.yaml", SERVERS_YAML))
        self.assertEqual(code, 0, err)

    def cli(self) -> str:
        return f"{sys.executable} -m sidero.management.cli"


class ApplyTests(CLITestCase):
    async def test_apply_created_unchanged_configured(self) -> None:
        """apply creates, reports unchanged when re-applied, and configured after a change."""
        path = self.write("servers.yaml", SERVERS_YAML)
        out, err, code = await self.sidero("apply", "-f", path)
        self.assertEqual((out, code), ("server.metal.sidero.dev/s1 created\nserver.metal.sidero.dev/s2 created\n", 0), err)
        out, _, code = await self.sidero("apply", "-f", path)
        self.assertEqual((out, code), ("server.metal.sidero.dev/s1 unchanged\nserver.metal.sidero.dev/s2 unchanged\n", 0))
        self.write("servers.yaml", SERVERS_YAML.replace("hostname: node-1", "hostname: node-1b"))
        out, _, code = await self.sidero("apply", "-f", path)
        self.assertEqual(out, "server.metal.sidero.dev/s1 configured\nserver.metal.sidero.dev/s2 unchanged\n")
        got = await self.store.get(__import__("sidero.api.registry", fromlist=["SERVER"]).SERVER, "s1")
        self.assertEqual(got["spec"]["hostname"], "node-1b")

    async def test_apply_removes_fields_dropped_from_manifest(self) -> None:
        """A label the previous apply set and the manifest no longer has is removed."""
        path = self.write("servers.yaml", SERVERS_YAML)
        await self.sidero("apply", "-f", path)
        self.write("servers.yaml", SERVERS_YAML.replace("  labels:\n    rack: a\n", ""))
        out, _, _ = await self.sidero("apply", "-f", path)
        self.assertIn("server.metal.sidero.dev/s1 configured", out)
        from sidero.api.registry import SERVER
        got = await self.store.get(SERVER, "s1")
        self.assertNotIn("rack", got["metadata"].get("labels") or {})

    async def test_apply_directory_and_stdin(self) -> None:
        """-f DIR applies every manifest in it; -f - reads standard input."""
        d = os.path.join(self.tmp, "manifests")
        os.mkdir(d)
        with open(os.path.join(d, "a.yaml"), "w") as f:
            f.write(SERVERS_YAML)
        with open(os.path.join(d, "ignored.txt"), "w") as f:
            f.write("not a manifest")
        out, err, code = await self.sidero("apply", "-f", d)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count("created"), 2)
        m = self.write("machine.yaml", MACHINE_YAML)
        out, err, code = await self.sidero(shell=f"{self.cli()} apply -f - < {m}")
        self.assertEqual((out, code), ("metalmachine.infrastructure.cluster.x-k8s.io/mm1 created\n", 0), err)

    async def test_apply_invalid_object_prints_kubectl_message(self) -> None:
        """An object the admission rejects prints kubectl's 'is invalid' message and exits 1."""
        bad = self.write("bad.yaml", yaml.safe_dump(server_manifest("bad", accepted="yes")))
        out, err, code = await self.sidero("apply", "-f", bad)
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertTrue(err.startswith('The Server "bad" is invalid: spec.accepted: Invalid value'), err)

    async def test_apply_malformed_and_unknown_kind(self) -> None:
        """Unparsable YAML and unknown kinds are clear errors that change nothing."""
        broken = self.write("broken.yaml", "apiVersion: v1\nkind: [unclosed\n")
        _, err, code = await self.sidero("apply", "-f", broken)
        self.assertEqual(code, 1)
        self.assertIn("error parsing", err)
        unknown = self.write("unknown.yaml", "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
        _, err, code = await self.sidero("apply", "-f", unknown)
        self.assertEqual(code, 1)
        self.assertIn('no matches for kind "Widget" in version "example.com/v1"', err)
        _, err, code = await self.sidero("apply", "-f", os.path.join(self.tmp, "missing.yaml"))
        self.assertEqual(code, 1)
        self.assertIn("cannot be read", err)


class GetTests(CLITestCase):
    async def test_table_and_wide(self) -> None:
        """get prints the printer columns; -o wide adds BMC IP."""
        await self.apply_fixtures()
        out, err, code = await self.sidero("get", "servers")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "HOSTNAME", "ACCEPTED", "CORDONED", "ALLOCATED", "CLEAN", "POWER", "AGE"])
        self.assertEqual(lines[1].split()[:3], ["s1", "node-1", "true"])
        self.assertRegex(lines[1], r"\d+s$")
        out, _, _ = await self.sidero("get", "server", "-o", "wide")
        self.assertIn("BMC IP", out.splitlines()[0])
        self.assertIn("10.0.0.5", out)

    async def test_label_selector_and_names(self) -> None:
        """-l filters; names select objects; a missing name is reported like kubectl, exit 1."""
        await self.apply_fixtures()
        out, _, _ = await self.sidero("get", "servers", "-l", "rack=b", "-o", "name")
        self.assertEqual(out, "server.metal.sidero.dev/s2\n")
        out, _, _ = await self.sidero("get", "servers", "-l", "rack notin (b)", "-o", "name")
        self.assertEqual(out, "server.metal.sidero.dev/s1\n")
        out, err, code = await self.sidero("get", "server", "s1", "nope", "-o", "name")
        self.assertEqual((out, code), ("server.metal.sidero.dev/s1\n", 1))
        self.assertEqual(err, 'Error from server (NotFound): servers.metal.sidero.dev "nope" not found\n')

    async def test_yaml_and_json(self) -> None:
        """-o yaml prints one object; -o json of a list prints a v1 List."""
        await self.apply_fixtures()
        out, _, _ = await self.sidero("get", "server", "s1", "-o", "yaml")
        obj = yaml.safe_load(out)
        self.assertEqual((obj["kind"], obj["metadata"]["name"], obj["spec"]["hostname"]), ("Server", "s1", "node-1"))
        out, _, _ = await self.sidero("get", "servers", "-o", "json")
        lst = json.loads(out)
        self.assertEqual((lst["kind"], len(lst["items"])), ("List", 2))

    async def test_namespaces(self) -> None:
        """Namespaced kinds default to 'default'; -A adds the NAMESPACE column first."""
        await self.sidero("apply", "-f", self.write("m.yaml", MACHINE_YAML))
        out, err, code = await self.sidero("get", "metalmachines")
        self.assertEqual((out, err, code), ("", "No resources found in default namespace.\n", 0))
        out, _, _ = await self.sidero("get", "metalmachines", "-n", "ns1")
        self.assertEqual(out.splitlines()[0].split(), ["NAME", "READY", "AGE"])
        out, _, _ = await self.sidero("get", "metalmachines", "-A", "-o", "wide")
        header, row = out.splitlines()
        self.assertEqual(header.split()[:4], ["NAMESPACE", "NAME", "READY", "CLUSTER"])
        self.assertEqual(row.split()[:4], ["ns1", "mm1", "c1", "s1"])

    async def test_unknown_kind_and_bad_output(self) -> None:
        """An unknown kind and an unknown output format are errors with exit status 1."""
        _, err, code = await self.sidero("get", "widgets")
        self.assertEqual((err, code), ('error: the server doesn\'t have a resource type "widgets"\n', 1))
        _, err, code = await self.sidero("get", "servers", "-o", "xml")
        self.assertEqual(code, 1)
        self.assertIn("unable to match a printer", err)

    async def test_service_not_running(self) -> None:
        """With no socket, one clear line says the service is not running and how to point at it."""
        out, err, code = await self.sidero("--socket", os.path.join(self.tmp, "none.sock"), "get", "servers")
        self.assertEqual((out, code), ("", 1))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("cannot connect to the sidero management socket", err)
        self.assertIn("--socket PATH", err)

    async def test_socket_flag_overrides_environment(self) -> None:
        """--socket wins over SIDERO_MANAGEMENT_SOCKET."""
        out, err, code = await self.sidero("get", "servers", "--socket", self.socket_path,
                                        env={"SIDERO_MANAGEMENT_SOCKET": "/nonexistent/x.sock"})
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "No resources found\n")


class DeleteTests(CLITestCase):
    async def test_delete_by_name_and_file(self) -> None:
        """delete removes by name (kubectl wording) and by manifest; a second delete is NotFound."""
        await self.apply_fixtures()
        out, err, code = await self.sidero("delete", "server", "s1")
        self.assertEqual((out, code), ('server.metal.sidero.dev "s1" deleted\n', 0), err)
        out, err, code = await self.sidero("delete", "server", "s1")
        self.assertEqual((out, err, code), ("", 'Error from server (NotFound): servers.metal.sidero.dev "s1" not found\n', 1))
        out, _, code = await self.sidero("delete", "server", "s1", "--ignore-not-found")
        self.assertEqual((out, code), ("", 0))
        out, err, code = await self.sidero("delete", "-f", os.path.join(self.tmp, "servers.yaml"), "--ignore-not-found")
        self.assertEqual((out, code), ('server.metal.sidero.dev "s2" deleted\n', 0), err)
        self.assertEqual((await self.sidero("get", "servers"))[1], "No resources found\n")

    async def test_delete_by_selector(self) -> None:
        """delete -l removes only the matching objects."""
        await self.apply_fixtures()
        out, _, code = await self.sidero("delete", "servers", "-l", "rack=a")
        self.assertEqual((out, code), ('server.metal.sidero.dev "s1" deleted\n', 0))
        out, _, _ = await self.sidero("get", "servers", "-o", "name")
        self.assertEqual(out, "server.metal.sidero.dev/s2\n")


class EditTests(CLITestCase):
    async def test_edit_applies_editor_changes(self) -> None:
        """The editor's changes to the YAML are saved."""
        await self.apply_fixtures()
        editor = self.write("ed.sh", "#!/bin/sh\nsed -i 's/hostname: node-1/hostname: edited/' \"$1\"\n", 0o755)
        out, err, code = await self.sidero("edit", "server", "s1", env={"EDITOR": editor})
        self.assertEqual((out, code), ("server.metal.sidero.dev/s1 edited\n", 0), err)
        from sidero.api.registry import SERVER
        self.assertEqual((await self.store.get(SERVER, "s1"))["spec"]["hostname"], "edited")

    async def test_edit_without_changes(self) -> None:
        """Closing the editor without changes cancels the edit."""
        await self.apply_fixtures()
        out, err, code = await self.sidero("edit", "server", "s1", env={"EDITOR": "true"})
        self.assertEqual((out, err, code), ("", "Edit cancelled, no changes made.\n", 0))

    async def test_edit_reopens_with_error_then_succeeds(self) -> None:
        """An invalid edit reopens the file with the error as a comment; fixing it saves."""
        await self.apply_fixtures()
        log = os.path.join(self.tmp, "seen.txt")
        editor = self.write("ed.sh", f"""#!/bin/sh
if [ ! -e {log} ]; then
  sed -i 's/accepted: true/accepted: maybe/' "$1"
  echo first > {log}
else
  cat "$1" >> {log}
  sed -i 's/accepted: maybe/accepted: false/' "$1"
fi
""", 0o755)
        out, err, code = await self.sidero("edit", "server", "s1", env={"EDITOR": editor})
        self.assertEqual((out, code), ("server.metal.sidero.dev/s1 edited\n", 0), err)
        with open(log) as f:
            reopened = f.read()
        self.assertIn('# servers.metal.sidero.dev "s1" was not valid:', reopened)
        self.assertIn("# * spec.accepted:", reopened)
        self.assertIn("accepted: maybe", reopened)
        from sidero.api.registry import SERVER
        self.assertIs((await self.store.get(SERVER, "s1"))["spec"]["accepted"], False)

    async def test_edit_gives_up_when_error_not_fixed(self) -> None:
        """Saving the same invalid content again cancels with an error and keeps a copy."""
        await self.apply_fixtures()
        editor = self.write("ed.sh", "#!/bin/sh\nsed -i 's/accepted: true/accepted: maybe/' \"$1\"\n", 0o755)
        out, err, code = await self.sidero("edit", "server", "s1", env={"EDITOR": editor})
        self.assertEqual((out, code), ("", 1))
        self.assertIn("error: Edit cancelled, no valid changes were saved.", err)
        self.assertIn("A copy of your changes has been stored to", err)
        kept = err.split('"')[1]
        self.addCleanup(os.unlink, kept)
        self.assertTrue(os.path.exists(kept))

    async def test_edit_refuses_renaming(self) -> None:
        """Changing the name in the editor is refused (reopened, then cancelled)."""
        await self.apply_fixtures()
        editor = self.write("ed.sh", "#!/bin/sh\nsed -i 's/name: s1/name: other/' \"$1\"\n", 0o755)
        _, err, code = await self.sidero("edit", "server", "s1", env={"EDITOR": editor})
        self.assertEqual(code, 1)
        self.addCleanup(os.unlink, err.split('"')[1])
        from sidero.api.registry import SERVER
        await self.store.get(SERVER, "s1")


class SocketPermissionTests(CLITestCase):
    async def test_socket_is_owner_only(self) -> None:
        """The socket the CLI talks to is 0600 and the CLI works through it."""
        self.assertEqual(stat.S_IMODE(os.lstat(self.socket_path).st_mode), 0o600)
        _, err, code = await self.sidero("get", "servers")
        self.assertEqual(code, 0, err)

    async def test_permission_denied_message(self) -> None:
        """A user without access to the socket is told so, not that the service is down."""
        if os.getuid() != 0:
            self.skipTest("needs root to run the CLI as another user (nobody)")
        os.chmod(self.tmp, 0o711)  # others may reach the socket; only its own mode keeps them out
        out, err, code = await self.sidero(shell=f"setpriv --reuid=65534 --regid=65534 --clear-groups "
                                              f"{self.cli()} --socket {self.socket_path} get servers")
        if "setpriv" in err and "not found" in err:
            self.skipTest("setpriv is not installed")
        self.assertEqual(code, 1)
        self.assertIn(f"cannot connect to the sidero management socket {self.socket_path}: permission denied", err)


class PureHelperTests(SynchronousTestCase):
    def test_format_not_found(self) -> None:
        """A NotFound prints as kubectl's 'Error from server (NotFound): ...'."""
        self.assertEqual(format_error(not_found("servers.metal.sidero.dev", "x")),
                         'Error from server (NotFound): servers.metal.sidero.dev "x" not found')

    def test_format_invalid_multiple_causes(self) -> None:
        """Several causes print as a bulleted list after 'is invalid: '."""
        e = invalid("Server", "metal.sidero.dev", "x", [{"field": "spec.a", "message": "bad"},
                                                        {"field": "spec.b", "message": "worse"}])
        self.assertEqual(format_error(e), 'The Server "x" is invalid: \n* spec.a: bad\n* spec.b: worse')

    def test_format_from_status_round_trip(self) -> None:
        """A Status rebuilt by the client prints the same as the original error."""
        e = StoreError.from_status(invalid("Server", "g", "x", [{"field": "f", "message": "m"}]).to_status())
        self.assertIsInstance(e, Invalid)
        self.assertEqual(format_error(e), 'The Server "x" is invalid: f: m')
        self.assertIsInstance(StoreError.from_status(NotFound("gone").to_status()), NotFound)

    def test_three_way_patch(self) -> None:
        """The apply patch sets changed fields, deletes dropped ones, and is empty when in sync."""
        original: dict[str, Any] = {"spec": {"a": 1, "b": 2}}
        modified: dict[str, Any] = {"spec": {"a": 1, "c": 3}}
        current: dict[str, Any] = {"spec": {"a": 1, "b": 2, "defaulted": True}}
        self.assertEqual(three_way_patch(original, modified, current), {"spec": {"b": None, "c": 3}})
        self.assertEqual(three_way_patch(modified, modified, {"spec": {"a": 1, "c": 3, "d": 0}}), {})

    def test_create_merge_patch(self) -> None:
        """The edit patch carries only differences, with null for removed keys."""
        self.assertEqual(create_merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": 1}, "l": [2], "n": 0}),
                         {"a": {"c": None}, "l": [2], "n": 0})
        self.assertEqual(create_merge_patch({"a": 1}, {"a": 1}), {})
