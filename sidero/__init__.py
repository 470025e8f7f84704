"""sidero: bare-metal provisioning of Talos Linux servers, a Cluster API infrastructure provider."""

__version__ = "0.1.0.dev0"

# The Talos release whose defaults (kernel arguments, asset URLs) this build targets (spec §2.1).
TALOS_RELEASE = "v1.13.0"
