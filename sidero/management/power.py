# -*- test-case-name: tests.management.test_cli_ops -*-
"""C{sidero reboot}: the service's own power code (L{sidero.power}), run from the CLI.

The CLI reads the Server (and its BMC credential Secrets) through its client, so this works
against the management socket and a Kubernetes API server alike, and reaches the BMC or power
API directly, as the controller would. Blocking client calls run in a small thread pool under
a private reactor run, which is fine in a short-lived command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from sidero.api import registry
from sidero.management.client import ManagementClient

PXE_DEFAULT = "uefi"


class _ThreadedStore:
    """Just enough of L{IResourceStore} for credential lookups: C{get} in a thread."""

    def __init__(self, client: ManagementClient, run: Any) -> None:
        self.client = client
        self.run = run

    def get(self, kind: registry.ResourceType, name: str, namespace: str | None = None) -> Deferred[Any]:
        d: Deferred[Any] = self.run(self.client.get, kind, name, namespace)
        return d


def reboot_servers(client: ManagementClient, names: Sequence[str], *, pxe: bool = False,
                   timeout: float = 60.0, reactor: Any = None) -> list[tuple[str, str | None]]:
    """Power cycle (or power on, when off) each server; C{(name, error or None)} each."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    results: list[tuple[str, str | None]] = []

    def start() -> None:
        d = ensureDeferred(_reboot_all(reactor, client, names, pxe, timeout, results))
        d.addErrback(lambda f: results.append(("", f.getErrorMessage())))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    return results


async def _reboot_all(reactor: Any, client: ManagementClient, names: Sequence[str], pxe: bool,
                      timeout: float, results: list[tuple[str, str | None]]) -> None:
    from sidero.management.cli import format_error
    from sidero.power.factory import PowerManagerFactory
    from sidero.power.interfaces import PowerError
    from sidero.power.ipmi import IPMIExecutor
    from sidero.store.errors import StoreError
    from sidero.threads import CallTimeout, ThreadPoolService, with_timeout

    pool = ThreadPoolService(reactor, "cli", max_threads=4)
    pool.startService()
    try:
        factory = PowerManagerFactory(reactor, _ThreadedStore(client, pool.run),
                                      IPMIExecutor(reactor, pool.run, timeout=timeout))
        for name in names:
            try:
                server = await pool.run(client.get, registry.SERVER, name)
                manager = await factory.for_server(server)
                if manager.is_fake:
                    raise PowerError("no BMC or management API is configured "
                                     "(spec.bmc or spec.managementApi)")
                try:
                    if pxe:
                        mode = str((server.get("spec") or {}).get("pxeMode") or PXE_DEFAULT)
                        await with_timeout(manager.set_pxe(mode), reactor, timeout, "set PXE boot")
                    on = await with_timeout(manager.is_powered_on(), reactor, timeout, "power status")
                    operation = manager.power_cycle() if on else manager.power_on()
                    await with_timeout(operation, reactor, timeout, "power cycle")
                finally:
                    await manager.close()
            except StoreError as e:
                results.append((name, format_error(e)))
            except (PowerError, CallTimeout) as e:
                results.append((name, str(e)))
            else:
                results.append((name, None))
    finally:
        stopped = pool.stopService()
        if stopped is not None:
            await stopped
