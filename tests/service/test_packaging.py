"""The wheel ships every package and the twistd dropin."""

from __future__ import annotations

import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.paths import REPO


class PackageListTests(SynchronousTestCase):
    def test_every_package_is_listed(self) -> None:
        """setup.cfg lists every sidero package (an explicit list, since find: cannot see the
        twisted.plugins mapping) and the dropin folder."""
        config = configparser.ConfigParser()
        config.read(os.path.join(REPO, "setup.cfg"))
        listed = set(config["options"]["packages"].split())
        found = set()
        for root, _dirs, files in os.walk(os.path.join(REPO, "sidero")):
            if "__init__.py" in files:
                found.add(os.path.relpath(root, REPO).replace(os.sep, "."))
        self.assertEqual(sorted(found - listed), [], "packages missing from setup.cfg")
        self.assertIn("twisted.plugins", listed)
        mapping = config["options"]["package_dir"]
        self.assertIn("twisted.plugins = sidero/plugins/twisted", mapping)
        self.assertFalse(os.path.exists(os.path.join(REPO, "sidero", "plugins", "twisted", "__init__.py")),
                         "twisted/plugins must not be a regular package (twistd skips it)")
