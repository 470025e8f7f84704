"""The clusterctl provider artifacts (sidero.api.clusterctl): committed files, contents, RBAC.

No binaries here: these check the generated YAML against the spec and the code. What
clusterctl itself makes of the files is in test_clusterctl.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from sidero import config
from sidero.api import clusterctl, crdgen, registry
from tests.capi import rbac
from tests.paths import REPO

OUT_DIR = REPO / "deploy" / "clusterctl"
CRD_DIR = REPO / "deploy" / "crds"

_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::=([^}]*))?\}")


def substitute(text: str, values: dict[str, str] | None = None) -> str:
    """C{${NAME:=default}} as clusterctl's envsubst does it, for unit checks (the real
    clusterctl renders the files in test_clusterctl)."""
    values = values or {}

    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in values:
            return values[name]
        if default is None:
            raise KeyError(name)
        return default

    return _VAR.sub(one, text)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} {kind} named {name}")
    return found[0]


class CommittedTests(TestCase):
    def test_committed_equal_generated(self) -> None:
        """deploy/clusterctl holds exactly what the generator makes now (run
        python -m sidero.api.clusterctl after changing schemas, settings or the generator)."""
        fresh = clusterctl.manifests()
        committed = {p.name: p.read_text(encoding="utf-8") for p in OUT_DIR.glob("*.yaml")}
        self.assertEqual(sorted(committed), sorted(fresh))
        for name, text in fresh.items():
            self.assertEqual(committed[name], text, f"{name} is stale: run python -m sidero.api.clusterctl")

    def test_deterministic_and_main_writes(self) -> None:
        self.assertEqual(clusterctl.manifests(), clusterctl.manifests())
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()) as printed:
            self.assertEqual(clusterctl.main(["--output", out]), 0)
            self.assertEqual(len(printed.getvalue().splitlines()), 3)
            self.assertEqual(sorted(p.name for p in Path(out).iterdir()),
                             ["cluster-template.yaml", "infrastructure-components.yaml", "metadata.yaml"])

    def test_variables_are_plain_scalars(self) -> None:
        """After substitution a port is an int and a boolean a bool (a quoted ${...} would stay
        a string and the API server would refuse the Deployment)."""
        docs = documents(substitute(clusterctl.manifests()[clusterctl.COMPONENTS_FILE]))
        pod = one(docs, "Deployment", clusterctl.DEPLOYMENT)["spec"]["template"]["spec"]
        self.assertIs(pod["hostNetwork"], False)
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        self.assertEqual(ports["http"], 8081)
        self.assertEqual(ports["siderolink"], 51821)
        with self.assertRaises(ValueError):
            clusterctl.render_documents([{"a": "'${X}'"}])


class MetadataTests(TestCase):
    def test_release_series_maps_our_version_to_v1beta1(self) -> None:
        meta = documents(clusterctl.manifests()[clusterctl.METADATA_FILE])[0]
        self.assertEqual(meta["apiVersion"], "clusterctl.cluster.x-k8s.io/v1alpha3")
        self.assertEqual(meta["kind"], "Metadata")
        major, minor = clusterctl.release_series()
        self.assertIn({"major": major, "minor": minor, "contract": "v1beta1"}, meta["releaseSeries"])

    def test_provider_version(self) -> None:
        cases = {"0.1.0": "v0.1.0", "0.1.0.dev0": "v0.1.0-dev.0", "1.2.3rc1": "v1.2.3-rc.1",
                 "0.6.13": "v0.6.13", "2.0.0a2.dev3": "v2.0.0-alpha.2.dev.3", "1.0.0.post1": "v1.0.0+post.1"}
        for given, wanted in cases.items():
            self.assertEqual(clusterctl.provider_version(given), wanted, given)
        with self.assertRaises(ValueError):
            clusterctl.provider_version("1.0")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(clusterctl.main(["--version"]), 0)
        self.assertEqual(out.getvalue().strip(), clusterctl.provider_version())


class ComponentsTests(TestCase):
    def setUp(self) -> None:
        self.text = clusterctl.manifests()[clusterctl.COMPONENTS_FILE]
        self.docs = documents(substitute(self.text))

    def test_one_namespace_holds_every_namespaced_object(self) -> None:
        """clusterctl requires a single target namespace in a provider's components."""
        [ns] = by_kind(self.docs, "Namespace")
        self.assertEqual(ns["metadata"]["name"], "sidero-system")
        self.assertEqual(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged")
        cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                          "ValidatingWebhookConfiguration"}
        for d in self.docs:
            if d["kind"] in cluster_scoped:
                self.assertNotIn("namespace", d["metadata"], d["kind"])
            else:
                self.assertEqual(d["metadata"].get("namespace"), "sidero-system", d["kind"])

    def test_every_crd_as_generated_with_labels_and_ca_injection(self) -> None:
        crds = {d["metadata"]["name"]: d for d in by_kind(self.docs, "CustomResourceDefinition")}
        committed = {}
        for p in CRD_DIR.glob("*.yaml"):
            doc = yaml.safe_load(p.read_text())
            committed[doc["metadata"]["name"]] = doc
        self.assertEqual(sorted(crds), sorted(committed))
        for name, crd in crds.items():
            labels = crd["metadata"]["labels"]
            self.assertEqual(labels["cluster.x-k8s.io/v1beta1"], "v1alpha3", name)
            self.assertEqual(labels["cluster.x-k8s.io/v1alpha3"], "v1alpha3", name)
            self.assertEqual(labels["cluster.x-k8s.io/v1alpha4"], "v1alpha3", name)
            self.assertEqual(labels["cluster.x-k8s.io/provider"], "sidero", name)
            self.assertEqual(labels["app"], "sidero", name)
            self.assertEqual("clusterctl.cluster.x-k8s.io/move" in labels, name.endswith(".metal.sidero.dev"), name)
            converts = crd["spec"].get("conversion", {}).get("strategy") == "Webhook"
            annotations = crd["metadata"].get("annotations", {})
            self.assertEqual(annotations.get("cert-manager.io/inject-ca-from") == "sidero-system/sidero-serving-cert",
                             converts, name)
            bare = {k: v for k, v in crd.items()}
            bare["metadata"] = {k: v for k, v in crd["metadata"].items() if k != "annotations"}
            self.assertEqual(bare, committed[name], f"{name} differs from deploy/crds beyond the CA annotation")

    def test_deployment_runs_twistd_with_the_go_variables(self) -> None:
        deployment = one(self.docs, "Deployment", "sidero-controller-manager")
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        self.assertEqual(container["command"], ["twistd", "--nodaemon", "--pidfile=", "sidero"])
        raw = one(documents(self.text), "Deployment", "sidero-controller-manager")
        raw_args = raw["spec"]["template"]["spec"]["containers"][0]["args"]
        cm = "SIDERO_CONTROLLER_MANAGER_"
        # The variables and defaults of the Go manifest (spec §3.13).
        for expected in (
            f"--api-endpoint=${{{cm}API_ENDPOINT:=-}}",
            f"--api-port=${{{cm}API_PORT:=8081}}",
            f"--http-port=${{{cm}CONTAINER_API_PORT:=8081}}",
            f"--siderolink-port=${{{cm}SIDEROLINK_PORT:=51821}}",
            f"--siderolink-endpoint=${{{cm}SIDEROLINK_ENDPOINT:=-}}",
            f"--auto-accept-servers=${{{cm}AUTO_ACCEPT_SERVERS:=false}}",
            f"--auto-bmc-setup=${{{cm}AUTO_BMC_SETUP:=true}}",
            f"--insecure-wipe=${{{cm}INSECURE_WIPE:=true}}",
            f"--server-reboot-timeout=${{{cm}SERVER_REBOOT_TIMEOUT:=20m}}",
            f"--ipmi-pxe-method=${{{cm}IPMI_PXE_METHOD:=uefi}}",
            f"--boot-from-disk-method=${{{cm}BOOT_FROM_DISK_METHOD:=ipxe-exit}}",
            f"--disable-dhcp-proxy=${{{cm}DISABLE_DHCP_PROXY:=false}}",
            f"--extra-agent-kernel-args=${{{cm}EXTRA_AGENT_KERNEL_ARGS:=-}}",
            f"--events-negative-address-filter=${{{cm}EVENTS_NEGATIVE_ADDRESS_FILTER:=-}}",
            f"--test-power-explicit-failure=${{{cm}TEST_POWER_EXPLICIT_FAILURE:=0}}",
            f"--test-power-silent-failure=${{{cm}TEST_POWER_SILENT_FAILURE:=0}}",
        ):
            self.assertIn(expected, raw_args)
        pod = raw["spec"]["template"]["spec"]
        self.assertEqual(pod["hostNetwork"], f"${{{cm}HOST_NETWORK:=false}}")
        self.assertEqual(raw["spec"]["strategy"]["type"], f"${{{cm}DEPLOYMENT_STRATEGY:=RollingUpdate}}")
        self.assertTrue(pod["containers"][0]["image"].startswith("${SIDERO_CONTROLLER_MANAGER_IMAGE:="))
        # Every installation variable sidero.config reads is passed (none silently ignored).
        for setting in config.SETTINGS:
            for env in setting.env:
                if env.startswith(cm):
                    self.assertTrue(any(f"${{{env}:=" in a for a in raw_args), env)
        probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
        self.assertEqual(probes, {"livenessProbe": {"path": "/healthz", "port": "healthz"},
                                  "readinessProbe": {"path": "/readyz", "port": "healthz"}})
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.assertEqual((ports["healthz"], ports["metrics"]), (9440, 8443))
        ports = {p["name"]: p for p in container["ports"]}
        self.assertEqual(ports["http"]["containerPort"], 8081)
        env = {e["name"]: e for e in container["env"]}
        self.assertEqual(env["API_ENDPOINT"]["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP")
        self.assertEqual(deployment["spec"]["template"]["spec"]["serviceAccountName"], "sidero-controller-manager")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes[mounts["/tmp/k8s-webhook-server/serving-certs"]]["secret"]["secretName"],
                         "sidero-webhook-service-cert")

    def test_deployment_args_parse_as_sidero_settings(self) -> None:
        """The substituted command line is valid for twistd sidero, and --api-endpoint=- falls
        through to API_ENDPOINT (the node address), as the Go manager does."""
        deployment = one(self.docs, "Deployment", "sidero-controller-manager")
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        options = config.SettingsOptions(environ={"API_ENDPOINT": "192.0.2.7", "POD_NAMESPACE": "sidero-system"})
        options.parseOptions(args)
        s = options.settings
        self.assertEqual((s.api_endpoint, s.api_port, s.http_port, s.siderolink_port), ("192.0.2.7", 8081, 8081, 51821))
        self.assertEqual(s.siderolink_endpoint, "192.0.2.7")
        self.assertEqual(s.store, "kubernetes")
        self.assertFalse(s.auto_accept_servers)
        self.assertTrue(s.insecure_wipe)
        self.assertTrue(s.enable_leader_election)
        self.assertFalse(s.webhook_register)
        self.assertEqual(s.leader_election_namespace, "sidero-system")
        self.assertEqual((s.extra_agent_kernel_args, s.events_negative_address_filter), ("", ()))
        self.assertNotIn("dhcp-proxy", s.disabled)
        # And with values given, they win.
        given = documents(substitute(self.text, {"SIDERO_CONTROLLER_MANAGER_API_PORT": "9091",
                                                 "SIDERO_CONTROLLER_MANAGER_AUTO_ACCEPT_SERVERS": "true",
                                                 "SIDERO_CONTROLLER_MANAGER_API_ENDPOINT": "203.0.113.9"}))
        args = one(given, "Deployment", "sidero-controller-manager")["spec"]["template"]["spec"]["containers"][0]["args"]
        options = config.SettingsOptions(environ={"API_ENDPOINT": "192.0.2.7"})
        options.parseOptions(args)
        self.assertEqual((options.settings.api_endpoint, options.settings.api_port), ("203.0.113.9", 9091))
        self.assertEqual(options.settings.http_port, 8081)
        self.assertTrue(options.settings.auto_accept_servers)

    def test_services_of_the_spec(self) -> None:
        services = {d["metadata"]["name"]: d["spec"] for d in by_kind(self.docs, "Service")}
        ports = {name: [(p["port"], p["protocol"]) for p in spec["ports"]] for name, spec in services.items()}
        self.assertEqual(ports, {
            "sidero-dhcp": [(67, "UDP")], "sidero-tftp": [(69, "UDP")], "sidero-http": [(8081, "TCP")],
            "sidero-siderolink": [(51821, "UDP")], "sidero-webhook-service": [(443, "TCP")],
        })
        pod_labels = one(self.docs, "Deployment", "sidero-controller-manager")["spec"]["template"]["metadata"]["labels"]
        for name, spec in services.items():
            self.assertLessEqual(spec["selector"].items(), pod_labels.items(), name)

    def test_webhooks_through_the_service_with_cert_manager(self) -> None:
        [vwc] = by_kind(self.docs, "ValidatingWebhookConfiguration")
        self.assertEqual(vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
                         "sidero-system/sidero-serving-cert")
        paths = {w["name"]: w["clientConfig"]["service"]["path"] for w in vwc["webhooks"]}
        self.assertEqual(paths, {
            "vservers.metal.sidero.dev": "/validate-metal-sidero-dev-v1alpha2-server",
            "vmetalmachinetemplates.infrastructure.cluster.x-k8s.io":
                "/validate-infrastructure-cluster-x-k8s-io-v1alpha3-metalmachinetemplate",
        })
        for w in vwc["webhooks"]:
            self.assertEqual(w["clientConfig"]["service"]["name"], crdgen.WEBHOOK_SERVICE_NAME)
        cert = one(self.docs, "Certificate", "sidero-serving-cert")
        self.assertIn("sidero-webhook-service.sidero-system.svc", cert["spec"]["dnsNames"])
        self.assertEqual(cert["spec"]["secretName"], "sidero-webhook-service-cert")


