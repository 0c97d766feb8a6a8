"""Errors of TCP repair. Each names the socket and the reason; none carries queue data."""

from __future__ import annotations


class RepairError(Exception):
    """A socket could not be dumped, restored, released or resumed."""

    def __init__(self, sock: object, reason: str) -> None:
        name = str(sock)  # a lazily built name becomes text only here
        super().__init__(f"{name}: {reason}")
        self.sock = name
        self.reason = reason


class UnsupportedSocketError(RepairError):
    """Not a connected TCP socket: listening, unconnected, UDP, or a state we do not move."""


class RepairPermissionError(RepairError):
    """TCP_REPAIR needs CAP_NET_ADMIN in the socket's network namespace."""


class AddressNotAvailableError(RepairError):
    """The local address of the state is not configured in this network namespace."""


class StateFormatError(RepairError):
    """A state blob is malformed, of an unknown version, or inconsistent."""

    def __init__(self, reason: str) -> None:
        super().__init__("tcp state", reason)
