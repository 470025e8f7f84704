"""kubectl, a real client, against sidero's CRDs on a real kube-apiserver.

The samples in C{deploy/samples} are applied with C{kubectl apply}, given status through the
status subresource with C{kubectl patch --subresource=status}, and read back with
C{kubectl get} (printer columns, in the order and with the values spec §1 lists) and
C{kubectl explain} (field descriptions from our schemas).  sidero's own table printer
(L{sidero.management.printers}) must lay the same objects out exactly as kubectl does.

Reading or writing a served-but-not-stored version (v1alpha1 of the metal kinds, v1alpha2 of
the CAPS kinds) goes through the conversion webhook the CRDs name, which this API server has
no route to; those cases belong to the webhook's own tests, and here we only check that the
server refuses them instead of storing something unconverted.

Skips loudly without the kube-apiserver binary (see L{tests.k8s.apiserver.require_binary}).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import threads
from twisted.trial.unittest import SkipTest, TestCase

from sidero.api import registry
from sidero.api.registry import ResourceType
from sidero.management import printers
from tests.k8s.apiserver import ENV_REQUIRE, REPO, APIServerError, KubeAPIServer
from tests.k8s.support import server_with_crds

SAMPLES = REPO / "deploy" / "samples"
V1ALPHA1_SAMPLE = "metal_v1alpha1_server.yaml"
UUID = "4c4c4544-0051-3510-8052-b4c04f4d4d32"
SPARE = "00000000-0000-0000-0000-0000000000aa"  # a second, unaccepted and cordoned server
MACHINE_UID = "6a1b9a3e-51c4-4d64-8d2c-7d5b0f3b9e10"

#: Printer columns per spec §1.1-§1.5: (default view, -o wide view), kubectl's upper-case headers.
SPEC_COLUMNS: dict[str, tuple[list[str], list[str]]] = {
    "servers": (
        ["HOSTNAME", "ACCEPTED", "CORDONED", "ALLOCATED", "CLEAN", "POWER", "AGE"],
        ["HOSTNAME", "BMC IP", "ACCEPTED", "CORDONED", "ALLOCATED", "CLEAN", "POWER", "AGE"],
    ),
    "serverclasses": (["AVAILABLE", "IN USE", "AGE"], ["AVAILABLE", "IN USE", "AGE"]),
    "environments": (["KERNEL", "INITRD", "READY", "AGE"], ["KERNEL", "INITRD", "READY", "AGE"]),
    "metalclusters": (["CLUSTER", "READY", "AGE"], ["CLUSTER", "READY", "ENDPOINT", "AGE"]),
    "metalmachines": (["READY", "AGE"], ["READY", "CLUSTER", "MACHINE", "SERVER", "AGE"]),
    "metalmachinetemplates": (["AGE"], ["AGE"]),
    "serverbindings": (
        ["READY", "AGE"], ["READY", "SERVER", "SERVERCLASS", "METALMACHINE", "CLUSTER", "AGE"],
    ),
}
KINDS: dict[str, ResourceType] = {k.plural: k for k in registry.CUSTOM_KINDS}

#: Cells expected once the status patches of L{KubectlTests.set_status} are in (-o wide, no AGE).
EXPECTED_ROWS: dict[str, dict[str, dict[str, str]]] = {
    "servers": {
        UUID: {"HOSTNAME": "r630-01", "BMC IP": "10.5.0.20", "ACCEPTED": "true", "CORDONED": "false",
               "ALLOCATED": "true", "CLEAN": "false", "POWER": "on"},
        SPARE: {"HOSTNAME": "", "BMC IP": "", "ACCEPTED": "false", "CORDONED": "true",
                "ALLOCATED": "false", "CLEAN": "true", "POWER": "off"},
    },
    "serverclasses": {
        "intel-central": {"AVAILABLE": "[]", "IN USE": f'["{UUID}"]'},
    },
    "environments": {
        "default": {
            "KERNEL": "https://github.com/siderolabs/talos/releases/download/v1.13.0/vmlinuz-amd64",
            "INITRD": "https://github.com/siderolabs/talos/releases/download/v1.13.0/initramfs-amd64.xz",
            "READY": "True",
        },
    },
    "metalclusters": {
        "management": {"NAMESPACE": "default", "CLUSTER": "management", "READY": "true",
                       "ENDPOINT": "10.5.0.2"},
    },
    "metalmachines": {
        "management-cp-abcde": {"NAMESPACE": "default", "READY": "true", "CLUSTER": "management",
                                "MACHINE": "management-cp-xk2pq", "SERVER": UUID},
    },
    "metalmachinetemplates": {"management-cp": {"NAMESPACE": "default"}},
    "serverbindings": {
        UUID: {"READY": "true", "SERVER": UUID, "SERVERCLASS": "intel-central",
               "METALMACHINE": "management-cp-abcde", "CLUSTER": "management"},
    },
}

_AGE = re.compile(r"^\d+(s|m\d*s?|h\d*m?|d\d*h?)$")


def require_kubectl() -> None:
    """kubectl on PATH, or a loud skip (a failure under C{$SIDERO_REQUIRE_KUBEAPISERVER=1})."""
    if shutil.which("kubectl") is not None:
        return
    reason = "kubectl is not on PATH (any release within one minor of the pinned kube-apiserver)"
    if os.environ.get(ENV_REQUIRE) == "1":
        raise APIServerError(f"{ENV_REQUIRE}=1 but {reason}")
    raise SkipTest(f"SKIPPED, {reason}")


def parse_tables(text: str) -> list[list[dict[str, str]]]:
    """kubectl's text tables (several, blank-line separated, for a multi-kind get) as rows of
    header -> cell, cut at the header's column offsets (tabwriter aligns cells under them)."""
    tables: list[list[dict[str, str]]] = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        header = lines[0]
        # Columns are at least 3 spaces apart; single spaces are inside a header ("IN USE").
        spans = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
        rows = []
        for line in lines[1:]:
            row = {}
            for i, (start, name) in enumerate(spans):
                end = spans[i + 1][0] if i + 1 < len(spans) else None
                row[name] = line[start:end].strip()
            rows.append(row)
        tables.append([{"": header}, *rows])
    return tables


