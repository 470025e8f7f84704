"""The operator commands: get of several kinds, jsonpath, describe, accept/cordon/uncordon and
reboot, each run as a real subprocess against a real management socket."""

from __future__ import annotations

import json

from twisted.internet import reactor as global_reactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from sidero.api.registry import EVENT, SERVER
from sidero.management.template import Template, TemplateError
from tests.management.test_cli import CLITestCase
from tests.power.test_api import FakeVMAPI

CLASS_YAML = """\
apiVersion: metal.sidero.dev/v1alpha2
kind: ServerClass
metadata:
  name: rack-a
spec:
  selector:
    matchLabels:
      rack: a
"""


class TemplateTests(SynchronousTestCase):
    """kubectl jsonpath templates, parsed before use."""

    DATA = {"kind": "List", "items": [
        {"metadata": {"name": "a"}, "spec": {"accepted": True}},
        {"metadata": {"name": "b"}, "spec": {"accepted": False, "labels": {"x": "y"}}},
    ]}

    def test_expressions_and_literals(self) -> None:
        """Several results join with spaces; quoted literals interpret escapes."""
        self.assertEqual(Template("{.items[*].metadata.name}").render(self.DATA), "a b")
        self.assertEqual(Template('n={.items[0].metadata.name}{"\\n"}').render(self.DATA), "n=a\n")
        self.assertEqual(Template("{.items[1].spec.labels}").render(self.DATA), '{"x":"y"}')
        self.assertEqual(Template("{.items[?(@.spec.accepted==true)].metadata.name}").render(
            self.DATA), "a")

    def test_range(self) -> None:
        """range...end repeats its body per result, relative to each."""
        t = Template('{range .items[*]}{.metadata.name}{"\\t"}{.spec.accepted}{"\\n"}{end}')
        self.assertEqual(t.render(self.DATA), "a\ttrue\nb\tfalse\n")

    def test_errors(self) -> None:
        """Unclosed actions, a stray end, range without end and bare words are refused."""
        for bad in ("{.items", "{end}", "{range .items[*]}x", "{items}"):
            with self.subTest(template=bad):
                self.assertRaises(TemplateError, Template, bad)


