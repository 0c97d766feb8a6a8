"""Events a ``TlsServerConnection`` returns from ``receive_data``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class HandshakeComplete(Event):
    version: str
    suite: str
    alpn: str | None
    sni: str | None
    resumed: bool
    peer_chain: tuple[bytes, ...] = field(repr=False)  # DER, leaf first
    hello_retry: bool = False  # the server sent a HelloRetryRequest


@dataclass(frozen=True)
class HandshakeFailed(Event):
    reason: str


@dataclass(frozen=True)
class DataReceived(Event):
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class KeyUpdated(Event):
    """The peer's KeyUpdate was processed; ``answered`` if it made us send ours (requests
    that arrive together get one answer, queued when ``receive_data`` returns)."""

    answered: bool


@dataclass(frozen=True)
class Alert(Event):
    """A TLS alert, received from the peer (``sent`` False) or sent by us."""

    level: int
    description: int
    sent: bool


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """No more data will arrive: close_notify received, or a fatal alert either way."""

    clean: bool