def header_of(table: list[dict[str, str]]) -> list[str]:
    return [m.group() for m in re.finditer(r"\S+(?: \S+)*", table[0][""])]


class KubectlTests(TestCase):
    """kubectl apply/get/explain/patch against the CRDs generated from the registry."""

    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        self.server: KubeAPIServer = await server_with_crds()
        require_kubectl()
        # The storage-version samples only (v1alpha1 needs the conversion webhook, see module doc).
        self.samples = Path(self.mktemp())
        self.samples.mkdir()
        for path in SAMPLES.glob("*.yaml"):
            if path.name != V1ALPHA1_SAMPLE:
                shutil.copy(path, self.samples / path.name)
        self.extra = Path(self.mktemp())
        self.extra.write_text(yaml.safe_dump({
            "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
            "metadata": {"name": SPARE}, "spec": {"accepted": False, "cordoned": True},
        }))
        self.addCleanup(self._delete_all)

    async def _delete_all(self) -> None:
        for target in (self.samples, self.extra):
            result = await self.kubectl("delete", "-f", str(target), "--ignore-not-found", "--wait=true")
            self.assertEqual(result.returncode, 0, result.stderr)

    def kubectl(self, *args: str) -> Any:
        """kubectl in a thread; fires with the CompletedProcess."""
        return threads.deferToThread(self.server.kubectl, *args)

    async def ok(self, *args: str) -> str:
        """kubectl that must succeed; its stdout."""
        result: subprocess.CompletedProcess[str] = await self.kubectl(*args)
        self.assertEqual(result.returncode, 0, f"kubectl {' '.join(args)}: {result.stderr}")
        return result.stdout

    async def apply_all(self) -> None:
        await self.ok("apply", "-f", str(self.samples))
        await self.ok("apply", "-f", str(self.extra))

    async def set_status(self) -> None:
        """Status through the status subresource (as the controllers would), plus the
        ownerReference and serverRef the MetalMachine columns read."""
        patches: list[tuple[str, str, str | None, dict[str, Any]]] = [
            ("server", UUID, None, {"inUse": True, "isClean": False, "power": "on", "ready": True}),
            ("server", SPARE, None, {"inUse": False, "isClean": True, "power": "off"}),
            ("serverclass", "intel-central", None, {"serversAvailable": [], "serversInUse": [UUID]}),
            ("environment", "default", None, {"conditions": [
                {"type": "Ready", "status": "True",
                 "url": "https://github.com/siderolabs/talos/releases/download/v1.13.0/vmlinuz-amd64"},
                {"type": "Ready", "status": "True",
                 "url": "https://github.com/siderolabs/talos/releases/download/v1.13.0/initramfs-amd64.xz"},
            ]}),
            ("metalcluster", "management", "default", {"ready": True}),
            ("metalmachine", "management-cp-abcde", "default", {"ready": True}),
            ("serverbinding", UUID, None, {"ready": True}),
        ]
        for kind, name, namespace, status in patches:
            ns = ["-n", namespace] if namespace else []
            await self.ok("patch", kind, name, *ns, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": status}))
        await self.ok("patch", "metalmachine", "management-cp-abcde", "-n", "default", "--type=merge",
                      "-p", json.dumps({
                          "metadata": {"ownerReferences": [{
                              "apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine",
                              "name": "management-cp-xk2pq", "uid": MACHINE_UID}]},
                          "spec": {"serverRef": {"kind": "Server", "name": UUID}},
                      }))

    # -- apply ------------------------------------------------------------------------------

    async def test_apply_samples_then_unchanged(self) -> None:
        """Applying deploy/samples creates every storage-version object; applying again changes none."""
        result = await self.kubectl("apply", "-f", str(SAMPLES))
        created = sorted(line.rsplit(" ", 1) for line in result.stdout.splitlines())
        expected_names = sorted(
            f"{KINDS[p].singular}.{KINDS[p].group}/{name}" for p, names in EXPECTED_ROWS.items()
            for name in names if name != SPARE
        )
        self.assertEqual([name for name, _ in created], expected_names, result.stderr)
        self.assertEqual({verb for _, verb in created}, {"created"})
        again = await self.kubectl("apply", "-f", str(SAMPLES))
        self.assertEqual(
            sorted(again.stdout.splitlines()), sorted(f"{n} unchanged" for n in expected_names)
        )
        # The v1alpha1 sample is refused with the conversion webhook named, and nothing is stored.
        for run in (result, again):
            self.assertNotEqual(run.returncode, 0)
            self.assertIn(V1ALPHA1_SAMPLE, run.stderr)
            self.assertIn("conversion webhook for metal.sidero.dev/v1alpha1, Kind=Server", run.stderr)
            self.assertEqual(len(run.stderr.strip().splitlines()), 1, run.stderr)
        missing = await self.kubectl("get", "server", "00000000-0000-0000-0000-d05099d33360")
        self.assertIn("NotFound", missing.stderr)

    async def test_apply_is_stable_after_status(self) -> None:
        """Re-applying the samples after status was written leaves status alone and reports unchanged."""
        await self.apply_all()
        await self.set_status()
        out = await self.ok("apply", "-f", str(self.samples / "metal_v1alpha2_server.yaml"))
        self.assertEqual(out.strip(), f"server.metal.sidero.dev/{UUID} unchanged")
        power = await self.ok("get", "server", UUID, "-o", "jsonpath={.status.power}")
        self.assertEqual(power, "on")

    # -- get --------------------------------------------------------------------------------

    def test_spec_columns_are_the_registry_columns(self) -> None:
        """The registry's printer columns are the spec's, in order, for every custom kind."""
        for plural, (normal, wide) in SPEC_COLUMNS.items():
            kind = KINDS[plural]
            self.assertEqual([c.name.upper() for c in kind.printer_columns if c.priority == 0], normal,
                             plural)
            self.assertEqual([c.name.upper() for c in kind.printer_columns], wide, plural)

    async def test_get_each_kind_columns_and_values(self) -> None:
        """kubectl get <kind> -A (and -o wide) shows exactly the spec's columns with the objects' values."""
        await self.apply_all()
        await self.set_status()
        for plural, (normal, wide) in SPEC_COLUMNS.items():
            for view, columns in (([], normal), (["-o", "wide"], wide)):
                [table] = parse_tables(await self.ok("get", plural, "-A", *view))
                # kubectl leaves NAMESPACE out for a cluster-scoped kind, even with -A.
                scope = ["NAMESPACE"] if KINDS[plural].namespaced else []
                self.assertEqual(header_of(table), [*scope, "NAME", *columns], (plural, view))
                rows = {row["NAME"]: row for row in table[1:]}
                for name, cells in EXPECTED_ROWS[plural].items():
                    self.assertIn(name, rows, (plural, view))
                    row = rows[name]
                    self.assertRegex(row["AGE"], _AGE)
                    self.assertEqual(row.get("NAMESPACE", ""), cells.get("NAMESPACE", ""), (plural, name))
                    for column in columns[:-1]:
                        self.assertEqual(row[column], cells[column], (plural, view, name, column))

    async def test_get_several_kinds_at_once(self) -> None:
        """One kubectl get of five kinds prints one table per kind, each with its own columns."""
        await self.apply_all()
        await self.set_status()
        plurals = ["servers", "serverclasses", "environments", "metalmachines", "serverbindings"]
        for view in ([], ["-o", "wide"]):
            tables = parse_tables(await self.ok("get", ",".join(plurals), "-A", *view))
            self.assertEqual(len(tables), len(plurals), view)
            for plural, table in zip(plurals, tables, strict=True):
                columns = SPEC_COLUMNS[plural][1 if view else 0]
                kind = KINDS[plural]
                header = header_of(table)
                # Once a namespaced kind was printed kubectl keeps the (empty) NAMESPACE column
                # for the cluster-scoped kinds after it; a namespaced kind always has it.
                if kind.namespaced or header[0] == "NAMESPACE":
                    self.assertEqual(header[0], "NAMESPACE", plural)
                    header = header[1:]
                self.assertEqual(header, ["NAME", *columns], plural)
                rows = {row["NAME"]: row for row in table[1:]}
                for name, cells in EXPECTED_ROWS[plural].items():
                    row = rows[f"{kind.singular}.{kind.group}/{name}"]
                    for column in columns[:-1]:
                        self.assertEqual(row[column], cells[column], (plural, name, column))

    async def test_server_table_has_registry_column_definitions(self) -> None:
        """The API server's Table for each kind carries the registry's columns: name, type, description, priority."""

        def fetch(kind: ResourceType) -> Any:
            assert self.server.workdir is not None
            pki = self.server.workdir / "pki"
            ctx = ssl.create_default_context(cafile=str(self.server.ca_file))
            ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
            request = urllib.request.Request(
                f"{self.server.url}/apis/{kind.group}/{kind.storage_version}/{kind.plural}",
                headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
            with urllib.request.urlopen(request, timeout=30, context=ctx) as response:
                return json.loads(response.read())

        for kind in registry.CUSTOM_KINDS:
            table = await threads.deferToThread(fetch, kind)
            self.assertEqual(table["kind"], "Table")
            got = [(c["name"], c["type"], c.get("description", ""), c.get("priority", 0))
                   for c in table["columnDefinitions"]]
            want = [("Name", "string", got[0][2], 0)]
            # A column without a description (Age) gets the server's own wording.
            want += [(c.name, c.type, c.description or server_text, c.priority)
                     for c, (_, _, server_text, _) in zip(kind.printer_columns, got[1:], strict=False)]
            self.assertEqual(got, want, kind.kind)

    async def test_sidero_printer_matches_kubectl(self) -> None:
        """sidero's table printer lays out the same objects cell for cell as kubectl (Age aside)."""
        await self.apply_all()
        await self.set_status()
        now = datetime.now(UTC)
        for plural in SPEC_COLUMNS:
            kind = KINDS[plural]
            scope = ["-n", "default"] if kind.namespaced else []
            for wide in (False, True):
                view = ["-o", "wide"] if wide else []
                listing = json.loads(await self.ok("get", plural, *scope, "-o", "json"))
                text = await self.ok("get", plural, *scope, *view)
                ours = printers.tabwrite(printers.table(kind, listing["items"], wide=wide, now=now))
                # AGE is the last column, so cutting it off leaves the other columns' layout intact.
                self.assertEqual([_strip_last(line) for line in text.splitlines()],
                                 [_strip_last(line) for line in ours.splitlines()], (plural, wide))

    # -- explain ----------------------------------------------------------------------------

    async def test_explain_server_spec(self) -> None:
        """kubectl explain server.spec lists the fields with the descriptions from our schema."""
        out = await self.ok("explain", "server.spec")
        self.assertIn("VERSION:    v1alpha2", out)
        self.assertIn("Desired state of the Server.", out)
        self.assertRegex(out, r"accepted\t<boolean> -required-\n\s+Server is under Sidero control")
        self.assertRegex(out, r"cordoned\t<boolean>\n\s+Excluded from all ServerClass membership\.")
        self.assertRegex(out, r"hardware\t<Object>\n\s+Discovered hardware inventory")
        self.assertRegex(out, r"bmc\t<Object>\n\s+How to talk to the node's BMC over IPMI\.")
        self.assertNotIn("<no description>", out)
        bmc = await self.ok("explain", "server.spec.bmc.port")
        self.assertIn("BMC port; 0 means 623.", bmc)

    async def test_explain_serverclass_qualifiers(self) -> None:
        """kubectl explain serverclass.spec.qualifiers documents hardware and the OR of label selectors."""
        out = await self.ok("explain", "serverclass.spec.qualifiers")
        self.assertIn("Hardware and label filters.", out)
        self.assertRegex(out, r"labelSelectors\t<\[\]map\[string\]string>\n\s+Label maps; a server "
                              r"matches when any pair matches \(OR\)\.")
        self.assertRegex(out, r"hardware\t<\[\]Object>\n\s+Hardware filters")
        self.assertNotIn("<no description>", out)

    async def test_explain_caps_kinds(self) -> None:
        """MetalMachine, MetalCluster and ServerBinding fields are explained from the v1alpha3 schemas."""
        out = await self.ok("explain", "metalmachine.spec")
        self.assertIn("infrastructure.cluster.x-k8s.io", out)
        self.assertIn("VERSION:    v1alpha3", out)
        self.assertRegex(out, r"providerID\t<string>\n\s+sidero://<server-name>, set on allocation\.")
        self.assertRegex(out, r"serverClassRef\t<Object>\n\s+ServerClass to allocate a server from\.")
        endpoint = await self.ok("explain", "metalcluster.spec.controlPlaneEndpoint")
        self.assertRegex(endpoint, r"host\t<string> -required-\n\s+Hostname or IP of the API server\.")
        binding = await self.ok("explain", "serverbinding.spec.siderolink")
        self.assertRegex(binding, r"publicKey\t<string> -required-\n\s+Node WireGuard public key")

    async def test_explain_older_served_version(self) -> None:
        """--api-version shows v1alpha1's own schema (cpu/system, no hardware); no conversion is involved."""
        out = await self.ok("explain", "server.spec", "--api-version=metal.sidero.dev/v1alpha1")
        self.assertIn("VERSION:    v1alpha1", out)
        self.assertRegex(out, r"\n  cpu\t<Object>")
        self.assertRegex(out, r"\n  system\t<Object>")
        self.assertNotRegex(out, r"\n  hardware\t")
        caps = await self.ok("explain", "metalmachine.status",
                             "--api-version=infrastructure.cluster.x-k8s.io/v1alpha2")
        self.assertRegex(caps, r"\n  errorReason\t<string>")

    # -- names ------------------------------------------------------------------------------

    async def test_fully_qualified_names(self) -> None:
        """Resources resolve by plural, singular, kind and group-qualified name, with and without the version."""
        await self.apply_all()
        for name in ("servers", "server", "Server", "servers.metal.sidero.dev",
                     "servers.v1alpha2.metal.sidero.dev", "server.v1alpha2.metal.sidero.dev"):
            out = await self.ok("get", name, UUID, "-o", "jsonpath={.apiVersion} {.spec.hostname}")
            self.assertEqual(out, "metal.sidero.dev/v1alpha2 r630-01", name)
        out = await self.ok("get", "metalmachines.v1alpha3.infrastructure.cluster.x-k8s.io",
                            "-n", "default", "management-cp-abcde", "-o", "jsonpath={.apiVersion}")
        self.assertEqual(out, "infrastructure.cluster.x-k8s.io/v1alpha3")

    async def test_older_version_needs_conversion_webhook(self) -> None:
        """Reading an object in a served non-storage version is refused (the webhook is not routed here)."""
        await self.apply_all()
        for args in (("servers.v1alpha1.metal.sidero.dev", UUID),
                     ("metalmachines.v1alpha2.infrastructure.cluster.x-k8s.io", "-n", "default",
                      "management-cp-abcde")):
            result = await self.kubectl("get", *args, "-o", "json")
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn("conversion webhook for", result.stderr, args)

    async def test_categories_and_no_short_names(self) -> None:
        """`kubectl get cluster-api` lists the three CAPS kinds of the category; no short names exist."""
        await self.apply_all()
        out = await self.ok("get", "cluster-api", "-A", "-o", "name")
        self.assertEqual(set(out.split()), {
            "metalcluster.infrastructure.cluster.x-k8s.io/management",
            "metalmachine.infrastructure.cluster.x-k8s.io/management-cp-abcde",
            "metalmachinetemplate.infrastructure.cluster.x-k8s.io/management-cp",
        })
        for kind in registry.CUSTOM_KINDS:
            discovery = await threads.deferToThread(
                self.server.get_json, f"/apis/{kind.group}/{kind.storage_version}")
            [entry] = [r for r in discovery["resources"] if r["name"] == kind.plural]
            self.assertEqual(tuple(entry.get("shortNames", ())), kind.short_names, kind.kind)
            self.assertEqual(tuple(entry.get("categories", ())), kind.categories, kind.kind)
            self.assertEqual(entry["namespaced"], kind.namespaced, kind.kind)
            self.assertEqual(entry["singularName"], kind.singular, kind.kind)


def _strip_last(line: str) -> str:
    """A table line without its last cell (AGE), trailing blanks removed."""
    return re.sub(r"\s*\S+$", "", line.rstrip())