class RBACTests(TestCase):
    """The ClusterRole and Role against what the code does (derived from the source)."""

    def setUp(self) -> None:
        docs = documents(substitute(clusterctl.manifests()[clusterctl.COMPONENTS_FILE]))
        self.cluster_rules = one(docs, "ClusterRole", clusterctl.CLUSTER_ROLE)["rules"]
        self.role_rules = one(docs, "Role", clusterctl.LEADER_ROLE)["rules"]
        self.scan = rbac.scan()
        self.deployment_args = one(docs, "Deployment", clusterctl.DEPLOYMENT)["spec"]["template"]["spec"][
            "containers"][0]["args"]

    @staticmethod
    def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
                for v in rule["verbs"]}

    def test_scan_finds_the_store_calls(self) -> None:
        """The scanner sees the calls it must (a scanner that finds nothing passes anything)."""
        needed = self.scan.needed()
        for key in [("metal.sidero.dev", "servers", "patch"), ("metal.sidero.dev", "servers/status", "patch"),
                    ("", "secrets", "create"), ("coordination.k8s.io", "leases", "update"),
                    ("", "events", "create"), ("metal.sidero.dev", "serverclasses", "watch")]:
            self.assertIn(key, needed)
        # Generic plumbing only: the informer, the controller manager, the patch helper and the
        # discovery probe take the kind from their callers, whose kinds the scan resolves.
        self.assertEqual({u.split(":")[0] for u in self.scan.unresolved},
                         {"sidero/controllers/informer.py", "sidero/controllers/runtime.py",
                          "sidero/controllers/patch.py", "sidero/protocols/http/service.py"},
                         self.scan.unresolved)

    def test_every_call_is_granted(self) -> None:
        cluster = self.granted(self.cluster_rules)
        namespaced = self.granted(self.role_rules)
        self_registration = {("apiextensions.k8s.io", "customresourcedefinitions"),
                             ("admissionregistration.k8s.io", "validatingwebhookconfigurations")}
        # cert-manager registers the webhooks, so the Deployment turns self-registration off
        # and those calls never run in the cluster.
        self.assertIn("--webhook-register=false", self.deployment_args)
        missing = []
        for key in sorted(self.scan.needed()):
            group, resource, _ = key
            if (group, resource) in self_registration:
                continue
            target = namespaced if resource == "leases" else cluster
            if key not in target:
                missing.append(f"{key} (used at {', '.join(self.scan.where(key))})")
        self.assertEqual(missing, [], "not granted by sidero.api.clusterctl")

    def test_foreign_grants_are_used(self) -> None:
        """Least privilege for kinds that are not ours: every verb granted is one the code
        uses, except the reads the CAPI infrastructure controllers (spec §2.5-2.7) need, which
        are being written beside this (they read Clusters, Machines and secrets)."""
        pending = {(registry.CAPI_GROUP, "clusters", v) for v in ("get", "list", "watch")}
        pending |= {(registry.CAPI_GROUP, "machines", v) for v in ("get", "list", "watch")}
        ours = {(k.group, k.plural) for k in registry.CUSTOM_KINDS}
        ours |= {(g, r + "/status") for g, r in ours}
        needed = self.scan.needed()
        extra = sorted(key for key in self.granted(self.cluster_rules) | self.granted(self.role_rules)
                       if key[:2] not in ours and key not in needed and key not in pending)
        self.assertEqual(extra, [])

    def test_no_wildcards(self) -> None:
        for rule in self.cluster_rules + self.role_rules:
            for field in ("apiGroups", "resources", "verbs"):
                self.assertNotIn("*", rule[field])
        self.assertEqual([r["resources"] for r in self.role_rules], [["leases"]])


