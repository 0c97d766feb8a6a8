"""What a ``proxy`` service is configured with, and what every proxy core offers the runtime.

A proxy core is sans-IO, like a handler: the runtime feeds it the client's bytes
(``on_data``) and the backend's (``on_backend``), and sends what it returns. It holds no
socket and reads no clock of its own, so every rule about when a connection may move is
unit-tested without a network, and its snapshot is a few integers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Protocol

PROTOCOLS = ("http/1.1", "tcp")
FORWARDED = ("x-forwarded-for", "forwarded", "none")
MIN_IDLE_MS, MAX_IDLE_MS = 10, 60_000
DEFAULT_IDLE_MS = 200
MIN_READ_TIMEOUT, MAX_READ_TIMEOUT = 1.0, 3600.0
DEFAULT_READ_TIMEOUT = 60.0


class SpecError(ValueError):
    """A proxy setting that cannot work; the message names it."""


@dataclass(frozen=True)
class ProxySpec:
    """One proxy service: where its backend is and how connections to it are kept."""

    backend: tuple[str, int]
    protocol: str = "http/1.1"
    proxy_protocol: bool = False  # send a PROXY v2 header on each backend connection
    forwarded: str = "x-forwarded-for"  # http/1.1 only: how the backend learns the client
    idle_ms: int = DEFAULT_IDLE_MS  # tcp only: both directions idle this long = movable
    read_timeout: float = DEFAULT_READ_TIMEOUT  # http/1.1: backend silent mid-request: 504

    @property
    def kind(self) -> str:
        """The app name both ends of a move must agree on (the backend may differ)."""
        return f"proxy/{self.protocol}"


def parse_backend(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` with a literal address: a backend is local to each
    host, and a name would be resolved inside every move."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(f"backend {text!r} must be ADDRESS:PORT (a port in 1..65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise SpecError(f"backend {text!r}: brackets are for IPv6 addresses only")
    elif ":" in host:
        raise SpecError(f"backend {text!r}: put an IPv6 address in brackets, [::1]:8080")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise SpecError(f"backend {text!r}: {host!r} is not an IP address") from None
    return str(address), int(port)


def make_spec(
    backend: str,
    *,
    protocol: str = "http/1.1",
    proxy_protocol: str | None = None,
    forwarded: str | None = None,
    idle_ms: int | None = None,
    read_timeout: float | None = None,
) -> ProxySpec:
    """A checked ProxySpec from the cluster file's words."""
    if protocol not in PROTOCOLS:
        raise SpecError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if proxy_protocol not in (None, "v2"):
        raise SpecError(f'proxy_protocol must be "v2", not {proxy_protocol!r}')
    if forwarded is not None:
        if protocol != "http/1.1":
            raise SpecError('forwarded is for protocol = "http/1.1" only')
        if forwarded not in FORWARDED:
            raise SpecError(f"forwarded must be one of {', '.join(FORWARDED)}, not {forwarded!r}")
    if idle_ms is not None:
        if protocol != "tcp":
            raise SpecError('idle_ms is for protocol = "tcp" only')
        if type(idle_ms) is not int or not MIN_IDLE_MS <= idle_ms <= MAX_IDLE_MS:
            raise SpecError(f"idle_ms must be an integer in {MIN_IDLE_MS}..{MAX_IDLE_MS}")
    if read_timeout is not None:
        if protocol != "http/1.1":
            raise SpecError('read_timeout is for protocol = "http/1.1" only')
        if (
            type(read_timeout) not in (int, float)
            or not MIN_READ_TIMEOUT <= read_timeout <= MAX_READ_TIMEOUT
        ):
            bounds = f"{MIN_READ_TIMEOUT:g}..{MAX_READ_TIMEOUT:g}"
            raise SpecError(f"read_timeout must be a number of seconds in {bounds}")
    default_forwarded = "none" if proxy_protocol else "x-forwarded-for"
    return ProxySpec(
        backend=parse_backend(backend),
        protocol=protocol,
        proxy_protocol=proxy_protocol == "v2",
        forwarded=forwarded or default_forwarded,
        idle_ms=idle_ms if idle_ms is not None else DEFAULT_IDLE_MS,
        read_timeout=float(read_timeout) if read_timeout is not None else DEFAULT_READ_TIMEOUT,
    )


class RelayCore:
    """The handler methods both cores answer alike: a relay says nothing of its own when
    a client connects or time passes, and the runtime never wakes it for a tick."""

    SNAPSHOT_VERSION = 1
    TICKS = False

    def on_connect(self) -> bytes:
        return b""

    def on_tick(self, now: float) -> bytes:
        return b""

    def on_close(self) -> None:
        pass


class ProxyCore(Protocol):
    """What the runtime asks of a proxy core, besides the handler methods."""

    hold: bool  # set by a move: stop taking client bytes once at a boundary
    not_movable: str | None  # why this connection can never move (a tunnel), or None

    def on_backend(self, data: bytes) -> bytes: ...  # b"": the backend closed
    def backend_output(self) -> bytes: ...  # what is owed to the backend (taken)
    def backend_opened(self, *, fresh: bool = True) -> None: ...
    def backend_failed(self, why: str) -> bytes: ...  # what the client gets instead
    def waiting_for_backend(self) -> bool: ...  # a request is owed an answer
    def backend_timed_out(self) -> bytes: ...  # the backend said nothing for too long
    def wants_backend(self) -> bool: ...  # a connection to the backend is needed now
    def drop_backend(self) -> bool: ...  # close the backend connection now
    def finished(self) -> bool: ...  # close the client connection once all is sent
    def reading_client(self) -> bool: ...  # take more client bytes now
    def at_boundary(self, now: float) -> bool: ...  # nothing in flight: it may freeze
    def next_check(self, now: float) -> float | None: ...  # when at_boundary may change by time
    def describe(self) -> dict[str, Any]: ...