class GetTests(CLITestCase):
    """get with several kinds, kind/name arguments and jsonpath."""

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        await self.apply_fixtures()
        out, err, code = await self.sidero("apply", "-f", self.write("class.yaml", CLASS_YAML))
        self.assertEqual(code, 0, err)

    async def test_two_kinds(self) -> None:
        """get servers,serverclasses prints a table per kind, rows named kind/name."""
        out, err, code = await self.sidero("get", "servers,serverclasses")
        self.assertEqual(code, 0, err)
        blocks = out.strip("\n").split("\n\n")
        self.assertEqual(len(blocks), 2)
        servers, classes = (b.splitlines() for b in blocks)
        self.assertEqual(servers[0].split(), ["NAME", "HOSTNAME", "ACCEPTED", "CORDONED",
                                              "ALLOCATED", "CLEAN", "POWER", "AGE"])
        self.assertTrue(servers[1].startswith("server.metal.sidero.dev/s1 "))
        self.assertTrue(classes[1].startswith("serverclass.metal.sidero.dev/rack-a "))

    async def test_kind_slash_name(self) -> None:
        """server/s1 serverclass/rack-a fetches exactly those two."""
        out, err, code = await self.sidero("get", "server/s1", "serverclass/rack-a", "-o", "name")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "server.metal.sidero.dev/s1\nserverclass.metal.sidero.dev/rack-a\n")

    async def test_jsonpath(self) -> None:
        """-o jsonpath over a List and over one named object."""
        out, err, code = await self.sidero(
            "get", "servers", "-o", "jsonpath={range .items[*]}{.metadata.name}={.spec.accepted}"
            '{"\\n"}{end}')
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "s1=true\ns2=false\n")
        out, _, code = await self.sidero("get", "server", "s2", "-o=jsonpath={.spec.bmc.endpoint}")
        self.assertEqual((out, code), ("10.0.0.5", 0))

    async def test_bad_jsonpath_and_format(self) -> None:
        """A malformed template or unknown format is an error before anything is printed."""
        out, err, code = await self.sidero("get", "servers", "-o", "jsonpath={.items")
        self.assertEqual((out, code), ("", 1))
        self.assertIn("error parsing jsonpath", err)
        out, err, code = await self.sidero("get", "servers", "-o", "table")
        self.assertEqual(code, 1)
        self.assertIn("allowed formats are: json,jsonpath,name,wide,yaml", err)

    async def test_yaml_of_two_kinds_is_one_list(self) -> None:
        """-o json with two kinds prints one v1 List holding both."""
        out, err, code = await self.sidero("get", "servers,serverclasses", "-o", "json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["kind"], "List")
        self.assertEqual(sorted(i["kind"] for i in doc["items"]), ["Server", "Server", "ServerClass"])


class ServerCommandTests(CLITestCase):
    """accept, cordon, uncordon and describe."""

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        await self.apply_fixtures()

    async def test_accept(self) -> None:
        """accept sets spec.accepted; a second accept says already."""
        out, err, code = await self.sidero("accept", "s2")
        self.assertEqual((out, code), ("server.metal.sidero.dev/s2 accepted\n", 0), err)
        self.assertTrue((await self.store.get(SERVER, "s2"))["spec"]["accepted"])
        out, _, _ = await self.sidero("accept", "s2")
        self.assertEqual(out, "server.metal.sidero.dev/s2 already accepted\n")

    async def test_cordon_uncordon(self) -> None:
        """cordon and uncordon flip spec.cordoned and the CORDONED column shows it."""
        out, err, code = await self.sidero("cordon", "s1", "server/s2")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "server.metal.sidero.dev/s1 cordoned\nserver.metal.sidero.dev/s2 cordoned\n")
        table, _, _ = await self.sidero("get", "servers")
        header, *rows = table.splitlines()
        column = header.index("CORDONED")
        self.assertEqual([r[column:column + 4] for r in rows], ["true", "true"])
        out, _, _ = await self.sidero("uncordon", "s1")
        self.assertEqual(out, "server.metal.sidero.dev/s1 uncordoned\n")
        self.assertFalse((await self.store.get(SERVER, "s1"))["spec"]["cordoned"])
        out, _, _ = await self.sidero("uncordon", "s1")
        self.assertEqual(out, "server.metal.sidero.dev/s1 already uncordoned\n")

    async def test_unknown_server(self) -> None:
        """A server that does not exist: kubectl's NotFound line, exit 1, others still done."""
        out, err, code = await self.sidero("cordon", "nope", "s1")
        self.assertEqual(code, 1)
        self.assertIn('Error from server (NotFound): servers.metal.sidero.dev "nope" not found', err)
        self.assertEqual(out, "server.metal.sidero.dev/s1 cordoned\n")

    async def test_describe(self) -> None:
        """describe prints the header fields, the spec tree and the server's Events."""
        server = await self.store.get(SERVER, "s1")
        await self.store.create({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "s1.1", "namespace": "default"},
            "involvedObject": {"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                               "name": "s1", "uid": server["metadata"]["uid"]},
            "reason": "PowerCycle", "message": "Server power cycled for wiping.",
            "type": "Normal", "source": {"component": "sidero-controller-manager"},
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z",
            "count": 1,
        })
        other = dict(await self.store.get(EVENT, "s1.1", "default"))
        self.assertEqual(other["reason"], "PowerCycle")
        out, err, code = await self.sidero("describe", "server", "s1")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0], "Name:         s1")
        self.assertIn("Labels:       rack=a", lines)
        self.assertIn("Kind:         Server", lines)
        self.assertIn("Spec:", lines)
        self.assertIn("  Hostname:  node-1", lines)
        events = lines[lines.index("Events:") + 1:]
        self.assertEqual(events[0].split(), ["Type", "Reason", "Age", "From", "Message"])
        self.assertEqual(events[2].split()[:2], ["Normal", "PowerCycle"])
        self.assertIn("Server power cycled for wiping.", events[2])
        out, _, _ = await self.sidero("describe", "server", "s2")
        self.assertIn("Events:  <none>", out)


class RebootTests(CLITestCase):
    """reboot power cycles through the server's power API (a fake VM API on loopback)."""

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        self.api = FakeVMAPI()
        port = global_reactor.listenTCP(0, Site(self.api), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = f"127.0.0.1:{port.getHost().port}"
        for name, spec in (("vm", {"managementApi": {"endpoint": endpoint}}), ("bare", {})):
            await self.store.create({"apiVersion": "metal.sidero.dev/v1alpha2", "kind": "Server",
                                     "metadata": {"name": name}, "spec": spec})

    async def test_reboot_on_and_off(self) -> None:
        """On: /reboot (a power cycle). Off: /poweron. With --pxe, /pxeboot first."""
        self.api.powered = True
        out, err, code = await self.sidero("reboot", "vm")
        self.assertEqual((out, code), ("server.metal.sidero.dev/vm rebooted\n", 0), err)
        self.assertEqual(self.api.requests, [("GET", "/status"), ("POST", "/reboot")])
        self.api.requests.clear()
        self.api.powered = False
        out, err, code = await self.sidero("reboot", "--pxe", "vm")
        self.assertEqual(code, 0, err)
        self.assertIn("next boot from the network", out)
        self.assertEqual(self.api.requests, [("POST", "/pxeboot"), ("GET", "/status"),
                                             ("POST", "/poweron")])

    async def test_reboot_errors(self) -> None:
        """No power control, an API error, a missing server: each says why, exit 1."""
        out, err, code = await self.sidero("reboot", "bare")
        self.assertEqual(code, 1)
        self.assertIn("server.metal.sidero.dev/bare: no BMC or management API", err)
        self.api.code = 500
        out, err, code = await self.sidero("reboot", "vm")
        self.assertEqual(code, 1)
        self.assertIn("server.metal.sidero.dev/vm:", err)
        self.assertIn("500", err)
        out, err, code = await self.sidero("reboot", "ghost")
        self.assertEqual(code, 1)
        self.assertIn('"ghost" not found', err)