class ClusterTemplateTests(TestCase):
    """cluster-template.yaml is spec §5, object by object."""

    values = {"CLUSTER_NAME": "prod", "CONTROL_PLANE_ENDPOINT": "192.0.2.1", "CONTROL_PLANE_PORT": "6443",
              "CONTROL_PLANE_SERVERCLASS": "cp-class", "WORKER_SERVERCLASS": "worker-class",
              "KUBERNETES_VERSION": "v1.33.0", "TALOS_VERSION": "v1.13", "CONTROL_PLANE_MACHINE_COUNT": "3",
              "WORKER_MACHINE_COUNT": "2"}

    def test_variables_are_the_spec_list_all_required(self) -> None:
        text = clusterctl.manifests()[clusterctl.TEMPLATE_FILE]
        found = {m.group(1) for m in _VAR.finditer(text)}
        self.assertEqual(found, set(clusterctl.TEMPLATE_VARIABLES))
        self.assertFalse([m.group(0) for m in _VAR.finditer(text) if m.group(2) is not None], "defaults in template")

    def test_objects(self) -> None:
        docs = documents(substitute(clusterctl.manifests()[clusterctl.TEMPLATE_FILE], self.values))
        check_cluster_template(self, docs, self.values)


def check_cluster_template(test: TestCase, docs: list[dict[str, Any]], v: dict[str, str]) -> None:
    """Spec §5 against rendered objects (shared with the clusterctl rendering test)."""
    name = v["CLUSTER_NAME"]
    infra, capi = "infrastructure.cluster.x-k8s.io/v1alpha3", "cluster.x-k8s.io/v1beta1"
    test.assertEqual([(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs], [
        (capi, "Cluster", name),
        (infra, "MetalCluster", name),
        (infra, "MetalMachineTemplate", f"{name}-cp"),
        ("controlplane.cluster.x-k8s.io/v1alpha3", "TalosControlPlane", f"{name}-cp"),
        ("bootstrap.cluster.x-k8s.io/v1alpha3", "TalosConfigTemplate", f"{name}-workers"),
        (capi, "MachineDeployment", f"{name}-workers"),
        (infra, "MetalMachineTemplate", f"{name}-workers"),
    ])
    cluster, metal_cluster, cp_template, tcp, tct, md, worker_template = docs
    test.assertEqual(cluster["metadata"]["namespace"], "default")
    test.assertEqual(cluster["spec"]["clusterNetwork"], {"pods": {"cidrBlocks": ["10.244.0.0/16"]},
                                                         "services": {"cidrBlocks": ["10.96.0.0/12"]}})
    test.assertEqual(cluster["spec"]["infrastructureRef"], {"apiVersion": infra, "kind": "MetalCluster",
                                                            "name": name, "namespace": "default"})
    test.assertEqual(cluster["spec"]["controlPlaneRef"], {"apiVersion": "controlplane.cluster.x-k8s.io/v1alpha3",
                                                          "kind": "TalosControlPlane", "name": f"{name}-cp"})
    test.assertEqual(metal_cluster["spec"], {"controlPlaneEndpoint": {"host": v["CONTROL_PLANE_ENDPOINT"],
                                                                      "port": int(v["CONTROL_PLANE_PORT"])}})
    for template, server_class in ((cp_template, v["CONTROL_PLANE_SERVERCLASS"]),
                                   (worker_template, v["WORKER_SERVERCLASS"])):
        test.assertEqual(template["spec"], {"template": {"spec": {"serverClassRef": {
            "apiVersion": "metal.sidero.dev/v1alpha2", "kind": "ServerClass", "name": server_class,
            "namespace": "default"}}}})
    test.assertEqual(tcp["spec"]["version"], v["KUBERNETES_VERSION"])
    test.assertEqual(tcp["spec"]["replicas"], int(v["CONTROL_PLANE_MACHINE_COUNT"]))
    test.assertEqual(tcp["spec"]["infrastructureTemplate"], {"kind": "MetalMachineTemplate", "apiVersion": infra,
                                                             "name": f"{name}-cp", "namespace": "default"})
    test.assertEqual(tcp["spec"]["controlPlaneConfig"], {"controlplane": {
        "generateType": "controlplane", "talosVersion": v["TALOS_VERSION"]}})
    test.assertEqual(tct["spec"], {"template": {"spec": {"generateType": "join", "talosVersion": v["TALOS_VERSION"]}}})
    test.assertEqual(md["spec"]["clusterName"], name)
    test.assertEqual(md["spec"]["replicas"], int(v["WORKER_MACHINE_COUNT"]))
    test.assertEqual(md["spec"]["selector"], {"matchLabels": None})
    test.assertEqual(md["spec"]["template"]["spec"], {
        "clusterName": name, "version": v["KUBERNETES_VERSION"],
        "bootstrap": {"configRef": {"apiVersion": "bootstrap.cluster.x-k8s.io/v1alpha3",
                                    "kind": "TalosConfigTemplate", "name": f"{name}-workers"}},
        "infrastructureRef": {"apiVersion": infra, "kind": "MetalMachineTemplate", "name": f"{name}-workers"},
    })
