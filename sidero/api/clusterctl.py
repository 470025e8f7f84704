# -*- test-case-name: tests.capi.test_artifacts -*-
"""Generate sidero's clusterctl provider artifacts, as a Sidero release ships them.

C{python -m sidero.api.clusterctl [--output deploy/clusterctl]} writes:

* C{metadata.yaml}: the clusterctl C{Metadata} mapping this release series to the Cluster API
  contract (v1beta1);
* C{infrastructure-components.yaml}: everything C{clusterctl init -i sidero} applies: the
  C{sidero-system} Namespace, every CRD (from L{sidero.api.crdgen}, with cert-manager CA
  injection), the ServiceAccount and its least-privilege RBAC, the webhook Service, cert-manager
  Issuer and Certificate, the Deployment running C{twistd sidero}, the Services of spec §0.2 and
  the ValidatingWebhookConfiguration. Installation variables are clusterctl's
  C{${NAME:=default}} with the defaults of the Go manifest (spec §3.13);
* C{cluster-template.yaml}: the default flavour of spec §5.

The output is deterministic, so the committed files are compared with fresh ones by a test.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

import sidero
from sidero import config
from sidero.api import crdgen, registry
from sidero.api.registry import ResourceType

Object = dict[str, Any]

PROVIDER = "sidero"
NAMESPACE = crdgen.WEBHOOK_SERVICE_NAMESPACE
CONTRACT = "v1beta1"
METADATA_FILE = "metadata.yaml"
COMPONENTS_FILE = "infrastructure-components.yaml"
TEMPLATE_FILE = "cluster-template.yaml"

SERVICE_ACCOUNT = "sidero-controller-manager"
DEPLOYMENT = "sidero-controller-manager"
CLUSTER_ROLE = "sidero-manager-role"
LEADER_ROLE = "sidero-leader-election-role"
WEBHOOK_SERVICE = crdgen.WEBHOOK_SERVICE_NAME
ISSUER = "sidero-selfsigned-issuer"
CERTIFICATE = "sidero-serving-cert"
CERT_SECRET = "sidero-webhook-service-cert"
POD_LABELS = {"app": "sidero", "control-plane": "sidero-controller-manager"}
#: The process serves both managers' webhooks on one port (spec §1.6).
WEBHOOK_PORT = 9443
STATE_DIR = config.DEFAULT_STATE_DIR

#: The container image: no registry publishes one for this project, so the default names a
#: locally loaded image (C{localhost/...} is never pulled from Docker Hub by mistake).
IMAGE_VARIABLE = "SIDERO_CONTROLLER_MANAGER_IMAGE"
IMAGE_PULL_POLICY_VARIABLE = "SIDERO_CONTROLLER_MANAGER_IMAGE_PULL_POLICY"

CM = config.CM

#: Installation variables whose Go default differs from the setting's own default text:
#: C{-} ("empty") is the Go manifest's spelling of "use the computed default".
_GO_DEFAULTS = {
    CM + "API_ENDPOINT": "-",
    CM + "CONTAINER_API_PORT": "8081",
    CM + "SIDEROLINK_ENDPOINT": "-",
    CM + "EXTRA_AGENT_KERNEL_ARGS": "-",
    CM + "EVENTS_NEGATIVE_ADDRESS_FILTER": "-",
}


def var(name: str, default: str | None = None) -> str:
    """A clusterctl variable reference: C{${NAME}} (required) or C{${NAME:=default}}."""
    return f"${{{name}}}" if default is None else f"${{{name}:={default}}}"


_PRE_RELEASE = {"a": "alpha", "b": "beta", "rc": "rc"}


def provider_version(version: str = sidero.__version__) -> str:
    """The release tag clusterctl knows this build by: the package version as semver.

    C{0.1.0} -> C{v0.1.0}; C{0.1.0rc1} -> C{v0.1.0-rc.1}; C{0.1.0.dev0} -> C{v0.1.0-dev.0}
    (semver orders C{dev} before C{rc}, as PEP 440 does).
    """
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:(a|b|rc)(\d+))?(?:\.post(\d+))?(?:\.dev(\d+))?", version)
    if m is None:
        raise ValueError(f"version {version!r} has no semver form (want X.Y.Z[aN|bN|rcN][.postN][.devN])")
    major, minor, patch, pre, pre_n, post, dev = m.groups()
    tag = f"v{major}.{minor}.{patch}"
    parts = []
    if pre:
        parts.append(f"{_PRE_RELEASE[pre]}.{pre_n}")
    if dev is not None:
        parts.append(f"dev.{dev}")
    if parts:
        tag += "-" + ".".join(parts)
    if post is not None:
        tag += f"+post.{post}"
    return tag


def release_series(version: str = sidero.__version__) -> tuple[int, int]:
    """(major, minor) of this release."""
    m = re.match(r"(\d+)\.(\d+)\.", version)
    if m is None:
        raise ValueError(f"version {version!r} does not start with X.Y.")
    return int(m.group(1)), int(m.group(2))


# --- metadata.yaml ------------------------------------------------------------------------------


def metadata(version: str = sidero.__version__) -> Object:
    """clusterctl's Metadata: this release series implements the v1beta1 contract.

    (Go Sidero's file also maps its history, 0.1-0.3 to v1alpha3 and 0.4 to v1alpha4; this
    project's own 0.x releases all implement v1beta1, so only its series is listed.)
    """
    major, minor = release_series(version)
    return {
        "apiVersion": "clusterctl.cluster.x-k8s.io/v1alpha3",
        "kind": "Metadata",
        "releaseSeries": [{"major": major, "minor": minor, "contract": CONTRACT}],
    }


# --- RBAC ---------------------------------------------------------------------------------------

STORE_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
STATUS_VERBS = ("get", "update", "patch")


@dataclass(frozen=True)
class Access:
    """What the process does to one resource through the API server, and why."""

    group: str
    resource: str
    verbs: tuple[str, ...]
    why: str
    namespaced_role: bool = False  # granted in sidero-system only (a Role)


def _custom_access(kind: ResourceType) -> list[Access]:
    found = [Access(kind.group, kind.plural, STORE_VERBS, "the store: our own kind")]
    if kind.status_subresource:
        found.append(Access(kind.group, kind.plural + "/status", STATUS_VERBS,
                            "the store: status writes of our own kind"))
    return found


#: Kinds that are not ours. tests/capi/test_rbac.py derives what the code does to each from the
#: source and checks it is all granted here.
FOREIGN_ACCESS: tuple[Access, ...] = (
    Access("", "secrets", ("get", "list", "watch", "create", "update"),
           "BMC credentials (default/<uuid>-bmc), the SideroLink secret (default/siderolink),"
           " workload kubeconfigs (read), and bootstrap data, which /configdata serves from an"
           " informer cache (list, watch)"),
    Access("", "events", ("create", "patch"), "Events, de-duplicated by count bumps"),
    Access(registry.CAPI_GROUP, "clusters", ("get", "list", "watch"),
           "CAPI Clusters owning MetalClusters (read)"),
    Access(registry.CAPI_GROUP, "machines", ("get", "list", "watch"),
           "CAPI Machines owning MetalMachines (read)"),
    Access(registry.COORDINATION_GROUP, "leases", ("get", "list", "watch", "create", "update"),
           "leader election Lease in sidero-system", namespaced_role=True),
)


def access() -> tuple[Access, ...]:
    """Everything the process is granted, our kinds first."""
    found: list[Access] = []
    for kind in registry.CUSTOM_KINDS:
        found += _custom_access(kind)
    return (*found, *FOREIGN_ACCESS)


def _rules(entries: Iterable[Access]) -> list[Object]:
    """RBAC rules, one per (group, verbs) with the resources sorted."""
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for a in entries:
        grouped.setdefault((a.group, a.verbs), []).append(a.resource)
    return [{"apiGroups": [group], "resources": sorted(resources), "verbs": list(verbs)}
            for (group, verbs), resources in sorted(grouped.items())]


def rbac() -> list[Object]:
    """ServiceAccount, ClusterRole + binding, Role (leases in sidero-system) + binding."""
    entries = access()
    subject = [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]
    labels = {"app": "sidero"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": CLUSTER_ROLE, "labels": labels},
         "rules": _rules(a for a in entries if not a.namespaced_role)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "sidero-manager-rolebinding", "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CLUSTER_ROLE},
         "subjects": subject},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": LEADER_ROLE, "namespace": NAMESPACE, "labels": labels},
         "rules": _rules(a for a in entries if a.namespaced_role)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "sidero-leader-election-rolebinding", "namespace": NAMESPACE, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LEADER_ROLE},
         "subjects": subject},
    ]


# --- the Deployment -----------------------------------------------------------------------------


def installation_variables() -> list[tuple[str, config.Setting, str]]:
    """C{(variable, setting, default)} for every setting read from a
    C{SIDERO_CONTROLLER_MANAGER_*} variable: each becomes C{--flag=${VARIABLE:=default}}."""
    found = []
    for setting in config.SETTINGS:
        for env in setting.env:
            if env.startswith(CM):
                found.append((env, setting, _GO_DEFAULTS.get(env, setting.default)))
                break
    return found


def variable_default(name: str) -> str:
    """The default of one installation variable (KeyError if there is none by that name)."""
    for env, _, default in installation_variables():
        if env == name:
            return default
    raise KeyError(name)


#: Fixed flags: the Kubernetes store with leader election; cert-manager owns the webhook
#: certificate and registration (CA injection into the CRDs and the configuration below),
#: so the process does not patch CRDs or create webhook configurations itself.
FIXED_ARGS = (
    "--store=kubernetes",
    "--enable-leader-election=true",
    f"--state-dir={STATE_DIR}",
    f"--webhook-port={WEBHOOK_PORT}",
    "--webhook-register=false",
)


def deployment_args() -> list[str]:
    return [*FIXED_ARGS, *(f"{setting.flag}={var(env, default)}" for env, setting, default in installation_variables())]


HEALTH_PORT = 9440
METRICS_PORT = 8443


def _port_var(name: str) -> str:
    return var(name, variable_default(name))


def deployment() -> Object:
    http_port = _port_var(CM + "CONTAINER_API_PORT")
    # controller-runtime's probe server and metrics ports (--health-port, --metrics-port defaults).
    probe = {"httpGet": {"path": "/healthz", "port": "healthz"}, "initialDelaySeconds": 15, "periodSeconds": 20}
    ready = {"httpGet": {"path": "/readyz", "port": "healthz"}, "initialDelaySeconds": 5, "periodSeconds": 10}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": NAMESPACE, "labels": dict(POD_LABELS)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": var(CM + "DEPLOYMENT_STRATEGY", "RollingUpdate")},
            "selector": {"matchLabels": {"control-plane": POD_LABELS["control-plane"]}},
            "template": {
                "metadata": {"labels": dict(POD_LABELS)},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "hostNetwork": var(CM + "HOST_NETWORK", "false"),
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "terminationGracePeriodSeconds": 10,
                    "containers": [{
                        "name": "manager",
                        "image": var(IMAGE_VARIABLE, f"localhost/sidero:{provider_version()}"),
                        "imagePullPolicy": var(IMAGE_PULL_POLICY_VARIABLE, "IfNotPresent"),
                        "command": ["twistd", "--nodaemon", "--pidfile=", "sidero"],
                        "args": deployment_args(),
                        "env": [
                            # --api-endpoint=- falls through to this: the node's address (spec §3.13).
                            {"name": "API_ENDPOINT", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "GRPC_ENFORCE_ALPN_ENABLED", "value": "false"},
                            {"name": "PYTHONUNBUFFERED", "value": "1"},
                        ],
                        "ports": [
                            {"name": "dhcp", "containerPort": 67, "protocol": "UDP"},
                            {"name": "pxe", "containerPort": 4011, "protocol": "UDP"},
                            {"name": "tftp", "containerPort": 69, "protocol": "UDP"},
                            {"name": "http", "containerPort": http_port, "protocol": "TCP"},
                            {"name": "siderolink", "containerPort": _port_var(CM + "SIDEROLINK_PORT"),
                             "protocol": "UDP"},
                            {"name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP"},
                            {"name": "healthz", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                        ],
                        "livenessProbe": probe,
                        "readinessProbe": ready,
                        "resources": {"limits": {"cpu": "1", "memory": "512Mi"},
                                      "requests": {"cpu": "100m", "memory": "128Mi"}},
                        # Ports 67/69, DHCP broadcast on one interface, WireGuard (netlink, tun).
                        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"]}},
                        "volumeMounts": [
                            {"name": "cert", "mountPath": "/tmp/k8s-webhook-server/serving-certs", "readOnly": True},
                            {"name": "state", "mountPath": STATE_DIR},
                            {"name": "dev-tun", "mountPath": "/dev/net/tun"},
                        ],
                    }],
                    "volumes": [
                        {"name": "cert", "secret": {"secretName": CERT_SECRET, "defaultMode": 420}},
                        {"name": "state", "emptyDir": {}},
                        {"name": "dev-tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}},
                    ],
                },
            },
        },
    }


def _service(name: str, ports: list[Object], *, selector: dict[str, str] | None = None) -> Object:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "sidero"}},
        "spec": {"selector": dict(selector or {"control-plane": POD_LABELS["control-plane"]}), "ports": ports},
    }


def services() -> list[Object]:
    """The endpoints of spec §0.2 and the webhook Service cert-manager's certificate names."""
    return [
        _service(WEBHOOK_SERVICE, [{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]),
        _service("sidero-dhcp", [{"name": "dhcp", "port": 67, "targetPort": "dhcp", "protocol": "UDP"}]),
        _service("sidero-tftp", [{"name": "tftp", "port": 69, "targetPort": "tftp", "protocol": "UDP"}]),
        _service("sidero-http", [{"name": "http", "port": _port_var(CM + "API_PORT"), "targetPort": "http",
                                  "protocol": "TCP"}]),
        _service("sidero-siderolink", [{"name": "siderolink", "port": _port_var(CM + "SIDEROLINK_PORT"),
                                        "targetPort": "siderolink", "protocol": "UDP"}]),
    ]


def certificates() -> list[Object]:
    """cert-manager's self-signed Issuer and the webhook serving Certificate (clusterctl installs
    cert-manager before any provider)."""
    return [
        {"apiVersion": "cert-manager.io/v1", "kind": "Issuer",
         "metadata": {"name": ISSUER, "namespace": NAMESPACE}, "spec": {"selfSigned": {}}},
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
         "metadata": {"name": CERTIFICATE, "namespace": NAMESPACE},
         "spec": {
             "dnsNames": [f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc", f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc.cluster.local"],
             "issuerRef": {"kind": "Issuer", "name": ISSUER},
             "secretName": CERT_SECRET,
         }},
    ]


INJECT_CA = {"cert-manager.io/inject-ca-from": f"{NAMESPACE}/{CERTIFICATE}"}


def crds() -> list[Object]:
    """Every CRD as crdgen makes it; those with a conversion webhook get cert-manager's CA."""
    found = []
    for kind in registry.CUSTOM_KINDS:
        crd = crdgen.crd(kind)
        if "conversion" in crd["spec"]:
            crd["metadata"]["annotations"] = dict(INJECT_CA)
        found.append(crd)
    return found


def validating_webhook_configuration() -> Object:
    from sidero.k8s.webhook.registration import WebhookEndpoint
    from sidero.k8s.webhook.registration import validating_webhook_configuration as make

    body = make(WebhookEndpoint(service_name=WEBHOOK_SERVICE, service_namespace=NAMESPACE), b"")
    for webhook in body["webhooks"]:
        webhook["clientConfig"].pop("caBundle", None)  # cainjector fills it
    body["metadata"]["annotations"] = dict(INJECT_CA)
    return body


def namespace() -> Object:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"app": "sidero",
                                                       "pod-security.kubernetes.io/enforce": "privileged"}}}


