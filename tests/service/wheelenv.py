"""A throw-away environment with sidero installed from a freshly built wheel.

Built once per test process: the repository's files (tracked and new, not ignored) are copied
to a temporary directory so the build leaves nothing in the work tree, a wheel is built with
pip, and it is installed with --no-deps into a new venv that sees /work/venv's dependencies
through a .pth file (a venv made from a venv would otherwise only see the base interpreter's
site-packages). A C{bin/twistd} launcher is written like the console script pip generates for
Twisted. The dropin cache is regenerated as an installer should.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass

from tests.paths import REPO

DROPIN = "twisted/plugins/sidero_plugin.py"


class WheelEnvError(Exception):
    pass


@dataclass(frozen=True)
class WheelEnv:
    root: str
    wheel: str
    python: str
    twistd: str
    site_packages: str

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: no SIDERO_*, KUBECONFIG or in-cluster variables leak in."""
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("SIDERO_", "KUBERNETES_", "PYTHON")) and k not in ("KUBECONFIG", "API_ENDPOINT")
        }
        # Never github.com from a test: the default Environment's downloads hit a closed
        # loopback port instead (a warning, retried with backoff).
        env["SIDERO_TALOS_ASSETS_URL"] = "http://127.0.0.1:1"
        env.update(extra)
        return env


_cached: WheelEnv | None = None


def _run(argv: list[str], cwd: str | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise WheelEnvError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _copy_tree(dest: str) -> None:
    listing = _run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for rel in filter(None, listing.split("\0")):
        src = os.path.join(REPO, rel)
        if not os.path.isfile(src):
            continue  # deleted in the work tree
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(src, target)


def wheel_env() -> WheelEnv:
    """Build (once) and return the installed-wheel environment."""
    global _cached
    if _cached is not None:
        return _cached
    root = tempfile.mkdtemp(prefix="sidero-wheel-")
    atexit.register(shutil.rmtree, root, True)
    src = os.path.join(root, "src")
    dist = os.path.join(root, "dist")
    venv = os.path.join(root, "venv")
    _copy_tree(src)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", dist, src])
    (wheel,) = glob.glob(os.path.join(dist, "sidero-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        if DROPIN not in zf.namelist():
            raise WheelEnvError(
                f"the wheel does not contain {DROPIN}: setup.cfg must list the twisted.plugins"
                " package (package_dir maps it to sidero/plugins/twisted) so twistd can find"
                " the dropin once installed"
            )
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = os.path.join(venv, "bin", "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    # Dependencies come from the project venv, after the new venv's own site-packages.
    with open(os.path.join(site, "_sidero_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: under tox, sidero is already installed in the env the .pth points
    # at; pip would call it satisfied and install nothing here (no console scripts either).
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed",
          "-q", "--disable-pip-version-check", wheel])
    twistd = os.path.join(venv, "bin", "twistd")
    with open(twistd, "w") as f:
        f.write(f"#!{python}\nimport sys\nfrom twisted.scripts.twistd import run\nsys.exit(run())\n")
    os.chmod(twistd, 0o755)
    # What an installer (postinst, image build) should do: write the dropin cache up front,
    # since a read-only site-packages (ProtectSystem=strict) cannot be written at run time.
    _run([python, "-c", "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"],
         cwd=root)
    _cached = WheelEnv(root=root, wheel=wheel, python=python, twistd=twistd, site_packages=site)
    return _cached
