"""sidero: bare-metal provisioning of Talos Linux servers, a Cluster API infrastructure provider."""

__version__ = "0.1.0.dev0"

# The Talos release whose defaults (kernel arguments, asset URLs) this build targets (spec §2.1).
TALOS_RELEASE = "v1.13.0"

# Where Talos publishes release assets; the default Environment's URLs start here unless
# --talos-assets-url names a mirror.
TALOS_RELEASES_URL = "https://github.com/siderolabs/talos/releases/download"
