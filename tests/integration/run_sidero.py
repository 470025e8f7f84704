"""Run the real C{twistd sidero} from this source tree (end-to-end tests).

twistd finds dropins only under C{<sys.path entry>/twisted/plugins/}; an installed wheel puts
ours there. From a source tree, this links the dropin into a temporary C{twisted/plugins/}
folder placed on C{sys.path} before Twisted is imported, then runs twistd in the foreground
with the given C{sidero} arguments.
"""

import os
import shutil
import sys
import tempfile

# tests.paths.REPO, written out: this runs as a script, before the tree is on sys.path.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    plugin_root = tempfile.mkdtemp(prefix="sidero-dropin-")
    try:
        plugins = os.path.join(plugin_root, "twisted", "plugins")
        os.makedirs(plugins)
        os.symlink(os.path.join(REPO, "sidero", "plugins", "twisted", "sidero_plugin.py"),
                   os.path.join(plugins, "sidero_plugin.py"))
        sys.path[:0] = [REPO, plugin_root]
        from twisted.scripts.twistd import run

        sys.argv = ["twistd", "--nodaemon", "--pidfile=", "sidero", *sys.argv[1:]]
        run()
    finally:
        shutil.rmtree(plugin_root, ignore_errors=True)


if __name__ == "__main__":
    main()
