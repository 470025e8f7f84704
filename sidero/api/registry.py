"""The kinds sidero stores, with the identity Kubernetes knows them by.

One L{ResourceType} per kind: API group, versions, plural name, scope, subresources and the
printer columns of the spec (§1).  The store, the CRD generator, the management CLI and the
Kubernetes backend all read this table, so a kind is described in exactly one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

METAL_GROUP = "metal.sidero.dev"
INFRA_GROUP = "infrastructure.cluster.x-k8s.io"
CAPI_GROUP = "cluster.x-k8s.io"
CORE_GROUP = ""
COORDINATION_GROUP = "coordination.k8s.io"


@dataclass(frozen=True)
class PrinterColumn:
    """An additionalPrinterColumns entry, shown by C{kubectl get} and C{sidero get}."""

    name: str
    type: str
    json_path: str
    priority: int = 0
    description: str = ""


AGE = PrinterColumn("Age", "date", ".metadata.creationTimestamp")


@dataclass(frozen=True)
class ResourceType:
    """Identity of one kind of resource.

    @ivar storage_version: the version objects are stored and handled in (the conversion hub).
    @ivar served_versions: every version clients may read and write, storage version included.
    @ivar custom: True for sidero's own CRDs; False for built-in or foreign kinds that the
        embedded store also keeps (Secrets, Events, Leases, CAPI Machines and Clusters).
    @ivar selectable_fields: JSON paths the API server filters on in field selectors (the
        CRD's C{selectableFields}, Kubernetes 1.31+; the embedded store filters any path).
    """

    group: str
    kind: str
    plural: str
    storage_version: str
    namespaced: bool
    served_versions: tuple[str, ...] = ()
    status_subresource: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    printer_columns: tuple[PrinterColumn, ...] = (AGE,)
    labels: tuple[tuple[str, str], ...] = ()
    custom: bool = True
    singular: str = field(default="")
    selectable_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.served_versions:
            object.__setattr__(self, "served_versions", (self.storage_version,))
        if not self.singular:
            object.__setattr__(self, "singular", self.kind.lower())

    @property
    def api_version(self) -> str:
        """The storage C{apiVersion} string, e.g. C{metal.sidero.dev/v1alpha2}."""
        return api_version(self.group, self.storage_version)

    @property
    def resource(self) -> str:
        """The qualified resource name used in Kubernetes messages: C{servers.metal.sidero.dev}."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_versions(self) -> list[str]:
        """Every served C{apiVersion} string."""
        return [api_version(self.group, v) for v in self.served_versions]


def api_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


def split_api_version(value: str) -> tuple[str, str]:
    """C{"metal.sidero.dev/v1alpha2"} -> C{("metal.sidero.dev", "v1alpha2")}; C{"v1"} -> C{("", "v1")}."""
    group, _, version = value.rpartition("/")
    return group, version


_METAL_LABELS = (
    ("app", "sidero"),
    ("cluster.x-k8s.io/provider", "sidero"),
    ("cluster.x-k8s.io/v1alpha3", "v1alpha3"),
    ("cluster.x-k8s.io/v1alpha4", "v1alpha3"),
    ("cluster.x-k8s.io/v1beta1", "v1alpha3"),
    ("clusterctl.cluster.x-k8s.io/move", ""),
)
_INFRA_LABELS = tuple(kv for kv in _METAL_LABELS if kv[0] != "clusterctl.cluster.x-k8s.io/move")
_CLUSTER_LABEL_COLUMN = PrinterColumn(
    "Cluster", "string", ".metadata.labels.cluster\\.x-k8s\\.io/cluster-name", 1,
    "Cluster to which this resource belongs",
)

SERVER = ResourceType(
    group=METAL_GROUP, kind="Server", plural="servers", storage_version="v1alpha2",
    served_versions=("v1alpha1", "v1alpha2"), namespaced=False, labels=_METAL_LABELS,
    printer_columns=(
        PrinterColumn("Hostname", "string", ".spec.hostname", 0, "server hostname"),
        PrinterColumn("BMC IP", "string", ".spec.bmc.endpoint", 1, "BMC IP"),
        PrinterColumn("Accepted", "boolean", ".spec.accepted", 0, "indicates if the server is accepted"),
        PrinterColumn("Cordoned", "boolean", ".spec.cordoned", 0, "indicates if the server is cordoned"),
        PrinterColumn("Allocated", "boolean", ".status.inUse", 0, "indicates that the server has been allocated"),
        PrinterColumn("Clean", "boolean", ".status.isClean", 0, "indicates if the server is clean or not"),
        PrinterColumn("Power", "string", ".status.power", 0, "display the current power status"),
        AGE,
    ),
)
SERVER_CLASS = ResourceType(
    group=METAL_GROUP, kind="ServerClass", plural="serverclasses", storage_version="v1alpha2",
    served_versions=("v1alpha1", "v1alpha2"), namespaced=False, labels=_METAL_LABELS,
    printer_columns=(
        PrinterColumn("Available", "string", ".status.serversAvailable", 0, "the number of available servers"),
        PrinterColumn("In Use", "string", ".status.serversInUse", 0, "the number of servers in use"),
        AGE,
    ),
)
ENVIRONMENT = ResourceType(
    group=METAL_GROUP, kind="Environment", plural="environments", storage_version="v1alpha2",
    served_versions=("v1alpha1", "v1alpha2"), namespaced=False, labels=_METAL_LABELS,
    printer_columns=(
        PrinterColumn("Kernel", "string", ".spec.kernel.url", 0, "the kernel for the environment"),
        PrinterColumn("Initrd", "string", ".spec.initrd.url", 0, "the initrd for the environment"),
        PrinterColumn("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', 0,
                      "indicates the readiness of the environment"),
        AGE,
    ),
)
METAL_CLUSTER = ResourceType(
    group=INFRA_GROUP, kind="MetalCluster", plural="metalclusters", storage_version="v1alpha3",
    served_versions=("v1alpha2", "v1alpha3"), namespaced=True, labels=_INFRA_LABELS,
    categories=("cluster-api",),
    printer_columns=(
        PrinterColumn("Cluster", "string", ".metadata.labels.cluster\\.x-k8s\\.io/cluster-name", 0,
                      "Cluster to which this MetalCluster belongs"),
        PrinterColumn("Ready", "string", ".status.ready", 0, "MetalCluster ready status"),
        PrinterColumn("Endpoint", "string", ".spec.controlPlaneEndpoint.host", 1,
                      "Control plane endpoint"),
        AGE,
    ),
)
METAL_MACHINE = ResourceType(
    group=INFRA_GROUP, kind="MetalMachine", plural="metalmachines", storage_version="v1alpha3",
    served_versions=("v1alpha2", "v1alpha3"), namespaced=True, labels=_INFRA_LABELS,
    categories=("cluster-api",),
    printer_columns=(
        PrinterColumn("Ready", "string", ".status.ready", 0, "MetalMachine ready status"),
        _CLUSTER_LABEL_COLUMN,
        PrinterColumn("Machine", "string", '.metadata.ownerReferences[?(@.kind=="Machine")].name', 1,
                      "Machine object which owns with this MetalMachine"),
        PrinterColumn("Server", "string", ".spec.serverRef.name", 1,
                      "Server ID"),
        AGE,
    ),
)
METAL_MACHINE_TEMPLATE = ResourceType(
    group=INFRA_GROUP, kind="MetalMachineTemplate", plural="metalmachinetemplates",
    storage_version="v1alpha3", served_versions=("v1alpha2", "v1alpha3"), namespaced=True,
    status_subresource=False, labels=_INFRA_LABELS, categories=("cluster-api",),
)
SERVER_BINDING = ResourceType(
    group=INFRA_GROUP, kind="ServerBinding", plural="serverbindings", storage_version="v1alpha3",
    namespaced=False, labels=_INFRA_LABELS,
    # The MetalMachine controller lists the bindings of one MetalMachine from the API server.
    selectable_fields=(".spec.metalMachineRef.namespace", ".spec.metalMachineRef.name"),
    printer_columns=(
        PrinterColumn("Ready", "string", ".status.ready", 0, "ServerBinding ready status"),
        PrinterColumn("Server", "string", ".metadata.name", 1, "Server ID"),
        PrinterColumn("ServerClass", "string", ".spec.serverClassRef.name", 1, "Server Class"),
        PrinterColumn("MetalMachine", "string", ".spec.metalMachineRef.name", 1, "Metal Machine"),
        _CLUSTER_LABEL_COLUMN,
        AGE,
    ),
)

# Kinds that are not ours but that sidero reads and writes; the embedded store keeps them too.
SECRET = ResourceType(group=CORE_GROUP, kind="Secret", plural="secrets", storage_version="v1",
                      namespaced=True, status_subresource=False, custom=False)
EVENT = ResourceType(group=CORE_GROUP, kind="Event", plural="events", storage_version="v1",
                     namespaced=True, status_subresource=False, custom=False)
NAMESPACE = ResourceType(group=CORE_GROUP, kind="Namespace", plural="namespaces", storage_version="v1",
                         namespaced=False, custom=False)
NODE = ResourceType(group=CORE_GROUP, kind="Node", plural="nodes", storage_version="v1",
                    namespaced=False, custom=False)
LEASE = ResourceType(group=COORDINATION_GROUP, kind="Lease", plural="leases", storage_version="v1",
                     namespaced=True, status_subresource=False, custom=False)
CAPI_CLUSTER = ResourceType(group=CAPI_GROUP, kind="Cluster", plural="clusters",
                            storage_version="v1beta1", namespaced=True, custom=False)
CAPI_MACHINE = ResourceType(group=CAPI_GROUP, kind="Machine", plural="machines",
                            storage_version="v1beta1", namespaced=True, custom=False)

CUSTOM_KINDS: tuple[ResourceType, ...] = (
    SERVER, SERVER_CLASS, ENVIRONMENT,
    METAL_CLUSTER, METAL_MACHINE, METAL_MACHINE_TEMPLATE, SERVER_BINDING,
)
FOREIGN_KINDS: tuple[ResourceType, ...] = (
    SECRET, EVENT, NAMESPACE, NODE, LEASE, CAPI_CLUSTER, CAPI_MACHINE,
)
ALL_KINDS: tuple[ResourceType, ...] = CUSTOM_KINDS + FOREIGN_KINDS


class UnknownKind(KeyError):
    """No registered kind matches the name or apiVersion/kind given."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown kind"


def all_kinds() -> Iterator[ResourceType]:
    return iter(ALL_KINDS)


def by_api_version_kind(api_version_value: str, kind: str) -> ResourceType:
    """The kind an object's C{apiVersion}/C{kind} names, in any served version.

    @raise UnknownKind: nothing registered under that group/version/kind.
    """
    group, version = split_api_version(api_version_value)
    for rt in ALL_KINDS:
        if rt.group == group and rt.kind == kind and version in rt.served_versions:
            return rt
    raise UnknownKind(f'no kind "{kind}" is registered for version "{api_version_value}"')


def by_name(name: str) -> ResourceType:
    """Resolve what a user types (C{servers}, C{server}, C{Server}, C{servers.metal.sidero.dev})."""
    wanted = name.lower()
    for rt in ALL_KINDS:
        names = {rt.plural, rt.singular, rt.kind.lower(), rt.resource, *rt.short_names}
        if wanted in names:
            return rt
    raise UnknownKind(f'the server doesn\'t have a resource type "{name}"')
