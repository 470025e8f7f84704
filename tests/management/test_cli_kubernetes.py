"""The C{sidero} command against a real kube-apiserver: the same commands, the same tables
kubectl prints for the same objects."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from tests.k8s.apiserver import KubeAPIServer
from tests.k8s.support import server_with_crds
from tests.k8s.test_kubectl import require_kubectl
from tests.management.test_cli import REPO

SERVERS = """\
apiVersion: metal.sidero.dev/v1alpha2
kind: Server
metadata:
  name: cli-k8s-1
  labels:
    rack: k
spec:
  hostname: k8s-node-1
  accepted: false
---
apiVersion: metal.sidero.dev/v1alpha2
kind: Server
metadata:
  name: cli-k8s-2
  labels:
    rack: k
spec:
  accepted: true
  cordoned: true
"""


def without_age(table: str) -> str:
    """A table with the trailing AGE column's durations (0s, 5m, 2d3h...) blanked."""
    return re.sub(r"(?m)\s+\d+[smhd](\d+[smh])?$", " <age>", table)


class KubernetesCLITests(TestCase):
    """apply, get (table, wide, jsonpath, two kinds), describe, accept, cordon, uncordon."""

    timeout = 300

    async def setUp(self) -> None:  # type: ignore[override]
        self.server: KubeAPIServer = await server_with_crds()
        require_kubectl()
        self.manifest = Path(self.mktemp())
        self.manifest.write_text(SERVERS)
        self.addCleanup(self._cleanup)

    async def _cleanup(self) -> None:
        await self.kubectl("delete", "-f", str(self.manifest), "--ignore-not-found", "--wait=true")

    def kubectl(self, *args: str) -> Any:
        return threads.deferToThread(self.server.kubectl, *args)

    def sidero(self, *args: str, kubeconfig_env: bool = False) -> Any:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "SIDERO_MANAGEMENT_SOCKET")}
        env["PYTHONPATH"] = REPO
        argv = [sys.executable, "-m", "sidero.management.cli"]
        if kubeconfig_env:
            env["KUBECONFIG"] = str(self.server.kubeconfig)
            # No socket exists at the default path: $KUBECONFIG is used, as with --store auto.
            env["SIDERO_STATE_DIR"] = self.mktemp()
        else:
            argv += ["--kubeconfig", str(self.server.kubeconfig)]
        return threads.deferToThread(
            subprocess.run, [*argv, *args], capture_output=True, text=True, env=env, timeout=60)

    async def ok(self, *args: str, kubeconfig_env: bool = False) -> str:
        result = await self.sidero(*args, kubeconfig_env=kubeconfig_env)
        self.assertEqual(result.returncode, 0, f"sidero {' '.join(args)}: {result.stderr}")
        out: str = result.stdout
        return out

    async def test_commands_match_kubectl(self) -> None:
        """Every command works on the Kubernetes store; tables equal kubectl's."""
        out = await self.ok("apply", "-f", str(self.manifest))
        self.assertEqual(out, "server.metal.sidero.dev/cli-k8s-1 created\n"
                              "server.metal.sidero.dev/cli-k8s-2 created\n")
        for flags in ([], ["-o", "wide"], ["-o", "name"]):
            ours = await self.ok("get", "servers", "-l", "rack=k", *flags)
            theirs = await self.kubectl("get", "servers", "-l", "rack=k", *flags)
            self.assertEqual(theirs.returncode, 0, theirs.stderr)
            # The AGE cells may differ by a second between the two runs.
            self.assertEqual(without_age(ours), without_age(theirs.stdout), flags)
        table = await self.ok("get", "servers", "-l", "rack=k")
        self.assertEqual(table.splitlines()[0].split()[:4], ["NAME", "HOSTNAME", "ACCEPTED", "CORDONED"])
        template = "jsonpath={range .items[*]}{.metadata.name} {.spec.cordoned}{\"\\n\"}{end}"
        ours = await self.ok("get", "servers", "-l", "rack=k", "-o", template)
        theirs = await self.kubectl("get", "servers", "-l", "rack=k", "-o", template)
        self.assertEqual(ours, theirs.stdout)
        self.assertTrue(ours.endswith("cli-k8s-2 true\n"), ours)

        self.assertEqual(await self.ok("accept", "cli-k8s-1"),
                         "server.metal.sidero.dev/cli-k8s-1 accepted\n")
        self.assertEqual(await self.ok("cordon", "cli-k8s-1", kubeconfig_env=True),
                         "server.metal.sidero.dev/cli-k8s-1 cordoned\n")
        self.assertEqual(await self.ok("uncordon", "cli-k8s-2"),
                         "server.metal.sidero.dev/cli-k8s-2 uncordoned\n")
        state = await self.kubectl("get", "server", "cli-k8s-1", "cli-k8s-2", "-o",
                                   "jsonpath={.items[*].spec.accepted} {.items[*].spec.cordoned}")
        self.assertEqual(state.stdout, "true true true false")

        described = await self.ok("describe", "server", "cli-k8s-1")
        self.assertIn("Name:         cli-k8s-1", described)
        self.assertIn("  Hostname:  k8s-node-1", described)
        self.assertIn("Events:", described)

        result = await self.sidero("get", "server", "missing")
        self.assertEqual(result.returncode, 1)
        theirs = await self.kubectl("get", "server", "missing")
        self.assertEqual(result.stderr, theirs.stderr)

    async def test_bad_kubeconfig(self) -> None:
        """A kubeconfig that does not exist is one line and exit 1."""
        env = dict(os.environ, PYTHONPATH=REPO)
        result = await threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "sidero.management.cli", "--kubeconfig",
                             "/nonexistent/kubeconfig", "get", "servers"],
            capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "error: kubeconfig /nonexistent/kubeconfig does not exist"
                                        " or is not a file\n")
