# -*- test-case-name: tests.capi.test_capi_manager -*-
"""
The real Cluster API for sidero's tests: clusterctl and the CAPI core controller manager, built
from the Go module proxy by C{scripts/build-capi} (this module finds the build, never builds).

L{sharedCAPI} starts, once per test process, a L{CAPIEnvironment}:

* a management kube-apiserver of its own (L{tests.k8s.apiserver.KubeAPIServer} with the garbage
  collector), not the process-wide shared one: CAPI registers cluster-scoped webhooks and CRDs
  for the cluster.x-k8s.io groups, which must not outlive the manager on a server other tests
  use, and the manager reconciles every namespace;
* CAPI's CRDs (the module's C{config/crd/bases}) with conversion webhooks where the module's
  kustomize patches put them, sidero's CRDs (C{deploy/crds}) and stand-in CRDs for the Talos
  bootstrap and control-plane providers (L{standin_crds});
* CAPI's mutating and validating webhooks (the module's C{config/webhook/manifests.yaml})
  registered with a URL C{clientConfig} to the manager's webhook port on 127.0.0.1, served with
  a certificate from a CA this module makes;
* the manager itself (C{cluster-api-manager --kubeconfig ... --webhook-cert-dir ...}), its log
  in the environment's directory (L{CAPIManager.log_tail});
* L{TalosStandIns}: a thread in the test process that does what CABPT and CACPPT would for
  each TalosConfig (a bootstrap Secret with a small Talos machine config, C{status.ready},
  C{status.dataSecretName}) and each TalosControlPlane (control-plane Machines for its
  replicas, the contract status fields).

Per process and not per test class, because the start costs ~10 s and ~500 MiB (API server,
controller manager, CAPI manager) and tests isolate themselves by namespace (CAPI reconciles
objects per namespace). A workload cluster is per test: L{CAPIEnvironment.start_workload_cluster}
starts another kube-apiserver (2-3 s) and stores its kubeconfig as the C{<cluster>-kubeconfig}
Secret CAPI's ClusterCache connects with.

MachineSet preflight checks (feature gate MachineSetPreflightChecks, on by default in v1.10)
hold Machine creation while the control plane "is provisioning" (no C{status.version}) or
"upgrading" (C{spec.version} != C{status.version}). They are not skipped here: the
control-plane stand-in publishes C{status.version = spec.version} as CACPPT does once its
machines run that version, so the checks run and pass.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from tests.k8s import apiserver
from tests.k8s.apiserver import KubeAPIServer, TinyCA, crd_manifests
from tests.paths import REPO

log = Logger()

BUILD_SCRIPT = REPO / "scripts" / "build-capi"
ENV_DIR = "SIDERO_CAPI_DIR"
ENV_REQUIRE = "SIDERO_REQUIRE_CAPI"

BOOTSTRAP_GROUP = "bootstrap.cluster.x-k8s.io"
CONTROL_PLANE_GROUP = "controlplane.cluster.x-k8s.io"
CAPI_GROUP = "cluster.x-k8s.io"
STANDIN_VERSION = "v1alpha3"
#: The labels that map the CAPI v1beta1 contract to a provider's API version (as CABPT/CACPPT).
CONTRACT_LABELS = {f"{CAPI_GROUP}/v1beta1": STANDIN_VERSION}
BOOTSTRAP_SECRET_TYPE = "cluster.x-k8s.io/secret"
#: On a TalosControlPlane: the stand-in keeps it "provisioning" (see L{TalosStandIns}).
PROVISIONING_ANNOTATION = "tests.sidero.dev/provisioning"


# --- the build ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CAPIBuild:
    """The output directory of C{scripts/build-capi}."""

    root: Path

    @property
    def clusterctl(self) -> Path:
        return self.root / "bin" / "clusterctl"

    @property
    def manager(self) -> Path:
        return self.root / "bin" / "cluster-api-manager"

    @property
    def crd_files(self) -> list[Path]:
        return sorted((self.root / "crd").glob("*.yaml"))

    @property
    def conversion_crds(self) -> set[str]:
        """CRDs the module's kustomize patches give a conversion webhook."""
        names = set()
        for p in sorted((self.root / "crd-patches").glob("*.yaml")):
            for doc in yaml.safe_load_all(p.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    names.add(doc["metadata"]["name"])
        return names

    @property
    def webhook_manifests(self) -> Path:
        return self.root / "webhook" / "manifests.yaml"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.yaml"

    @property
    def version(self) -> str:
        return (self.root / "version").read_text().strip()


def build_dir() -> tuple[Path | None, str]:
    """Where the build is (or would be): C{$SIDERO_CAPI_DIR}, else the script's C{--path}."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env), f"${ENV_DIR}={env}"
    try:
        out = subprocess.run([str(BUILD_SCRIPT), "--path"], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{BUILD_SCRIPT} --path failed: {e}"
    lines = out.stdout.strip().splitlines()
    return (Path(lines[-1]), lines[-1]) if lines else (None, f"{BUILD_SCRIPT} --path printed nothing")


def find_build() -> tuple[CAPIBuild | None, str]:
    root, where = build_dir()
    if root is None:
        return None, where
    build = CAPIBuild(root)
    for p in (build.clusterctl, build.manager):
        if not (p.is_file() and os.access(p, os.X_OK)):
            return None, (f"no Cluster API build: {p} ({where}) is missing; run scripts/build-capi"
                          " (needs Go; the cold build takes minutes)")
    return build, ""


def require_build() -> CAPIBuild:
    """The build, or a loud skip (a failure under C{$SIDERO_REQUIRE_CAPI=1}, which CI sets)."""
    build, reason = find_build()
    if build is not None:
        return build
    if os.environ.get(ENV_REQUIRE) == "1":
        raise AssertionError(f"{ENV_REQUIRE}=1 but {reason}")
    log.warn("SKIPPING Cluster API tests: {reason}", reason=reason)
    raise SkipTest(f"SKIPPED, Cluster API unavailable: {reason}")


def clusterctl_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for clusterctl that reads nothing of the caller's and calls no one:
    its own HOME/XDG dirs (no ~/.cluster-api, no overrides), no GitHub version check."""
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    env.update({
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "CLUSTERCTL_DISABLE_VERSIONCHECK": "true",
        "KUBECONFIG": str(home / "no-kubeconfig"),
    })
    env.update(extra)
    return env


# --- stand-in CRDs -----------------------------------------------------------------------------


def _standin_crd(group: str, kind: str, plural: str, *, scale: bool = False, version_name: str = STANDIN_VERSION,
                 categories: Iterable[str] = ("cluster-api",),
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A CRD that keeps any spec/status: enough for CAPI's contract, nothing of the provider."""
    version: dict[str, Any] = {
        "name": version_name, "served": True, "storage": True,
        "schema": {"openAPIV3Schema": {"type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        }}},
        "subresources": {"status": {}},
    }
    if scale:
        version["subresources"]["scale"] = {"specReplicasPath": ".spec.replicas",
                                            "statusReplicasPath": ".status.replicas",
                                            "labelSelectorPath": ".status.selector"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": dict(CONTRACT_LABELS if labels is None else labels)},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"kind": kind, "listKind": kind + "List", "plural": plural,
                           "singular": kind.lower(), "categories": list(categories)},
                 "versions": [version]},
    }


def standin_crds() -> list[dict[str, Any]]:
    """TalosConfig, TalosConfigTemplate (CABPT) and TalosControlPlane (CACPPT), v1alpha3."""
    return [
        _standin_crd(BOOTSTRAP_GROUP, "TalosConfig", "talosconfigs"),
        _standin_crd(BOOTSTRAP_GROUP, "TalosConfigTemplate", "talosconfigtemplates"),
        _standin_crd(CONTROL_PLANE_GROUP, "TalosControlPlane", "taloscontrolplanes", scale=True),
    ]


def cert_manager_standin_crds() -> list[dict[str, Any]]:
    """Issuer and Certificate (cert-manager.io/v1): clusterctl decides cert-manager is installed
    when it can create a test Issuer and Certificate (cert_manager.go, waitForAPIReady), and
    sidero's components contain one of each. Nothing issues certificates: no webhook of the
    installed providers is called in these tests."""
    return [
        _standin_crd("cert-manager.io", "Issuer", "issuers", version_name="v1", categories=("cert-manager",),
                     labels={}),
        _standin_crd("cert-manager.io", "Certificate", "certificates", version_name="v1",
                     categories=("cert-manager",), labels={}),
    ]


def _metadata(major: int, minor: int, contract: str = "v1beta1") -> dict[str, Any]:
    return {"apiVersion": "clusterctl.cluster.x-k8s.io/v1alpha3", "kind": "Metadata",
            "releaseSeries": [{"major": major, "minor": minor, "contract": contract}]}


@dataclass(frozen=True)
class LocalRepository:
    """
    A clusterctl local repository (C{{base}/{provider-label}/{version}/{file}}) and a
    clusterctl config naming it, for C{clusterctl init -b talos -c talos -i sidero} offline:

    * C{cluster-api/<CAPI version>/core-components.yaml}: Namespace capi-system and CAPI's CRDs
      from the module (the manager's Deployment, RBAC and webhooks are left out: nothing runs
      pods here), with the module's C{metadata.yaml};
    * C{bootstrap-talos/v0.6.0/}, C{control-plane-talos/v0.5.0/}: the Talos stand-in CRDs;
    * C{infrastructure-sidero/<our version>/}: C{deploy/clusterctl} as committed;
    * C{cert-manager/v1.16.0/cert-manager.yaml}: the cert-manager stand-in CRDs;
    * C{clusterctl.yaml}: the providers with C{file://} URLs (C{latest} for sidero, so
      clusterctl picks the version from the directory and metadata.yaml) and C{variables}.
    """

    root: Path
    build: CAPIBuild
    artifacts: Path = REPO / "deploy" / "clusterctl"

    @property
    def config(self) -> Path:
        return self.root / "clusterctl.yaml"

    def _dir(self, label: str, version: str) -> Path:
        d = self.root / label / version
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write(self, variables: dict[str, str] | None = None) -> Path:
        from sidero.api import clusterctl

        core = self._dir("cluster-api", self.build.version)
        capi_crds = [d for p in self.build.crd_files for d in yaml.safe_load_all(p.read_text()) if d]
        write_documents(core / "core-components.yaml", [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "capi-system"}}, *capi_crds])
        shutil.copy(self.build.metadata, core / "metadata.yaml")
        bootstrap = self._dir("bootstrap-talos", "v0.6.0")
        write_documents(bootstrap / "bootstrap-components.yaml", [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "cabpt-system"}},
            *[c for c in standin_crds() if c["spec"]["group"] == BOOTSTRAP_GROUP]])
        write_documents(bootstrap / "metadata.yaml", [_metadata(0, 6)])
        control_plane = self._dir("control-plane-talos", "v0.5.0")
        write_documents(control_plane / "control-plane-components.yaml", [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "cacppt-system"}},
            *[c for c in standin_crds() if c["spec"]["group"] == CONTROL_PLANE_GROUP]])
        write_documents(control_plane / "metadata.yaml", [_metadata(0, 5)])
        sidero = self._dir("infrastructure-sidero", clusterctl.provider_version())
        for name in (clusterctl.COMPONENTS_FILE, clusterctl.METADATA_FILE, clusterctl.TEMPLATE_FILE):
            shutil.copy(self.artifacts / name, sidero / name)
        # clusterctl reads the cert-manager manifest while fetching providers even when it then
        # finds cert-manager installed: the stand-in CRDs (what the test applied beforehand).
        cert_manager = self._dir("cert-manager", "v1.16.0")
        write_documents(cert_manager / "cert-manager.yaml", [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "cert-manager"}},
            *cert_manager_standin_crds()])
        url = f"file://{self.root}"
        config: dict[str, Any] = {
            "providers": [
                {"name": "cluster-api", "type": "CoreProvider",
                 "url": f"{url}/cluster-api/{self.build.version}/core-components.yaml"},
                {"name": "talos", "type": "BootstrapProvider",
                 "url": f"{url}/bootstrap-talos/v0.6.0/bootstrap-components.yaml"},
                {"name": "talos", "type": "ControlPlaneProvider",
                 "url": f"{url}/control-plane-talos/v0.5.0/control-plane-components.yaml"},
                {"name": "sidero", "type": "InfrastructureProvider",
                 "url": f"{url}/infrastructure-sidero/latest/{clusterctl.COMPONENTS_FILE}"},
            ],
            # Read, not installed (cert-manager is found installed); offline either way.
            "cert-manager": {"url": f"{url}/cert-manager/v1.16.0/cert-manager.yaml", "version": "v1.16.0"},
            **(variables or {}),
        }
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        return self.config


