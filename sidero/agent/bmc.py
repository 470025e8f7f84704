# -*- test-case-name: tests.agent.test_bmc -*-
"""BMC set-up over IPMI (spec §4 step 10): report the BMC address, add a C{sidero} user.

The decisions (which slot, which bytes) are plain functions over an L{IPMILink}, a raw
request/response channel.  In production that is pyghmi's local session on C{/dev/ipmi0};
tests hand in a LAN session to OpenIPMI's C{ipmi_sim} (or a script).  Failures here are never
fatal for the agent: the caller logs them.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Protocol

from twisted.logger import Logger

log = Logger()

NETFN_APP = 0x06
NETFN_TRANSPORT = 0x0C
CMD_GET_LAN_CONFIG = 0x02
CMD_SET_USER_ACCESS = 0x43
CMD_GET_USER_ACCESS = 0x44
CMD_SET_USER_NAME = 0x45
CMD_GET_USER_NAME = 0x46
CMD_SET_USER_PASSWORD = 0x47

CHANNEL = 1
LAN_PARAM_IP = 3
LAN_PARAM_PORT = 8
#: Get LAN Configuration Parameters completion code: parameter not supported.
PARAMETER_NOT_SUPPORTED = 0x80
PASSWORD_OP_ENABLE = 0x01
PASSWORD_OP_SET = 0x02
#: Set User Access byte 1: change bits enabled (0x80), IPMI messaging (0x10), channel 1.
USER_ACCESS = 0x91
#: Privilege limit: Administrator.
USER_PRIVILEGE = 0x04
USER_NAME = "sidero"
PASSWORD_LENGTH = 16
PASSWORD_ALPHABET = string.ascii_letters + string.digits


class IPMIError(Exception):
    """An IPMI request failed: transport error or a non-zero completion code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class IPMILink(Protocol):
    def raw(self, netfn: int, command: int, data: Sequence[int] = ()) -> bytes:
        """Response data (completion code stripped); L{IPMIError} on failure."""


class PyghmiLink:
    """An L{IPMILink} over a pyghmi C{Command} (local C{/dev/ipmi0} or an IPMI LAN session)."""

    def __init__(self, command: Any) -> None:
        self.command = command

    @classmethod
    def local(cls) -> PyghmiLink:
        from pyghmi.ipmi.command import Command

        return cls(Command())

    @classmethod
    def lan(cls, host: str, port: int, user: str, password: str) -> IPMILink:
        """An IPMI LAN session (tests, or a BMC reached over the network).

        Uses the power manager's pyghmi session wrapper, which works around pyghmi handing a
        logged-out session to the next login with the same credentials.
        """
        return LanLink(host, port, user, password)

    def raw(self, netfn: int, command: int, data: Sequence[int] = ()) -> bytes:
        try:
            rsp = self.command.raw_command(netfn=netfn, command=command, data=tuple(data))
        except Exception as e:
            raise IPMIError(f"IPMI request {netfn:#04x}/{command:#04x} failed: {e}") from e
        if rsp.get("error") or rsp.get("code"):
            raise IPMIError(f"IPMI request {netfn:#04x}/{command:#04x} failed: "
                            f"{rsp.get('error') or 'completion code'} "
                            f"({rsp.get('code', 0):#04x})", rsp.get("code"))
        return bytes(rsp.get("data") or b"")

    def close(self) -> None:
        session = getattr(self.command, "ipmi_session", None)
        logout = getattr(session, "logout", None)
        if callable(logout):
            try:
                logout()
            except Exception:
                pass


class LanLink:
    """An L{IPMILink} over L{sidero.power.ipmi.PyghmiSession} (RMCP+ to a BMC)."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        from sidero.power.interfaces import PowerError
        from sidero.power.ipmi import PyghmiSession, make_endpoint

        try:
            self.session = PyghmiSession(make_endpoint(host, port, user, password, "lanplus"))
        except PowerError as e:
            raise IPMIError(str(e)) from e

    def raw(self, netfn: int, command: int, data: Sequence[int] = ()) -> bytes:
        from sidero.power.interfaces import BMCCommandError, PowerError

        try:
            return self.session.raw(netfn, command, data)
        except BMCCommandError as e:
            raise IPMIError(str(e), e.code) from e
        except PowerError as e:
            raise IPMIError(str(e)) from e

    def close(self) -> None:
        self.session.close()


@dataclass(frozen=True)
class BMCAddress:
    ip: str
    port: int


def read_address(link: IPMILink, channel: int = CHANNEL) -> BMCAddress:
    """LAN configuration parameters 3 (IP) and 8 (RMCP port, little-endian) of C{channel}."""
    ip = link.raw(NETFN_TRANSPORT, CMD_GET_LAN_CONFIG, (channel, LAN_PARAM_IP, 0, 0))
    if len(ip) < 5:
        raise IPMIError(f"short LAN parameter 3 answer ({ip.hex()})")
    try:
        port = link.raw(NETFN_TRANSPORT, CMD_GET_LAN_CONFIG, (channel, LAN_PARAM_PORT, 0, 0))
    except IPMIError as e:
        if e.code != PARAMETER_NOT_SUPPORTED:
            raise
        # Parameter 8 is optional (OpenIPMI's BMCs lack it): port 0, which the server stores
        # as the standard 623.
        return BMCAddress(str(IPv4Address(ip[1:5])), 0)
    if len(port) < 3:
        raise IPMIError(f"short LAN parameter 8 answer ({port.hex()})")
    return BMCAddress(str(IPv4Address(ip[1:5])), port[1] | port[2] << 8)


def _name(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("ascii", "replace").strip()


def find_slot(link: IPMILink, channel: int = CHANNEL) -> tuple[int, bool]:
    """(user id, True when a C{sidero} user already lives there) per the agent's scan."""
    summary = link.raw(NETFN_APP, CMD_GET_USER_ACCESS, (channel, 1))
    if not summary:
        raise IPMIError("empty user summary")
    max_users = summary[0] & 0x1F
    free: int | None = None
    for uid in range(2, max_users + 1):
        try:
            name = _name(link.raw(NETFN_APP, CMD_GET_USER_NAME, (uid,)))
        except IPMIError:
            if free is None:
                free = uid
            continue
        if name == USER_NAME:
            return uid, True
        if (name == "" or name == "(Empty User)") and free is None:
            free = uid
    if free is None:
        raise IPMIError("no slot available for sidero user")
    return free, False


def new_password(choice: Callable[[str], str] = secrets.choice) -> str:
    return "".join(choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))


def setup_user(link: IPMILink, password: str | None = None,
               channel: int = CHANNEL) -> tuple[int, str]:
    """Create or reuse the C{sidero} administrator; return (user id, its new password)."""
    uid, reuse = find_slot(link, channel)
    if not reuse:
        link.raw(NETFN_APP, CMD_SET_USER_NAME, (uid, *USER_NAME.encode().ljust(16, b"\x00")))
    password = password or new_password()
    link.raw(NETFN_APP, CMD_SET_USER_PASSWORD,
             (uid, PASSWORD_OP_SET, *password.encode().ljust(16, b"\x00")))
    link.raw(NETFN_APP, CMD_SET_USER_ACCESS,
             ((USER_ACCESS & 0xF0) | (channel & 0x0F), uid, USER_PRIVILEGE, 0))
    link.raw(NETFN_APP, CMD_SET_USER_PASSWORD, (uid, PASSWORD_OP_ENABLE))
    log.info("BMC user {user} in slot {uid} ({how})", user=USER_NAME, uid=uid,
             how="reused" if reuse else "created")
    return uid, password
