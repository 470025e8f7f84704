# -*- test-case-name: tests.power.test_factory -*-
"""The power-management seam (spec §3.12): what the Server controller asks of a machine.

Sidero's Go C{ManagementClient} is blocking; ours returns Deferreds so that the controller
never waits on a BMC from the reactor thread.  Implementations: L{sidero.power.ipmi} (a real
BMC over RMCP+), L{sidero.power.api} (the HTTP power API of QEMU test VMs) and
L{sidero.power.fake} (no power control at all).  L{sidero.power.factory} picks one per Server.

Every failure is a L{PowerError} (or L{sidero.threads.CallTimeout} when a call overran its
time limit) whose message is fit for a Kubernetes event: the controller wraps it as
C{Failed to power on: <message>.}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: the two PXE flavours Set System Boot Options can request (C{spec.pxeMode}, C{--ipmi-pxe-method}).
PXE_MODES = ("bios", "uefi")

KIND_IPMI = "ipmi"
KIND_API = "api"
KIND_FAKE = "fake"


class IPowerManager(Interface):
    """Power control of one server.  Each method returns a Deferred firing on the reactor thread."""

    kind = Attribute('Which implementation this is: "ipmi", "api" or "fake".')
    is_fake = Attribute(
        "True when nothing is really controlled: the controller then emits no events and never "
        "sets the PowerCycle condition, so a wipe relies on the server PXE-booting by itself."
    )

    def power_on() -> Deferred[None]:
        """Turn the machine on (no-op on a machine that is already on, for most BMCs)."""

    def power_off() -> Deferred[None]:
        """Turn the machine off hard (no graceful shutdown: the next step reinstalls it)."""

    def power_cycle() -> Deferred[None]:
        """Off then on again; only meaningful on a machine that is on."""

    def is_powered_on() -> Deferred[bool]:
        """Whether the machine is on now."""

    def set_pxe(mode: str) -> Deferred[None]:
        """Make the next boot (only) a PXE boot; C{mode} is C{"uefi"} (EFI flag set) or C{"bios"}.

        @raise UnsupportedPXEMode: (as a failure) for any other mode when the implementation
            chooses the flavour (IPMI); nothing is sent.  The HTTP API cannot choose one and,
            like Sidero's, ignores the mode.
        """

    def close() -> Deferred[None]:
        """Release whatever the manager holds; safe to call more than once."""


class PowerError(Exception):
    """A power operation failed; the message says what and why, in event-ready words."""


class UnsupportedPXEMode(PowerError):
    """C{set_pxe} with a mode other than bios/uefi (Sidero's exact wording)."""

    def __init__(self, mode: str) -> None:
        super().__init__(f'unsupported mode "{mode}"')
        self.mode = mode


class CredentialsError(PowerError):
    """BMC user/password could not be resolved from the referenced Secret (spec §1.1 wording)."""


class ConfigurationError(PowerError):
    """The Server's power settings cannot be used (e.g. an IPMI interface we do not speak)."""


class BMCConnectionError(PowerError):
    """No usable session with the BMC: unreachable, wrong credentials, or it stopped answering."""


class BMCCommandError(PowerError):
    """The BMC answered a command with a non-zero completion code.

    @ivar code: the IPMI completion code (e.g. 0xcc "invalid data field").
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class APIError(PowerError):
    """The HTTP power API answered with something other than 200, or not at all."""


class SimulatedFailure(PowerError):
    """An explicit failure injected by C{--test-power-simulated-explicit-failure-prob}."""

    def __init__(self) -> None:
        super().__init__("simulated failure from the power management")