def components() -> list[Object]:
    return [namespace(), *crds(), *rbac(), *services(), *certificates(), deployment(),
            validating_webhook_configuration()]


# --- cluster-template.yaml ------------------------------------------------------------------------

TEMPLATE_VARIABLES = (
    "CLUSTER_NAME", "CONTROL_PLANE_ENDPOINT", "CONTROL_PLANE_PORT", "CONTROL_PLANE_SERVERCLASS",
    "WORKER_SERVERCLASS", "KUBERNETES_VERSION", "TALOS_VERSION", "CONTROL_PLANE_MACHINE_COUNT",
    "WORKER_MACHINE_COUNT",
)
INFRA_API = "infrastructure.cluster.x-k8s.io/v1alpha3"
CAPI_API = "cluster.x-k8s.io/v1beta1"
CONTROL_PLANE_API = "controlplane.cluster.x-k8s.io/v1alpha3"
BOOTSTRAP_API = "bootstrap.cluster.x-k8s.io/v1alpha3"


def _metal_machine_template(name: str, server_class: str) -> Object:
    return {
        "apiVersion": INFRA_API, "kind": "MetalMachineTemplate", "metadata": {"name": name},
        "spec": {"template": {"spec": {"serverClassRef": {
            "apiVersion": registry.SERVER_CLASS.api_version, "kind": "ServerClass",
            "name": server_class, "namespace": "default",
        }}}},
    }


