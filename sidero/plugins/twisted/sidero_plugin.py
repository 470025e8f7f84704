"""twistd dropin: C{twistd sidero ...} (installed as C{twisted/plugins/sidero_plugin.py}).

Kept tiny: L{ServiceMaker} imports L{sidero.tap} only when the plugin is used, so
C{twistd --help} and plugin scans stay cheap.
"""

from twisted.application.service import ServiceMaker

sidero = ServiceMaker(
    "Sidero Metal",
    "sidero.tap",
    "Bare-metal provisioning of Talos Linux servers (Sidero Metal v0.6 on Twisted).",
    "sidero",
)
