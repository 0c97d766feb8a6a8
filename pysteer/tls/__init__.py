"""TLS the kernel-TLS way: OpenSSL handshakes, pysteer's sans-IO record layer carries on.

``TlsServerConnection(config)`` takes bytes and returns bytes and events; its whole state
is ``export_state()``, a small dict that ``TlsServerConnection.from_state`` continues
elsewhere (docs/how-it-works.md).
"""

from pysteer.tls.config import ServerConfig, TlsConfigError
from pysteer.tls.connection import TlsEnded, TlsError, TlsServerConnection
from pysteer.tls.events import (
    Alert,
    ConnectionClosed,
    DataReceived,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    KeyUpdated,
)
from pysteer.tls.secret import Secret
from pysteer.tls.state import TlsStateError
from pysteer.tls.suites import TLS12, TLS13

__all__ = [
    "TLS12",
    "TLS13",
    "Alert",
    "ConnectionClosed",
    "DataReceived",
    "Event",
    "HandshakeComplete",
    "HandshakeFailed",
    "KeyUpdated",
    "Secret",
    "ServerConfig",
    "TlsConfigError",
    "TlsEnded",
    "TlsError",
    "TlsServerConnection",
    "TlsStateError",
]