def cluster_template() -> list[Object]:
    """Spec §5: one control plane (TalosControlPlane) and one MachineDeployment of workers."""
    name = var("CLUSTER_NAME")
    return [
        {"apiVersion": CAPI_API, "kind": "Cluster", "metadata": {"name": name, "namespace": "default"},
         "spec": {
             "clusterNetwork": {"pods": {"cidrBlocks": ["10.244.0.0/16"]},
                                "services": {"cidrBlocks": ["10.96.0.0/12"]}},
             "infrastructureRef": {"apiVersion": INFRA_API, "kind": "MetalCluster", "name": name,
                                   "namespace": "default"},
             "controlPlaneRef": {"apiVersion": CONTROL_PLANE_API, "kind": "TalosControlPlane",
                                 "name": f"{name}-cp"},
         }},
        {"apiVersion": INFRA_API, "kind": "MetalCluster", "metadata": {"name": name},
         "spec": {"controlPlaneEndpoint": {"host": var("CONTROL_PLANE_ENDPOINT"),
                                           "port": var("CONTROL_PLANE_PORT")}}},
        _metal_machine_template(f"{name}-cp", var("CONTROL_PLANE_SERVERCLASS")),
        {"apiVersion": CONTROL_PLANE_API, "kind": "TalosControlPlane", "metadata": {"name": f"{name}-cp"},
         "spec": {
             "version": var("KUBERNETES_VERSION"),
             "replicas": var("CONTROL_PLANE_MACHINE_COUNT"),
             "infrastructureTemplate": {"kind": "MetalMachineTemplate", "apiVersion": INFRA_API,
                                        "name": f"{name}-cp", "namespace": "default"},
             "controlPlaneConfig": {"controlplane": {"generateType": "controlplane",
                                                     "talosVersion": var("TALOS_VERSION")}},
         }},
        {"apiVersion": BOOTSTRAP_API, "kind": "TalosConfigTemplate", "metadata": {"name": f"{name}-workers"},
         "spec": {"template": {"spec": {"generateType": "join", "talosVersion": var("TALOS_VERSION")}}}},
        {"apiVersion": CAPI_API, "kind": "MachineDeployment", "metadata": {"name": f"{name}-workers"},
         "spec": {
             "clusterName": name,
             "replicas": var("WORKER_MACHINE_COUNT"),
             "selector": {"matchLabels": None},
             "template": {"spec": {
                 "clusterName": name,
                 "version": var("KUBERNETES_VERSION"),
                 "bootstrap": {"configRef": {"apiVersion": BOOTSTRAP_API, "kind": "TalosConfigTemplate",
                                             "name": f"{name}-workers"}},
                 "infrastructureRef": {"apiVersion": INFRA_API, "kind": "MetalMachineTemplate",
                                       "name": f"{name}-workers"},
             }},
         }},
        _metal_machine_template(f"{name}-workers", var("WORKER_SERVERCLASS")),
    ]


