"""TCP_REPAIR: dump and restore established sockets (docs/how-it-works.md).

``dump(sock)`` freezes a connected socket and reads its state; ``restore(state)`` rebuilds
it in the caller's network namespace; ``release(sock)`` closes a frozen socket silently;
``resume(sock)`` thaws it in place; ``restore(state, frozen=True)`` + ``thaw`` split a
restore at the migration's commit point. ``TcpState`` travels as ``to_wire()`` / ``from_wire()``.
"""

from pysteer.tcp.errors import (
    AddressNotAvailableError,
    RepairError,
    RepairPermissionError,
    StateFormatError,
    UnsupportedSocketError,
)
from pysteer.tcp.info import TcpInfo, TcpStateCode, tcp_info
from pysteer.tcp.repair import discard, dump, release, restore, resume, thaw
from pysteer.tcp.state import RepairWindow, SocketOptions, TcpState

__all__ = [
    "AddressNotAvailableError",
    "RepairError",
    "RepairPermissionError",
    "RepairWindow",
    "SocketOptions",
    "StateFormatError",
    "TcpInfo",
    "TcpState",
    "TcpStateCode",
    "UnsupportedSocketError",
    "discard",
    "dump",
    "release",
    "restore",
    "resume",
    "tcp_info",
    "thaw",
]