def write_documents(path: Path, docs: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs))
    return path


# --- webhooks ----------------------------------------------------------------------------------


def url_webhooks(manifests: Path, base_url: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    """CAPI's webhook configurations with each service C{clientConfig} turned into a URL on
    C{base_url} and our CA; names get kustomize's C{capi-} prefix, as clusterctl installs them."""
    ca = base64.b64encode(ca_bundle).decode("ascii")
    docs = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        doc["metadata"]["name"] = "capi-" + doc["metadata"]["name"]
        for webhook in doc.get("webhooks", []):
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": base_url + path, "caBundle": ca}
        docs.append(doc)
    return docs


def with_conversion(crd: dict[str, Any], base_url: str, ca_bundle: bytes) -> dict[str, Any]:
    crd = json.loads(json.dumps(crd))
    crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
        "conversionReviewVersions": ["v1", "v1beta1"],
        "clientConfig": {"url": base_url + "/convert", "caBundle": base64.b64encode(ca_bundle).decode("ascii")},
    }}
    return crd


# --- the manager process ------------------------------------------------------------------------


def listen_port() -> int:
    """A free loopback TCP port below the kernel's ephemeral range, so that no outgoing
    connection (the tests make many) takes it before the manager binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    for _ in range(200):
        port = random.randrange(10_000, max(ephemeral_low, 10_001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port below the ephemeral range")


class CAPIManager:
    """The CAPI core controller manager as a child process against one management server."""

    def __init__(self, build: CAPIBuild, kubeconfig: Path, workdir: Path, ca: TinyCA) -> None:
        self.build = build
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.cert_dir = workdir / "webhook-certs"
        self.cert_dir.mkdir(mode=0o700, exist_ok=True)
        serving = ca.issue("capi-webhook", server_names=["localhost"], server_ips=["127.0.0.1"])
        (self.cert_dir / "tls.crt").write_bytes(serving.cert + ca.cert_pem)
        (self.cert_dir / "tls.key").write_bytes(serving.key)
        self.webhook_port = listen_port()
        self.health_port = listen_port()
        self.diagnostics_port = listen_port()
        self.log_path = workdir / "capi-manager.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_after: float | None = None
        self._log_file: Any = None

    @property
    def webhook_url(self) -> str:
        return f"https://127.0.0.1:{self.webhook_port}"

    def args(self) -> list[str]:
        return [
            str(self.build.manager),
            f"--kubeconfig={self.kubeconfig}",
            f"--webhook-port={self.webhook_port}",
            f"--webhook-cert-dir={self.cert_dir}",
            f"--health-addr=127.0.0.1:{self.health_port}",
            f"--diagnostics-address=127.0.0.1:{self.diagnostics_port}",
            "--insecure-diagnostics=true",
            "--leader-elect=false",
            # Quick reconnects to workload clusters a test has just started.
            "--v=2",
        ]

    def launch(self) -> None:
        self._log_file = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            self.args(), stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            cwd=str(self.workdir), start_new_session=True, preexec_fn=apiserver._die_with_parent,
        )
        log.info("cluster-api-manager pid {pid}, webhooks on {url}", pid=self.process.pid, url=self.webhook_url)

    def probe(self, path: str = "/readyz") -> int:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Blocking: until C{/readyz} answers 200 (the webhook server is up then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"cluster-api-manager exited while starting; log tail:\n{self.log_tail()}")
            if self.probe() == 200:
                self.ready_after = time.monotonic() - self.started
                return
            time.sleep(0.3)
        raise AssertionError(f"cluster-api-manager not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return apiserver._tail(self.log_path, lines)

    def rss_bytes(self) -> int:
        return apiserver._rss(self.process)

    def stop(self, grace: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            apiserver._terminate(proc, grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# --- the Talos stand-ins ------------------------------------------------------------------------


def talos_machine_config(machine_type: str, cluster_name: str, endpoint: str | None) -> str:
    """A small Talos machine config (v1alpha1), what CABPT would put in the bootstrap Secret."""
    doc = {
        "version": "v1alpha1",
        "debug": False,
        "persist": True,
        "machine": {
            "type": machine_type,
            "token": f"{secrets.token_hex(3)}.{secrets.token_hex(8)}",
            "install": {"disk": "/dev/sda", "image": "ghcr.io/siderolabs/installer:v1.13.0"},
        },
        "cluster": {
            "clusterName": cluster_name,
            "controlPlane": {"endpoint": endpoint or "https://127.0.0.1:6443"},
            "network": {"dnsDomain": "cluster.local", "podSubnets": ["10.244.0.0/16"],
                        "serviceSubnets": ["10.96.0.0/12"]},
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


class TalosStandIns:
    """
    CABPT and CACPPT reduced to what CAPI's contract needs, polling the management server in a
    thread of its own (so nothing runs in the reactor between tests):

    * each TalosConfig without C{status.ready}: a Secret C{<name>-bootstrap-data} (type
      C{cluster.x-k8s.io/secret}, key C{value} = L{talos_machine_config}, owned by the
      TalosConfig, labelled with the cluster name), then C{status.ready: true} and
      C{status.dataSecretName};
    * each TalosControlPlane: one control-plane Machine per C{spec.replicas} (with a TalosConfig
      from C{spec.controlPlaneConfig} and an infrastructure machine cloned from
      C{spec.infrastructureTemplate}; scaling down deletes the newest), and the contract status:
      C{ready}, C{initialized} and C{version = spec.version} at once (it claims a working control
      plane from the start), the replica counts of its Machines (ready = with a C{nodeRef}) and
      C{selector}. With the annotation L{PROVISIONING_ANNOTATION} C{"true"} it stays
      "provisioning" instead (no Machines, not ready, not initialized, no C{status.version}).

    @ivar handled: names (namespace/name) of TalosConfigs given a Secret, for tests to check.
    """

    interval = 0.3

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        self.handled: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="talos-standins", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as e:  # a test's namespace going away mid-step, a restart
                self.errors.append(repr(e))
                del self.errors[:-20]
            self._stop.wait(self.interval)

    def step(self) -> None:
        """One pass over every TalosConfig and TalosControlPlane (blocking)."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        custom: Any = client.CustomObjectsApi(self.api_client)
        core: Any = client.CoreV1Api(self.api_client)
        for cfg in custom.list_cluster_custom_object(BOOTSTRAP_GROUP, STANDIN_VERSION, "talosconfigs")["items"]:
            status = cfg.get("status") or {}
            meta = cfg["metadata"]
            if status.get("ready") or meta.get("deletionTimestamp"):
                continue
            ns, name = meta["namespace"], meta["name"]
            cluster_name = (meta.get("labels") or {}).get(f"{CAPI_GROUP}/cluster-name", "")
            secret_name = f"{name}-bootstrap-data"
            spec = cfg.get("spec") or {}
            machine_type = "worker" if spec.get("generateType", "join") == "join" else "controlplane"
            endpoint = self._endpoint(custom, ns, cluster_name)
            secret = {
                "apiVersion": "v1", "kind": "Secret", "type": BOOTSTRAP_SECRET_TYPE,
                "metadata": {"name": secret_name, "namespace": ns,
                             "labels": {f"{CAPI_GROUP}/cluster-name": cluster_name},
                             "ownerReferences": [{"apiVersion": cfg["apiVersion"], "kind": "TalosConfig",
                                                  "name": name, "uid": meta["uid"], "controller": True}]},
                "stringData": {"value": talos_machine_config(machine_type, cluster_name, endpoint)},
            }
            try:
                core.create_namespaced_secret(ns, secret)
            except ApiException as e:
                if e.status != 409:
                    raise
            custom.patch_namespaced_custom_object_status(
                BOOTSTRAP_GROUP, STANDIN_VERSION, ns, "talosconfigs", name,
                {"status": {"ready": True, "dataSecretName": secret_name}})
            self.handled.append(f"{ns}/{name}")
        for cp in custom.list_cluster_custom_object(CONTROL_PLANE_GROUP, STANDIN_VERSION,
                                                    "taloscontrolplanes")["items"]:
            meta, spec = cp["metadata"], cp.get("spec") or {}
            if meta.get("deletionTimestamp"):
                continue
            replicas = int(spec.get("replicas") or 0)
            cluster_name = (meta.get("labels") or {}).get(f"{CAPI_GROUP}/cluster-name", "")
            provisioning = (meta.get("annotations") or {}).get(PROVISIONING_ANNOTATION) == "true"
            machines = self._control_plane_machines(custom, cp, cluster_name) if cluster_name else []
            if cluster_name and not provisioning:
                machines = self._scale_control_plane(custom, cp, cluster_name, machines, replicas)
            with_node = sum(1 for m in machines if (m.get("status") or {}).get("nodeRef"))
            wanted: dict[str, Any] = {
                "ready": not provisioning, "initialized": not provisioning,
                "replicas": len(machines), "readyReplicas": with_node, "updatedReplicas": len(machines),
                "unavailableReplicas": len(machines) - with_node,
                "selector": f"{CAPI_GROUP}/cluster-name={cluster_name},{CAPI_GROUP}/control-plane",
            }
            current = cp.get("status") or {}
            if provisioning and "version" in current:
                wanted["version"] = None  # a merge patch removes it
            elif not provisioning:
                wanted["version"] = spec.get("version", "")
            if any(current.get(k) != v for k, v in wanted.items()):
                custom.patch_namespaced_custom_object_status(
                    CONTROL_PLANE_GROUP, STANDIN_VERSION, meta["namespace"], "taloscontrolplanes",
                    meta["name"], {"status": wanted})

    @staticmethod
    def _control_plane_machines(custom: Any, cp: dict[str, Any], cluster_name: str) -> list[dict[str, Any]]:
        """The Machines this TalosControlPlane controls (not being deleted)."""
        meta = cp["metadata"]
        items = custom.list_namespaced_custom_object(
            CAPI_GROUP, "v1beta1", meta["namespace"], "machines",
            label_selector=f"{CAPI_GROUP}/cluster-name={cluster_name},{CAPI_GROUP}/control-plane")["items"]
        return [m for m in items if not m["metadata"].get("deletionTimestamp") and any(
            o.get("uid") == meta["uid"] and o.get("controller") for o in m["metadata"].get("ownerReferences", []))]

    def _scale_control_plane(self, custom: Any, cp: dict[str, Any], cluster_name: str,
                             machines: list[dict[str, Any]], replicas: int) -> list[dict[str, Any]]:
        """What CACPPT does with spec.replicas: one Machine per replica, each with a
        TalosConfig and an infrastructure machine cloned from spec.infrastructureTemplate
        (CAPI's Machine controller then owns both); extra Machines are deleted, newest first."""
        meta, spec = cp["metadata"], cp.get("spec") or {}
        ns = meta["namespace"]
        machines = sorted(machines, key=lambda m: m["metadata"]["creationTimestamp"])
        while len(machines) > replicas:
            victim = machines.pop()
            custom.delete_namespaced_custom_object(CAPI_GROUP, "v1beta1", ns, "machines", victim["metadata"]["name"])
        template_ref = spec.get("infrastructureTemplate") or {}
        if len(machines) >= replicas or not template_ref.get("name"):
            return machines
        group, _, version = template_ref["apiVersion"].rpartition("/")
        plural = template_ref["kind"].lower() + "s"
        template = custom.get_namespaced_custom_object(group, version, ns, plural, template_ref["name"])
        labels = {f"{CAPI_GROUP}/cluster-name": cluster_name, f"{CAPI_GROUP}/control-plane": ""}
        owner = {"apiVersion": cp["apiVersion"], "kind": "TalosControlPlane", "name": meta["name"],
                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
        configs = spec.get("controlPlaneConfig") or {}
        while len(machines) < replicas:
            name = f"{meta['name']}-{secrets.token_hex(3)}"
            infra_kind = template_ref["kind"].removesuffix("Template")
            custom.create_namespaced_custom_object(group, version, ns, infra_kind.lower() + "s", {
                "apiVersion": template_ref["apiVersion"], "kind": infra_kind,
                "metadata": {"name": name, "namespace": ns, "labels": dict(labels), "annotations": {
                    f"{CAPI_GROUP}/cloned-from-name": template_ref["name"],
                    f"{CAPI_GROUP}/cloned-from-groupkind": f"{template_ref['kind']}.{group}"}},
                "spec": ((template.get("spec") or {}).get("template") or {}).get("spec") or {},
            })
            config = configs.get("init") if not machines and configs.get("init") else configs.get("controlplane")
            custom.create_namespaced_custom_object(BOOTSTRAP_GROUP, STANDIN_VERSION, ns, "talosconfigs", {
                "apiVersion": f"{BOOTSTRAP_GROUP}/{STANDIN_VERSION}", "kind": "TalosConfig",
                "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
                "spec": dict(config or {"generateType": "controlplane"}),
            })
            machine = custom.create_namespaced_custom_object(CAPI_GROUP, "v1beta1", ns, "machines", {
                "apiVersion": f"{CAPI_GROUP}/v1beta1", "kind": "Machine",
                "metadata": {"name": name, "namespace": ns, "labels": dict(labels), "ownerReferences": [owner]},
                "spec": {
                    "clusterName": cluster_name, "version": spec.get("version"),
                    "bootstrap": {"configRef": {"apiVersion": f"{BOOTSTRAP_GROUP}/{STANDIN_VERSION}",
                                                "kind": "TalosConfig", "name": name, "namespace": ns}},
                    "infrastructureRef": {"apiVersion": template_ref["apiVersion"], "kind": infra_kind,
                                          "name": name, "namespace": ns},
                },
            })
            machines.append(machine)
        return machines

    @staticmethod
    def _endpoint(custom: Any, namespace: str, cluster_name: str) -> str | None:
        from kubernetes.client.rest import ApiException

        if not cluster_name:
            return None
        try:
            cluster = custom.get_namespaced_custom_object(CAPI_GROUP, "v1beta1", namespace, "clusters", cluster_name)
        except ApiException:
            return None
        ep = (cluster.get("spec") or {}).get("controlPlaneEndpoint") or {}
        return f"https://{ep['host']}:{ep.get('port', 6443)}" if ep.get("host") else None


# --- the environment ----------------------------------------------------------------------------


class CAPIEnvironment:
    """
    A management kube-apiserver running the real CAPI core manager, CAPI's and sidero's CRDs,
    CAPI's webhooks and the Talos stand-ins.

    @ivar management: the management L{KubeAPIServer} (admin kubeconfig: C{management.kubeconfig};
        C{management.kubectl(...)}, C{management.api_client()}).
    @ivar manager: the L{CAPIManager} process (C{manager.log_tail()} for failure messages).
    @ivar standins: the L{TalosStandIns} thread.
    @ivar build: the L{CAPIBuild} (clusterctl, CRDs, version).
    """

    def __init__(self, build: CAPIBuild, binary: Path) -> None:
        self.build = build
        self.management = KubeAPIServer(binary, controller_manager=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="sidero-capi-"))
        self.ca = TinyCA("sidero-test-capi-webhook-ca")
        self.manager: CAPIManager | None = None
        self.standins: TalosStandIns | None = None
        self._api_client: Any = None
        self.started_after: float | None = None

    async def start(self) -> CAPIEnvironment:
        began = time.monotonic()
        await self.management.start()
        self.manager = CAPIManager(self.build, self.management.kubeconfig, self.workdir, self.ca)
        await threads.deferToThread(self._install)
        self.manager.launch()
        await threads.deferToThread(self.manager.wait_ready)
        self._api_client = self.management.api_client()
        self.standins = TalosStandIns(self._api_client)
        self.standins.start()
        self.started_after = time.monotonic() - began
        log.info("CAPI environment ready after {s:.1f}s (manager {m:.1f}s)", s=self.started_after,
                 m=self.manager.ready_after or 0.0)
        return self

    def _install(self) -> None:
        """CRDs (CAPI's with URL conversion, sidero's, the stand-ins) and CAPI's webhooks."""
        assert self.manager is not None
        base = self.manager.webhook_url
        ca = self.ca.cert_pem
        convert = self.build.conversion_crds
        capi = []
        for p in self.build.crd_files:
            for doc in yaml.safe_load_all(p.read_text()):
                if doc:
                    capi.append(with_conversion(doc, base, ca) if doc["metadata"]["name"] in convert else doc)
        files = [write_documents(self.workdir / "capi-crds.yaml", capi),
                 write_documents(self.workdir / "standin-crds.yaml", standin_crds()),
                 *crd_manifests()]
        self.management.apply_crds(files, timeout=120)
        hooks = write_documents(self.workdir / "capi-webhooks.yaml",
                                url_webhooks(self.build.webhook_manifests, base, ca))
        result = self.management.kubectl("apply", "-f", str(hooks))
        if result.returncode != 0:
            raise AssertionError(f"applying CAPI's webhooks: {result.stderr}")

    def api_client(self) -> Any:
        """The admin client of the management server (shared; do not close it)."""
        return self._api_client

    def stop(self) -> None:
        if self.standins is not None:
            self.standins.stop()
        if self.manager is not None:
            self.manager.stop()
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = None
        self.management.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- helpers for tests -------------------------------------------------------------------

    def create_namespace(self, test: TestCase, prefix: str = "capi") -> str:
        """A fresh namespace, deleted at the end of C{test} (blocking; call from a thread or
        setUp)."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        result = self.management.kubectl("create", "namespace", name)
        if result.returncode != 0:
            raise AssertionError(f"creating namespace {name}: {result.stderr}")
        test.addCleanup(lambda: threads.deferToThread(
            self.management.kubectl, "delete", "namespace", name, "--wait=false"))
        return name

    async def start_workload_cluster(self, test: TestCase, namespace: str, cluster_name: str) -> KubeAPIServer:
        """
        Another kube-apiserver as the workload cluster of Cluster C{namespace/cluster_name}: its
        admin kubeconfig is stored as Secret C{<cluster_name>-kubeconfig} (key C{value}, type
        C{cluster.x-k8s.io/secret}), which CAPI's ClusterCache uses once the Cluster's
        infrastructure is ready. Stopped at the end of C{test}.
        """
        workload = KubeAPIServer(self.management.binary)
        test.addCleanup(lambda: threads.deferToThread(workload.stop))
        await workload.start()
        kubeconfig = workload.kubeconfig.read_bytes()

        def store() -> None:
            from kubernetes import client

            core: Any = client.CoreV1Api(self._api_client)
            core.create_namespaced_secret(namespace, {
                "apiVersion": "v1", "kind": "Secret", "type": BOOTSTRAP_SECRET_TYPE,
                "metadata": {"name": f"{cluster_name}-kubeconfig", "namespace": namespace,
                             "labels": {f"{CAPI_GROUP}/cluster-name": cluster_name}},
                "data": {"value": base64.b64encode(kubeconfig).decode("ascii")},
            })

        await threads.deferToThread(store)
        return workload

    def diagnostics(self) -> str:
        """What to print when a test times out: the manager's and the stand-ins' state."""
        assert self.manager is not None
        errors = self.standins.errors[-5:] if self.standins is not None else []
        return f"stand-in errors: {errors}\ncluster-api-manager log tail:\n{self.manager.log_tail()}"


_shared: CAPIEnvironment | None = None
_shared_failure: Exception | None = None
_shared_waiters: list[defer.Deferred[CAPIEnvironment]] | None = None


def sharedCAPI() -> defer.Deferred[CAPIEnvironment]:
    """
    The process-wide L{CAPIEnvironment}, started on first use (await it in C{setUp}). Skips
    loudly without the CAPI build or the kube-apiserver binary (fails instead under
    C{$SIDERO_REQUIRE_CAPI=1} / C{$SIDERO_REQUIRE_KUBEAPISERVER=1}); a failed start is remembered
    so later tests fail fast with the same reason. Stopped at interpreter exit; never stop it.
    """
    global _shared, _shared_waiters
    build = require_build()
    binary = apiserver.require_binary()
    if _shared_failure is not None:
        return defer.fail(AssertionError(f"shared CAPI environment failed to start: {_shared_failure}"))
    if _shared is not None and _shared_waiters is None:
        return defer.succeed(_shared)
    waiter: defer.Deferred[CAPIEnvironment] = defer.Deferred()
    if _shared_waiters is not None:
        _shared_waiters.append(waiter)
        return waiter
    env = CAPIEnvironment(build, binary)
    _shared = env
    _shared_waiters = [waiter]
    atexit.register(env.stop)

    def done(result: Any) -> None:
        global _shared_waiters, _shared_failure
        waiters, _shared_waiters = _shared_waiters or [], None
        if isinstance(result, CAPIEnvironment):
            for w in waiters:
                w.callback(result)
            return
        _shared_failure = result.value
        env.stop()
        for w in waiters:
            w.errback(result)

    defer.Deferred.fromCoroutine(env.start()).addBoth(done)
    return waiter


async def eventually(what: str, check: Callable[[], Any], timeout: float = 90.0,
                     diagnostics: Callable[[], str] | None = None) -> Any:
    """Poll C{check} in a thread until it returns a true value; fail with the last value and
    C{diagnostics()} after C{timeout}."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await threads.deferToThread(check)
        except Exception as e:  # a 404 before the object exists, a connection reset
            last = e
        if last and not isinstance(last, Exception):
            return last
        await deferLater(reactor, 0.5, lambda: None)
    extra = f"\n{diagnostics()}" if diagnostics is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last result {last!r}{extra}")
