"""The real clusterctl (v1.10) with sidero's provider artifacts (deploy/clusterctl).

* C{clusterctl generate cluster --from deploy/clusterctl/cluster-template.yaml} renders the
  template offline with the §5 variables (from the environment or a clusterctl config file), and
  a missing variable fails with clusterctl's own message;
* C{clusterctl init -b talos -c talos -i sidero} installs from a local repository
  (L{tests.capi.capi.LocalRepository}) into a kube-apiserver of this test's own: cert-manager is
  found installed (stand-in CRDs), the core provider is CAPI's CRDs, the Talos providers are
  stand-in CRDs. No kubelet and no Deployment controller run, so no pod ever starts: the tests
  check the objects clusterctl applied, with the variables substituted.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from sidero.api import clusterctl as artifacts
from sidero.api import registry
from tests.capi import rbac
from tests.capi.capi import (
    CAPIBuild,
    LocalRepository,
    cert_manager_standin_crds,
    clusterctl_env,
    require_build,
    write_documents,
)
from tests.capi.test_artifacts import check_cluster_template
from tests.k8s import apiserver
from tests.k8s.apiserver import KubeAPIServer
from tests.paths import REPO

TEMPLATE = REPO / "deploy" / "clusterctl" / artifacts.TEMPLATE_FILE

VALUES = {"CLUSTER_NAME": "test", "CONTROL_PLANE_ENDPOINT": "192.0.2.1", "CONTROL_PLANE_PORT": "6443",
          "CONTROL_PLANE_SERVERCLASS": "cp-class", "WORKER_SERVERCLASS": "worker-class",
          "KUBERNETES_VERSION": "v1.33.0", "TALOS_VERSION": "v1.13", "CONTROL_PLANE_MACHINE_COUNT": "3",
          "WORKER_MACHINE_COUNT": "2"}
#: Variables clusterctl supplies itself from flags (--kubernetes-version, the two counts).
FLAG_VARIABLES = {"KUBERNETES_VERSION": "--kubernetes-version", "CONTROL_PLANE_MACHINE_COUNT":
                  "--control-plane-machine-count", "WORKER_MACHINE_COUNT": "--worker-machine-count"}


class Clusterctl:
    """clusterctl with a private HOME and no network use (version check off)."""

    def __init__(self, build: CAPIBuild, home: Path) -> None:
        self.build = build
        self.home = home

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180.0
            ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([str(self.build.clusterctl), *args], capture_output=True, text=True,
                                  timeout=timeout, env=clusterctl_env(self.home, **(env or {})), cwd=str(self.home))
        except subprocess.TimeoutExpired as e:
            text = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                           for part in (e.stdout, e.stderr) if part)
            raise AssertionError(f"clusterctl {' '.join(args)} still running after {timeout:.0f}s:\n{text[-4000:]}") from e


class GenerateClusterTests(TestCase):
    def setUp(self) -> None:
        self.build = require_build()
        self.home = Path(tempfile.mkdtemp(prefix="sidero-clusterctl-"))
        self.addCleanup(subprocess.run, ["rm", "-rf", str(self.home)])
        self.clusterctl = Clusterctl(self.build, self.home)

    def generate(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        # --target-namespace: without a management cluster clusterctl cannot look one up.
        return self.clusterctl.run("generate", "cluster", "test", "--from", str(TEMPLATE),
                                   "--target-namespace", "default", *extra, env=env)

    def flags(self) -> list[str]:
        return [a for var, flag in FLAG_VARIABLES.items() for a in (flag, VALUES[var])]

    async def test_renders_offline_with_the_spec_variables(self) -> None:
        env = {k: v for k, v in VALUES.items() if k not in FLAG_VARIABLES}
        result = await threads.deferToThread(self.generate, *self.flags(), env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        check_cluster_template(self, docs, VALUES)
        # --target-namespace lands on every object, the template's own "default" included.
        self.assertEqual({d["metadata"]["namespace"] for d in docs}, {"default"})

    async def test_variables_from_a_clusterctl_config_file(self) -> None:
        config = self.home / "clusterctl.yaml"
        values = {**VALUES, "CLUSTER_NAME": "from-file", "WORKER_SERVERCLASS": "file-class"}
        config.write_text(yaml.safe_dump({k: v for k, v in values.items() if k not in FLAG_VARIABLES}))
        result = await threads.deferToThread(self.generate, "--config", str(config), *self.flags())
        self.assertEqual(result.returncode, 0, result.stderr)
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        # The cluster name comes from the command line argument ("test"), not the file.
        check_cluster_template(self, docs, {**values, "CLUSTER_NAME": "test"})

    async def test_from_the_providers_repository(self) -> None:
        """--infrastructure sidero:<version> takes cluster-template.yaml from the provider's
        repository (a local one here), as a user with a release does."""
        repo = LocalRepository(self.home / "repo", self.build)
        config = repo.write({k: v for k, v in VALUES.items() if k not in FLAG_VARIABLES})
        result = await threads.deferToThread(
            self.clusterctl.run, "generate", "cluster", "test", "--config", str(config),
            "--infrastructure", f"sidero:{artifacts.provider_version()}", "--target-namespace", "default",
            *self.flags())
        self.assertEqual(result.returncode, 0, result.stderr)
        check_cluster_template(self, [d for d in yaml.safe_load_all(result.stdout) if d], VALUES)

    async def test_missing_variable_fails_with_clusterctls_message(self) -> None:
        env = {k: v for k, v in VALUES.items() if k not in FLAG_VARIABLES and k != "TALOS_VERSION"}
        result = await threads.deferToThread(self.generate, *self.flags(), env=env)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("value for variables [TALOS_VERSION] is not set. Please set the value using os"
                      " environment variables or the clusterctl config file", result.stderr)
        self.assertEqual(result.stdout.strip(), "")

    async def test_list_variables(self) -> None:
        result = await threads.deferToThread(self.generate, "--list-variables")
        # clusterctl exits 1 here because required variables are unset; the list is printed.
        listing = result.stdout
        required = listing.split("Required Variables:")[1].split("Optional Variables:")[0]
        optional = listing.split("Optional Variables:")[1]
        names = {line.strip(" -").split()[0] for line in required.splitlines() if line.strip()}
        self.assertEqual(names, set(artifacts.TEMPLATE_VARIABLES) - set(FLAG_VARIABLES) - {"CLUSTER_NAME"} |
                         {"KUBERNETES_VERSION"})
        for name in ("CLUSTER_NAME", "CONTROL_PLANE_MACHINE_COUNT", "WORKER_MACHINE_COUNT"):
            self.assertIn(name, optional)


class InitTests(TestCase):
    """C{clusterctl init -b talos -c talos -i sidero} from a local repository."""

    timeout = 400

    async def setUp(self) -> None:  # type: ignore[override]
        self.build = require_build()
        self.server = KubeAPIServer(apiserver.require_binary())
        self.addCleanup(lambda: threads.deferToThread(self.server.stop))
        await self.server.start()
        self.home = Path(tempfile.mkdtemp(prefix="sidero-clusterctl-init-"))
        self.addCleanup(subprocess.run, ["rm", "-rf", str(self.home)])
        self.clusterctl = Clusterctl(self.build, self.home)
        crds = write_documents(self.home / "cert-manager-crds.yaml", cert_manager_standin_crds())
        await threads.deferToThread(self.server.apply_crds, [crds])

    def kubectl_json(self, *args: str) -> Any:
        result = self.server.kubectl(*args, "-o", "json")
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    async def test_init_installs_sidero_with_variables_substituted(self) -> None:
        repo = LocalRepository(self.home / "repo", self.build)
        config = repo.write({
            "SIDERO_CONTROLLER_MANAGER_HOST_NETWORK": "true",
            "SIDERO_CONTROLLER_MANAGER_DEPLOYMENT_STRATEGY": "Recreate",
            "SIDERO_CONTROLLER_MANAGER_API_ENDPOINT": "192.0.2.5",
            "SIDERO_CONTROLLER_MANAGER_SERVER_REBOOT_TIMEOUT": "30s",
        })
        result = await threads.deferToThread(
            self.clusterctl.run, "init", "--config", str(config), "--kubeconfig", str(self.server.kubeconfig),
            "-b", "talos", "-c", "talos", "-i", "sidero")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        output = result.stdout + result.stderr
        self.assertIn("Skipping installing cert-manager as it is already installed", output)
        version = artifacts.provider_version()
        self.assertIn(f'Installing provider="infrastructure-sidero" version="{version}"', output)
        self.assertIn('Installing provider="cluster-api"', output)

        # clusterctl's inventory.
        providers = self.kubectl_json("get", "providers.clusterctl.cluster.x-k8s.io", "-A")["items"]
        installed = {(p["type"], p["providerName"], p["version"], p["metadata"]["namespace"]) for p in providers}
        self.assertIn(("InfrastructureProvider", "sidero", version, "sidero-system"), installed)
        self.assertIn(("CoreProvider", "cluster-api", self.build.version, "capi-system"), installed)

        # Our CRDs, labelled by clusterctl for the provider and keeping the contract labels.
        for kind in registry.CUSTOM_KINDS:
            crd = self.kubectl_json("get", "crd", kind.resource)
            labels = crd["metadata"]["labels"]
            self.assertEqual(labels["cluster.x-k8s.io/provider"], "infrastructure-sidero", kind.resource)
            self.assertEqual(labels["cluster.x-k8s.io/v1beta1"], "v1alpha3", kind.resource)
            self.assertIn("clusterctl.cluster.x-k8s.io", labels)
        ns = self.kubectl_json("get", "namespace", "sidero-system")
        self.assertEqual(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged")

        # The Deployment with the variables given and the defaults of the rest (pods never
        # start: no kubelet and no Deployment controller run here).
        deployment = self.kubectl_json("get", "deployment", "-n", "sidero-system", artifacts.DEPLOYMENT)
        pod = deployment["spec"]["template"]["spec"]
        self.assertIs(pod["hostNetwork"], True)
        self.assertEqual(deployment["spec"]["strategy"]["type"], "Recreate")
        [container] = pod["containers"]
        self.assertEqual(container["image"], f"localhost/sidero:{version}")
        args = container["args"]
        for expected in ("--api-endpoint=192.0.2.5", "--server-reboot-timeout=30s", "--api-port=8081",
                         "--http-port=8081", "--siderolink-port=51821", "--auto-accept-servers=false",
                         "--extra-agent-kernel-args=-"):
            self.assertIn(expected, args)
        self.assertFalse([a for a in args if "${" in a], args)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.assertEqual(ports["http"], 8081)
        http = self.kubectl_json("get", "service", "-n", "sidero-system", "sidero-http")
        self.assertEqual([p["port"] for p in http["spec"]["ports"]], [8081])
        self.assertEqual(self.kubectl_json("get", "replicasets", "-n", "sidero-system")["items"], [])

        # With the provider installed, clusterctl finds its version (and template) itself.
        generated = await threads.deferToThread(
            self.clusterctl.run, "generate", "cluster", "mgmt", "--config", str(config),
            "--kubeconfig", str(self.server.kubeconfig), "--infrastructure", "sidero",
            "--kubernetes-version", "v1.33.0", "--control-plane-machine-count", "1", "--worker-machine-count", "1",
            env={"CONTROL_PLANE_ENDPOINT": "192.0.2.1", "CONTROL_PLANE_PORT": "6443", "TALOS_VERSION": "v1.13",
                 "CONTROL_PLANE_SERVERCLASS": "any", "WORKER_SERVERCLASS": "any"})
        self.assertEqual(generated.returncode, 0, generated.stderr)
        kinds = [d["kind"] for d in yaml.safe_load_all(generated.stdout) if d]
        self.assertEqual(kinds.count("MetalMachineTemplate"), 2)

        # The RBAC clusterctl applied, asked of the API server's own authorizer for every call
        # the code makes (derived from the source), as the Deployment's ServiceAccount.
        user = f"system:serviceaccount:sidero-system:{artifacts.SERVICE_ACCOUNT}"
        self.assertEqual(pod["serviceAccountName"], artifacts.SERVICE_ACCOUNT)
        scan = rbac.scan()
        denied = []
        for group, resource, verb in sorted(scan.needed()):
            if group in ("apiextensions.k8s.io", "admissionregistration.k8s.io"):
                continue  # self-registration, off in the Deployment (cert-manager registers)
            base, _, sub = resource.partition("/")
            target = f"{base}.{group}" if group else base
            namespace = "sidero-system" if resource == "leases" else "default"
            # --subresource: kubectl reads "x/status" as "x" (it would answer for the object).
            answer = await threads.deferToThread(self.server.kubectl, "auth", "can-i", verb, target,
                                                 *([f"--subresource={sub}"] if sub else []),
                                                 "--as", user, "-n", namespace)
            if answer.stdout.strip() != "yes":
                denied.append(f"{verb} {target} ({', '.join(scan.where((group, resource, verb)))})")
        self.assertEqual(denied, [])
        # Least privilege, spot checks: no secrets deletion, no leases outside sidero-system, no
        # CRD writes. (Secrets are listed and watched: /configdata serves bootstrap data from an
        # informer cache, as the Go CAPS reads them with get/list/watch.)
        for verb, target, namespace, *sub in (
                ("delete", "secrets", "default"),
                ("create", "leases.coordination.k8s.io", "default"),
                ("patch", "customresourcedefinitions.apiextensions.k8s.io", "default"),
                ("delete", "machines.cluster.x-k8s.io", "default"),
                ("update", "secrets", "default", "--subresource=status")):
            answer = await threads.deferToThread(self.server.kubectl, "auth", "can-i", verb, target, *sub,
                                                 "--as", user, "-n", namespace)
            self.assertEqual(answer.stdout.strip(), "no", f"{verb} {target} in {namespace}")
