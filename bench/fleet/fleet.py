"""The fleet a benchmark loads (Servers, ServerClasses, allocated MetalMachines) and a small
Kubernetes-shaped REST client for the management socket and the API server (not product code).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

METAL = "metal.sidero.dev/v1alpha2"
INFRA = "infrastructure.cluster.x-k8s.io/v1alpha3"
MANUFACTURERS = ("Dell Inc.", "HPE", "Supermicro")
CPUS = ("Intel", "AMD")
NAMESPACE = "default"
ALLOC_CLASS = "bench-alloc"

#: A small Talos machine config (the shape `talosctl gen config` writes, trimmed).
BOOTSTRAP_CONFIG = """version: v1alpha1
machine:
  type: worker
  token: abcdef.0123456789abcdef
  ca:
    crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t
    key: ""
  kubelet:
    image: ghcr.io/siderolabs/kubelet:v1.30.0
  network: {}
  install:
    disk: /dev/sda
    image: ghcr.io/siderolabs/installer:v1.7.0
cluster:
  id: benchclusterid
  secret: benchclustersecret
  controlPlane:
    endpoint: https://10.0.0.1:6443
  clusterName: bench
  network:
    dnsDomain: cluster.local
    podSubnets: [10.244.0.0/16]
    serviceSubnets: [10.96.0.0/12]
  token: abcdef.0123456789abcdef