# --- rendering ----------------------------------------------------------------------------------


def render_documents(objects: Sequence[Object]) -> str:
    """YAML documents, stable byte for byte; every C{${...}} is a plain scalar so that after
    clusterctl's substitution numbers and booleans are typed as such."""
    text = "".join("---\n" + yaml.safe_dump(copy.deepcopy(o), sort_keys=False, default_flow_style=False,
                                            width=100) for o in objects)
    if re.search(r"""['"]\$\{""", text):
        raise ValueError("a clusterctl variable was emitted quoted: it would stay a string")
    return text


def manifests() -> dict[str, str]:
    """File name -> text of every artifact."""
    return {
        METADATA_FILE: render_documents([metadata()]),
        COMPONENTS_FILE: render_documents(components()),
        TEMPLATE_FILE: render_documents(cluster_template()),
    }


def write(output: str) -> list[str]:
    os.makedirs(output, exist_ok=True)
    written = []
    for name, text in sorted(manifests().items()):
        path = os.path.join(output, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidero.api.clusterctl", description=__doc__)
    parser.add_argument("--output", default="deploy/clusterctl", help="directory to write the artifacts into")
    parser.add_argument("--version", action="store_true", help="print the provider version (release tag) and exit")
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(provider_version() + "\n")
        return 0
    for path in write(args.output):
        sys.stdout.write(path + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
