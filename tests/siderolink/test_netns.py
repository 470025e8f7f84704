"""SideroLink end to end: the real C{twistd sidero} on a real kube-apiserver, a WireGuard peer in
a network namespace (wireguard-go and wireguard-tools' C{wg}, nobody here wrote them).

    <p>-srv    10.213.<n>.1  sidero (Kubernetes store, API port 8081, WireGuard 51821/udp on its
                             wireguard-go interface, kernel logs and events on the tunnel address)
    <p>-node   10.213.<n>.2  a Talos node's part: Provision over h2c, its own wireguard-go tunnel
                             to the address it was given, recorded kmsg JSON and Publish events
    <p>-rogue  10.213.<n>.3  a peer that was never provisioned
    <p>-srv2   10.213.<n>.4  a second installation (embedded store, its own identity)

All four hang off a bridge in <p>-sw.  The API server stays on the host's loopback; a bridge
process in <p>-srv forwards 127.0.0.1:<its port> there to a UNIX socket the test forwards on.
Everything (namespaces, processes, interfaces) is removed afterwards, also on failure.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import portforward
from twisted.trial.unittest import SkipTest, TestCase

from sidero.api.registry import METAL_MACHINE, SECRET, SERVER, SERVER_BINDING
from sidero.management.client import ManagementClient
from sidero.siderolink.annotator import Annotation
from sidero.siderolink.config import generate_private_key, public_key
from tests.k8s.apiserver import KubeAPIServer, require_binary
from tests.k8s.support import make_store, server_with_crds
from tests.netlab import NetLab, missing_requirements
from tests.paths import REPO, RUN_SIDERO, tree_env
from tests.siderolink.test_logreceiver import KMSG, ours

HERE = REPO / "tests" / "siderolink"
UUID = "3f2c1d0e-5b6a-4978-8c9d-0e1f2a3b4c5d"
MM = "node-0"
CLUSTER = "lab"
FILTERED = "10.99.0.0/16"


def derived(installation_id: str) -> ipaddress.IPv6Network:
    """Spec §3.8, written out again: SHA-256, last 16 bytes, byte 0 = 0xfd, byte 7 = 0x03, /64."""
    tail = bytearray(hashlib.sha256(installation_id.encode()).digest()[16:])
    tail[0], tail[7] = 0xFD, 0x03
    return ipaddress.IPv6Network((bytes(tail[:8]) + bytes(8), 64))


async def eventually(what: str, check: Callable[[], Any], timeout: float = 30.0,
                     blocking: bool = True) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await deferToThread(check) if blocking else check()
        except Exception as e:  # keep polling, report the last error
            last = e
        else:
            if last:
                return last
        await deferLater(reactor, 0.25, lambda: None)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


class Sidero:
    """One C{twistd sidero} in a namespace; SIGTERM goes to it alone (it stops its wireguard-go)."""

    def __init__(self, lab: NetLab, ns: str, work: Path, name: str, args: list[str]) -> None:
        self.lab, self.ns, self.name, self.args = lab, ns, name, args
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.lab.spawn(self.ns, [sys.executable, str(RUN_SIDERO), *self.args], self.log,
                                   tree_env(PYTHONUNBUFFERED="1"))

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                NetLab.stop(proc, timeout=1)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def logged(self, text: str) -> int:
        """How many log records contain C{text} in their message."""
        return sum(1 for r in self.records() if text in str(r.get("msg", "")))

    def exited(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n"
                                 f"{self.log.read_text(errors='replace')[-4000:]}")


class SideroLinkNetnsTests(TestCase):
    timeout = 420

    async def setUp(self) -> None:  # type: ignore[override]
        reason = missing_requirements(("wireguard-go", "wg"))
        if reason is not None:
            raise SkipTest(f"LOUD SKIP: the SideroLink namespace test cannot run: {reason}")
        binary = require_binary()
        tag = os.getpid() % 100000
        self.work = Path(os.path.abspath(self.mktemp()))
        self.work.mkdir(parents=True)
        self.short = Path(tempfile.mkdtemp(prefix="slnet-"))  # unix socket paths stay short
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", str(self.short)]))
        self.lab = NetLab(f"sl{tag}", 150 + os.getpid() % 50, self.work)
        self.addCleanup(self.lab.teardown)
        self.ifaces = {"srv": f"sls{tag}", "node": f"sln{tag}", "rogue": f"slr{tag}",
                       "srv2": f"slm{tag}"}

        self.api = KubeAPIServer(binary)
        await self.api.start()
        self.addCleanup(lambda: deferToThread(self.api.stop))
        await server_with_crds(self.api)
        self.store = await make_store(self, self.api)
        sock = str(self.short / "api.sock")
        unix = reactor.listenUNIX(sock, portforward.ProxyFactory("127.0.0.1", self.api.port))  # type: ignore[attr-defined]
        self.addCleanup(unix.stopListening)

        self.lab.setup_switch()
        self.srv = self.lab.add_host("srv", 1)
        self.node = self.lab.add_host("node", 2)
        self.rogue = self.lab.add_host("rogue", 3)
        self.srv2 = self.lab.add_host("srv2", 4)
        bridge_log = self.work / "bridge.log"
        bridge = self.lab.spawn(self.srv, [sys.executable, str(HERE / "netns_bridge.py"),
                                           str(self.api.port), sock], bridge_log, tree_env())
        await deferToThread(NetLab.wait_for, bridge_log, "listening", 20, bridge)

        self.server_log = self.work / "server-logs.jsonl"
        self.sidero = Sidero(self.lab, self.srv, self.work, "sidero", [
            "--store", "kubernetes", "--kubeconfig", str(self.api.kubeconfig),
            "--state-dir", str(self.work / "state"), "--api-endpoint", self.lab.ip(1),
            "--api-port", "8081", "--disable-dhcp-proxy", "--disable-tftp", "--disable-webhook",
            "--no-enable-leader-election", "--talos-assets-url",
            "http://127.0.0.1:1", "--siderolink-interface", self.ifaces["srv"],
            "--server-log", str(self.server_log), "--events-negative-address-filter", FILTERED,
            "--log-format", "json"])
        self.addCleanup(self.sidero.stop)

    # -- helpers ---------------------------------------------------------------------------

    def sh(self, ns: str, *argv: str, check: bool = True) -> str:
        return self.lab.run("ip", "netns", "exec", ns, *argv, check=check)

    def client(self, ns: str, *argv: str) -> dict[str, Any]:
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(HERE / "node_client.py"),
                              *argv], capture_output=True, text=True, timeout=60, env=tree_env(),
                             cwd=str(REPO))
        if res.returncode != 0 or not res.stdout.strip():
            raise AssertionError(f"node_client {argv[0]} failed ({res.returncode}): {res.stderr}")
        result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
        return result

    async def wait_sidero(self, sidero: Sidero, *texts: str) -> None:
        for text in texts:
            await eventually(f"{sidero.name}: {text!r}",
                             lambda t=text: (sidero.exited(), sidero.logged(t))[1], 60)

    def wg_peers(self, ns: str, iface: str) -> dict[str, str]:
        out = self.sh(ns, "wg", "show", iface, "dump").splitlines()
        return {line.split("\t")[0]: line.split("\t")[3] for line in out[1:]}

    def wireguard_peer(self, ns: str, iface: str, private_key: str, server_key: str,
                       endpoint: str, server_ip: str, address: str) -> None:
        """A node's tunnel, as Talos brings it up from Provision's answer."""
        log = self.work / f"{iface}.wireguard-go.log"
        self.lab.spawn(ns, ["wireguard-go", "-f", iface], log,
                       dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1"))
        deadline = time.monotonic() + 10
        while not os.path.exists(f"/var/run/wireguard/{iface}.sock"):
            if time.monotonic() > deadline:
                raise AssertionError(f"wireguard-go {iface} did not start: {log.read_text()}")
            time.sleep(0.05)
        key_file = self.short / f"{iface}.key"
        key_file.write_text(private_key + "\n")
        self.sh(ns, "wg", "set", iface, "private-key", str(key_file), "peer", server_key,
                 "endpoint", endpoint, "allowed-ips", f"{server_ip}/128", "persistent-keepalive", "1")
        self.sh(ns, "ip", "addr", "add", address, "dev", iface, "nodad")
        self.sh(ns, "ip", "link", "set", iface, "mtu", "1280", "up")

    async def create_objects(self) -> None:
        """A Server, a standalone MetalMachine and the ServerBinding allocating one to the other."""
        await self.store.create({"apiVersion": SERVER.api_version, "kind": "Server",
                                 "metadata": {"name": UUID}, "spec": {"accepted": True}})
        await self.store.create({"apiVersion": "v1", "kind": "Secret",
                                 "metadata": {"name": "node-0-config", "namespace": "default"},
                                 "stringData": {"value": "version: v1alpha1\nmachine: {type: worker}\n"}})
        mm = await self.store.create({
            "apiVersion": METAL_MACHINE.api_version, "kind": "MetalMachine",
            "metadata": {"name": MM, "namespace": "default",
                         "labels": {"cluster.x-k8s.io/cluster-name": CLUSTER},
                         "annotations": {"metal.sidero.dev/bootstrap-data-secret": "node-0-config"}},
            "spec": {}})
        await self.store.create({
            "apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding",
            "metadata": {"name": UUID, "labels": {"cluster.x-k8s.io/cluster-name": CLUSTER}},
            "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": "default", "name": MM,
                                         "uid": mm["metadata"]["uid"]}}})

    async def binding(self) -> dict[str, Any]:
        obj: dict[str, Any] = await self.store.get(SERVER_BINDING, UUID)
        return obj

    async def condition(self, kind: Any, name: str, namespace: str | None, type_: str) -> dict[str, Any] | None:
        obj = await self.store.get(kind, name, namespace)
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") == type_:
                result: dict[str, Any] = c
                return result
        return None

    def events_file(self, name: str, events: list[dict[str, Any]]) -> str:
        path = self.short / f"{name}.json"
        path.write_text(json.dumps(events))
        return str(path)

    def server_lines(self) -> list[bytes]:
        return self.server_log.read_bytes().splitlines(keepends=True) if self.server_log.exists() else []

    # -- the test --------------------------------------------------------------------------

    async def test_provision_tunnel_logs_events_restart(self) -> None:
        """Provision with a real key, the tunnel up to the given address, annotated kernel
        logs and Publish events through it into the API server, syslog from the node; a
        stranger gets nothing through; a restart keeps the peer; a second installation hands
        out other addresses; a deleted binding takes its peer away."""
        await self.create_objects()
        self.sidero.start()
        await self.wait_sidero(self.sidero, "SideroLink up", "kernel log receiver listening",
                               "event sink listening")
        # The sinks started after the interface had its address: bound at the first try.
        self.assertEqual(self.sidero.logged("cannot listen"), 0)

        # The identity is the Secret's, and every address derives from it as §3.8 says.
        secret = await self.store.get(SECRET, "siderolink", "default")
        installation_id = base64.b64decode(secret["data"]["installation-id"]).decode()
        server_key = public_key(base64.b64decode(secret["data"]["private-key"]).decode())
        subnet = derived(installation_id)
        server_ip = str(subnet.network_address + 1)

        node_key = generate_private_key()
        answer = await deferToThread(self.client, self.node, "provision", f"{self.lab.ip(1)}:8081",
                                     UUID, public_key(node_key))
        self.assertEqual(answer.get("server_endpoint"), [f"{self.lab.ip(1)}:51821"], answer)
        self.assertEqual((answer["server_public_key"], answer["server_address"]), (server_key, server_ip))
        node_address = ipaddress.IPv6Interface(answer["node_address_prefix"])
        self.assertEqual(node_address.network, subnet)
        binding = await self.binding()
        self.assertEqual(binding["spec"]["siderolink"], {"address": node_address.with_prefixlen,
                                                         "publicKey": public_key(node_key)})
        # sidero's interface carries <prefix>::1/64 and gets the node as a peer.
        await eventually("the node as a peer of sidero's interface", lambda: self.wg_peers(
            self.srv, self.ifaces["srv"]).get(public_key(node_key)) == f"{node_address.ip}/128")
        self.assertIn(f"{server_ip}/64", self.sh(self.srv, "ip", "-6", "addr", "show",
                                                   self.ifaces["srv"]))

        self.wireguard_peer(self.node, self.ifaces["node"], node_key, server_key,
                            answer["server_endpoint"][0], server_ip, node_address.with_prefixlen)

        # Kernel logs through the tunnel: annotated, one line each, as the Go receiver writes.
        kmsg_file = self.work / "kmsg.jsonl"
        kmsg_file.write_bytes(KMSG)
        sent = await deferToThread(self.client, self.node, "kmsg", server_ip, "4001", str(kmsg_file))
        self.assertEqual(sent, {"sent": len(KMSG)})
        expected = ours(KMSG, Annotation(server_uuid=UUID, namespace="default", metal_machine=MM,
                                         cluster=CLUSTER)).splitlines(keepends=True)
        await eventually("five annotated kernel log lines", lambda: len(self.server_lines()) >= 5)
        self.assertEqual(self.server_lines(), expected)

        # Events: a config error first (what sfyra's TestServerPXEBoot waits for) ...
        events = self.events_file("load-error", [
            {"type": "ConfigLoadErrorEvent", "fields": {"error": "yaml: line 3: bad indentation"}}])
        self.assertEqual(await deferToThread(self.client, self.node, "publish", f"[{server_ip}]:4002",
                                             events), {"published": 1})
        loaded = await self.condition(SERVER_BINDING, UUID, None, "TalosConfigLoaded")
        assert loaded is not None
        self.assertEqual((loaded["status"], loaded["reason"], loaded["severity"], loaded["message"]),
                         ("False", "TalosConfigLoadFailed", "Error", "yaml: line 3: bad indentation"))

        async def mm_condition() -> Any:
            c = await self.condition(METAL_MACHINE, MM, "default", "TalosConfigLoaded")
            return c if c and c.get("reason") == "TalosConfigLoadFailed" else None

        await self.eventually_async("TalosConfigLoaded=False copied to the MetalMachine", mm_condition)

        # ... then addresses and the install to the end.
        events = self.events_file("boot", [
            {"type": "AddressEvent", "fields": {"hostname": "talos-e2e", "addresses": [
                str(node_address.ip), "10.99.1.5", "192.0.2.77", self.lab.ip(2)]}},
            {"type": "PhaseEvent", "fields": {"phase": "saveConfig", "action": "START"}},
            {"type": "PhaseEvent", "fields": {"phase": "install", "action": "START"}},
            {"type": "TaskEvent", "fields": {"task": "installer", "action": "START"}},
            {"type": "ServiceStateEvent", "fields": {"service": "apid", "action": "RUNNING",
                                                     "message": "Health check successful"}},
            {"type": "SequenceEvent", "fields": {"sequence": "boot", "action": "START"}}])
        self.assertEqual(await deferToThread(self.client, self.node, "publish", f"[{server_ip}]:4002",
                                             events), {"published": 6})
        binding = await self.binding()
        self.assertEqual((binding["spec"]["addresses"], binding["spec"]["hostname"]),
                         (["192.0.2.77", self.lab.ip(2)], "talos-e2e"))
        for type_ in ("TalosConfigLoaded", "TalosConfigValidated", "TalosInstalled"):
            c = await self.condition(SERVER_BINDING, UUID, None, type_)
            self.assertEqual((c or {}).get("status"), "True", type_)

        async def mm_addresses() -> Any:
            mm = await self.store.get(METAL_MACHINE, MM, "default")
            return (mm.get("status") or {}).get("addresses")

        addresses = await self.eventually_async("addresses on the MetalMachine", mm_addresses)
        self.assertEqual(addresses, [{"type": "InternalIP", "address": "192.0.2.77"},
                                     {"type": "InternalIP", "address": self.lab.ip(2)},
                                     {"type": "Hostname", "address": "talos-e2e"}])
        incoming = [r for r in self.sidero.records() if r.get("msg") in ("incoming event",
                                                                          "service Health check successful")]
        self.assertEqual(len(incoming), 7)
        first = incoming[0]
        self.assertTrue(first["node"].startswith(f"[{node_address.ip}]:"), first)
        self.assertEqual({k: first.get(k) for k in ("type", "server_uuid", "namespace", "metal_machine",
                                                    "cluster", "error")},
                         {"type": "type.googleapis.com/machine.ConfigLoadErrorEvent", "server_uuid": UUID,
                          "namespace": "default", "metal_machine": MM, "cluster": CLUSTER,
                          "error": "yaml: line 3: bad indentation"})

        await self.dashboard_shows_the_node()
        await self.syslog_from_the_node()
        await self.stranger_gets_nothing(server_key, server_ip, subnet)
        await self.restart_keeps_the_peer(node_key, server_ip)
        await self.second_installation(subnet, node_key)

        # A binding that goes takes its peer with it.
        await self.store.delete(SERVER_BINDING, UUID)
        await eventually("the peer removed with its binding", lambda: public_key(node_key) not in
                         self.wg_peers(self.srv, self.ifaces["srv"]))

    async def eventually_async(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await check()
            if last:
                return last
            await deferLater(reactor, 0.25, lambda: None)
        raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")

    async def dashboard_shows_the_node(self) -> None:
        """The dashboard (loopback of sidero's namespace: no login) shows the node's SideroLink
        and Talos boot steps and its kernel log lines, from the real tunnel's traffic."""
        page = await deferToThread(self.sh, self.srv, "curl", "-sf", f"http://127.0.0.1:8082/servers/{UUID}")
        timeline = page[page.index('id="timeline"'):page.index('id="logs"')]
        for step in ("siderolink-provision", "siderolink-logs", "talos-config-load-error",
                     "talos-addresses", "talos-phase", "talos-service", "talos-sequence"):
            self.assertIn(f'data-step="{step}"', timeline)
        logs = page[page.index('id="logs"'):]
        self.assertIn("kern.notice: Linux version 6.12.40-talos", logs)
        self.assertIn("[talos] &lt;siderolink&gt; &amp; &quot;quotes&quot;", logs)

    async def syslog_from_the_node(self) -> None:
        """util-linux logger on the node's LAN address (the one Talos reported) to sidero's
        syslog, UDP and TCP: the same annotation as its kernel logs, into the same file."""
        before = len(self.server_lines())
        self.sh(self.node, "logger", "-n", self.lab.ip(1), "-P", "514", "-d", "--rfc3164", "-t", "ipxe",
                "net0: 52:54:00:12:34:56 using e1000")
        self.sh(self.node, "logger", "-n", self.lab.ip(1), "-P", "601", "-T", "--octet-count",
                "--rfc5424", "-t", "sidero-agent", "--msgid", "WIPE", "wiping /dev/vda")
        await eventually("two syslog lines", lambda: len(self.server_lines()) >= before + 2)
        records = [json.loads(line) for line in self.server_lines()[before:]]
        by_app = {r["app_name"]: r for r in records}
        self.assertEqual(set(by_app), {"ipxe", "sidero-agent"})
        for record in records:
            self.assertEqual({k: record.get(k) for k in ("source", "server_uuid", "namespace",
                                                         "metal_machine", "cluster")},
                             {"source": self.lab.ip(2), "server_uuid": UUID, "namespace": "default",
                              "metal_machine": MM, "cluster": CLUSTER})
        self.assertEqual((by_app["ipxe"]["transport"], by_app["ipxe"]["protocol"]), ("udp", "rfc3164"))
        self.assertEqual((by_app["sidero-agent"]["transport"], by_app["sidero-agent"]["msgid"]),
                         ("tcp", "WIPE"))

    async def stranger_gets_nothing(self, server_key: str, server_ip: str,
                                    subnet: ipaddress.IPv6Network) -> None:
        """A peer that knows the server's key and endpoint but was never provisioned: no
        handshake, so nothing reaches the sinks; the LAN address does not have them at all;
        and Provision does not know it."""
        before = len(self.server_lines())
        rogue_key = generate_private_key()
        address = ipaddress.IPv6Interface((subnet.network_address + 0xBAD, 64))
        self.wireguard_peer(self.rogue, self.ifaces["rogue"], rogue_key, server_key,
                            f"{self.lab.ip(1)}:51821", server_ip, address.with_prefixlen)
        kmsg_file = self.work / "rogue.jsonl"
        kmsg_file.write_bytes(b'{"msg":"let me in"}\n')
        tried = await deferToThread(self.client, self.rogue, "kmsg", server_ip, "4001", str(kmsg_file), "4")
        self.assertIn("error", tried)
        events = self.events_file("rogue", [{"type": "AddressEvent", "fields": {"hostname": "evil"}}])
        published = await deferToThread(self.client, self.rogue, "publish", f"[{server_ip}]:4002", events, "4")
        self.assertIn("error", published)
        for port in ("4001", "4002"):
            lan = await deferToThread(self.client, self.rogue, "kmsg", self.lab.ip(1), port, str(kmsg_file), "4")
            self.assertEqual(lan.get("errno"), 111, lan)  # ECONNREFUSED: nothing on the LAN address
        self.assertEqual(len(self.server_lines()), before)
        self.assertNotIn(public_key(rogue_key), self.wg_peers(self.srv, self.ifaces["srv"]))
        handshake = self.sh(self.rogue, "wg", "show", self.ifaces["rogue"], "latest-handshakes")
        self.assertTrue(handshake.strip().endswith("\t0"), handshake)
        refused = await deferToThread(self.client, self.rogue, "provision", f"{self.lab.ip(1)}:8081",
                                      str(uuidlib.uuid4()), public_key(rogue_key))
        self.assertEqual(refused.get("code"), "NOT_FOUND", refused)
        self.assertEqual((await self.binding())["spec"]["hostname"], "talos-e2e")

    async def restart_keeps_the_peer(self, node_key: str, server_ip: str) -> None:
        """SIGTERM: sidero removes its interface; started again, it rebuilds the peer from
        the ServerBinding and the node's tunnel carries logs and events again."""
        lines = len(self.server_lines())
        secret = await self.store.get(SECRET, "siderolink", "default")
        await deferToThread(self.sidero.stop)
        gone = self.lab.run("ip", "-n", self.srv, "link", "show", self.ifaces["srv"], check=False)
        self.assertEqual(gone, "", "the interface went with the process")
        self.sidero.log.rename(self.work / "sidero.first.log")
        self.sidero.start()
        await self.wait_sidero(self.sidero, "SideroLink up", "kernel log receiver listening",
                               "event sink listening")
        await eventually("the peer rebuilt from the store", lambda: public_key(node_key) in self.wg_peers(
            self.srv, self.ifaces["srv"]))
        kept = await self.store.get(SECRET, "siderolink", "default")
        self.assertEqual((kept["data"], kept["metadata"]["resourceVersion"]),
                         (secret["data"], secret["metadata"]["resourceVersion"]),
                         "the identity is read back, never rewritten")
        again = self.work / "again.jsonl"
        again.write_bytes(b'{"clock":9,"msg":"after restart","seq":2000}\n')
        await eventually("kernel logs through the tunnel after the restart", lambda: (
            self.client(self.node, "kmsg", server_ip, "4001", str(again), "3").get("sent")
            and len(self.server_lines()) > lines), 60)
        self.assertIn(b'"msg":"after restart"', self.server_lines()[-1])
        self.assertIn(f'"server_uuid":"{UUID}"'.encode(), self.server_lines()[-1])
        events = self.events_file("after", [{"type": "AddressEvent", "fields": {
            "hostname": "talos-renamed", "addresses": ["192.0.2.78"]}}])
        self.assertEqual(await deferToThread(self.client, self.node, "publish", f"[{server_ip}]:4002",
                                             events), {"published": 1})
        binding = await self.binding()
        self.assertEqual((binding["spec"]["addresses"], binding["spec"]["hostname"]),
                         (["192.0.2.78"], "talos-renamed"))

    async def second_installation(self, first_subnet: ipaddress.IPv6Network, node_key: str) -> None:
        """Another installation (its own store, so its own id) hands out addresses of its own
        /64; its disabled sinks listen nowhere."""
        socket_path = str(self.short / "m2.sock")
        second = Sidero(self.lab, self.srv2, self.work, "sidero2", [
            "--store", "embedded", "--state-dir", str(self.work / "state2"),
            "--api-endpoint", self.lab.ip(4), "--api-port", "8081", "--disable-dhcp-proxy",
            "--disable-tftp", "--disable-syslog", "--disable-log-receiver", "--disable-event-sink",
            "--talos-assets-url", "http://127.0.0.1:1", "--siderolink-interface", self.ifaces["srv2"],
            "--management-socket", socket_path, "--log-format", "json"])
        self.addCleanup(second.stop)
        second.start()
        await self.wait_sidero(second, "SideroLink up")
        client = ManagementClient(socket_path, timeout=10)
        await deferToThread(client.create, SERVER_BINDING, {
            "apiVersion": SERVER_BINDING.api_version, "kind": "ServerBinding", "metadata": {"name": UUID},
            "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": "default", "name": MM}}})
        secret = await deferToThread(client.get, SECRET, "siderolink", "default")
        subnet = derived(base64.b64decode(secret["data"]["installation-id"]).decode())
        self.assertNotEqual(subnet, first_subnet)
        answer = await deferToThread(self.client, self.node, "provision", f"{self.lab.ip(4)}:8081",
                                     UUID, public_key(node_key))
        self.assertEqual(answer["server_address"], str(subnet.network_address + 1))
        self.assertEqual(ipaddress.IPv6Interface(answer["node_address_prefix"]).network, subnet)
        self.assertEqual(answer["server_endpoint"], [f"{self.lab.ip(4)}:51821"])
        tunnel2 = str(subnet.network_address + 1)
        for port in ("4001", "4002"):
            probe = await deferToThread(self.client, self.srv2, "kmsg", tunnel2, port,
                                        str(self.work / "kmsg.jsonl"), "3")
            self.assertEqual(probe.get("errno"), 111, probe)
        await deferToThread(second.stop)