"""


def server_name(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-{i:012x}"


SERVER_FINALIZER = "storage.finalizers.server.k8s.io"


def server_status(i: int, machines: int) -> dict[str, Any]:
    """The status the Server controller gives server i once converged (fake power: on)."""
    bound = i < machines
    return {"ready": True, "power": "on", "inUse": bound, "isClean": not bound}


def server(i: int, finalizer: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": server_name(i), "labels": {"rack": f"r{i % 50}", "zone": f"z{i % 10}"}}
    if finalizer:
        meta["finalizers"] = [SERVER_FINALIZER]
    return {
        "apiVersion": METAL, "kind": "Server",
        "metadata": meta,
        "spec": {
            "accepted": True,
            "hardware": {
                "system": {"uuid": server_name(i), "manufacturer": MANUFACTURERS[i % 3],
                           "productName": f"model-{i % 7}", "serialNumber": f"SN{i:08d}"},
                "compute": {"processorCount": 1, "totalCoreCount": 8 << (i % 3),
                            "processors": [{"manufacturer": CPUS[i % 2], "coreCount": 8 << (i % 3)}]},
                "memory": {"totalSize": f"{32 << (i % 3)} GB"},
                "network": {"interfaceCount": 1, "interfaces": [
                    {"index": 1, "name": "eno1", "mac": mac(i), "mtu": 1500}]},
            },
        },
    }


def mac(i: int) -> str:
    return "52:54:" + ":".join(f"{(i >> s) & 0xff:02x}" for s in (24, 16, 8, 0))


def server_class(j: int) -> dict[str, Any]:
    """Class j: one manufacturer, one CPU vendor, one zone, racks other than one."""
    return {
        "apiVersion": METAL, "kind": "ServerClass",
        "metadata": {"name": f"class-{j:03d}"},
        "spec": {
            "qualifiers": {
                "hardware": [{"system": {"manufacturer": MANUFACTURERS[j % 3]},
                              "compute": {"processors": [{"manufacturer": CPUS[j % 2]}]}}],
                "labelSelectors": [{"zone": f"z{j % 10}"}],
            },
            "selector": {"matchExpressions": [{"key": "rack", "operator": "NotIn", "values": [f"r{j % 50}"]}]},
        },
    }


def alloc_class() -> dict[str, Any]:
    return {"apiVersion": METAL, "kind": "ServerClass", "metadata": {"name": ALLOC_CLASS}, "spec": {}}


def secret(k: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": f"bootstrap-{k:05d}", "namespace": NAMESPACE}, "type": "Opaque",
            "data": {"value": base64.b64encode(BOOTSTRAP_CONFIG.encode()).decode()}}


def metal_machine(k: int, server: str | None = None, server_class: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if server is not None:
        spec["serverRef"] = {"kind": "Server", "name": server}
    if server_class is not None:
        spec["serverClassRef"] = {"apiVersion": METAL, "kind": "ServerClass", "name": server_class}
    return {"apiVersion": INFRA, "kind": "MetalMachine",
            "metadata": {"name": f"mm-{k:05d}", "namespace": NAMESPACE,
                         "annotations": {"metal.sidero.dev/bootstrap-data-secret": f"bootstrap-{k:05d}"}},
            "spec": spec}


def binding(k: int, server: str) -> dict[str, Any]:
    return {"apiVersion": INFRA, "kind": "ServerBinding", "metadata": {"name": server},
            "spec": {"metalMachineRef": {"kind": "MetalMachine", "namespace": NAMESPACE, "name": f"mm-{k:05d}"}}}


def boot_fleet(servers: int, classes: int, machines: int, running: bool = False) -> Iterator[dict[str, Any]]:
    """Every object of the boot benchmark: machine k is bound to server k.  C{running}: the
    Servers carry the finalizer the controller adds (a fleet sidero already ran)."""
    for j in range(classes):
        yield server_class(j)
    for i in range(servers):
        yield server(i, finalizer=running)
    for k in range(machines):
        yield secret(k)
        yield metal_machine(k, server=server_name(k))
        yield binding(k, server_name(k))


def path_of(obj: dict[str, Any], name: bool = False, status: bool = False) -> str:
    api = obj["apiVersion"]
    plural = {"Server": "servers", "ServerClass": "serverclasses", "Secret": "secrets",
              "MetalMachine": "metalmachines", "ServerBinding": "serverbindings",
              "Namespace": "namespaces"}[obj["kind"]]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    namespace = obj["metadata"].get("namespace")
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    if name or status:
        path += "/" + obj["metadata"]["name"]
    if status:
        path += "/status"
    return path


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Rest:
    """JSON over one kept-alive connection (a unix socket, or TLS with a client certificate).
    One per thread."""

    def __init__(self, unix: str | None = None, host: str = "", port: int = 0,
                 ca: str | None = None, cert: tuple[str, str] | None = None, timeout: float = 60.0) -> None:
        self.unix, self.host, self.port, self.timeout = unix, host, port, timeout
        self._context: ssl.SSLContext | None = None
        if unix is None:
            context = ssl.create_default_context(cafile=ca)
            if cert is not None:
                context.load_cert_chain(*cert)
            self._context = context
        self._conn: http.client.HTTPConnection | None = None

    def clone(self) -> Rest:
        other = Rest.__new__(Rest)
        other.unix, other.host, other.port, other.timeout = self.unix, self.host, self.port, self.timeout
        other._context, other._conn = self._context, None
        return other

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.unix is not None:
                self._conn = _UnixConnection(self.unix, self.timeout)
            else:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=self._context)
        return self._conn

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
                continue
            return response.status, (json.loads(raw) if raw and raw[:1] in b"{[" else raw)
        raise AssertionError("unreachable")

    def raw(self, path: str) -> bytes:
        status, body = self.request("GET", path)
        return body if isinstance(body, bytes) else json.dumps(body).encode()

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        status, body = self.request("POST", path_of(obj), obj)
        if status not in (200, 201, 409):
            raise RuntimeError(f"create {obj['kind']} {obj['metadata']['name']}: {status} {body}")
        return body if isinstance(body, dict) else {}

    def get(self, obj: dict[str, Any]) -> dict[str, Any]:
        status, body = self.request("GET", path_of(obj, name=True))
        if status != 200:
            raise RuntimeError(f"get {obj['kind']} {obj['metadata']['name']}: {status} {body}")
        return body

    def patch(self, obj: dict[str, Any], patch: dict[str, Any], status: bool = False) -> dict[str, Any]:
        code, body = self.request("PATCH", path_of(obj, name=True, status=status), patch,
                                  "application/merge-patch+json")
        if code != 200:
            raise RuntimeError(f"patch {obj['kind']} {obj['metadata']['name']}: {code} {body}")
        return body

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.05) -> float:
    """Poll C{check()} until true; return the seconds it took."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not done after {timeout:g}s")
        time.sleep(interval)
