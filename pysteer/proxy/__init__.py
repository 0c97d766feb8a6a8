"""pysteer in front of an unmodified local service (``app = "proxy"``).

The client's connection ends at pysteer (TCP, and TLS when the service has it), as for
any app; the proxy core relays it over a connection of its own to the host's backend.
A move happens only where that backend connection holds nothing the client depends on:
between HTTP/1.1 requests (``http``), or after both directions were idle (``tcp``). The
new host opens its own backend connection. docs/proxy.md is the operator's page.
"""

from __future__ import annotations

from pysteer.proxy.http import HttpProxy
from pysteer.proxy.spec import ProxyCore, ProxySpec, SpecError, make_spec
from pysteer.proxy.tcp import TcpProxy


def new_core(
    spec: ProxySpec, client: tuple[str, int], local: tuple[str, int], tls: bool
) -> HttpProxy | TcpProxy:
    """The core for one client connection of a proxy service."""
    if spec.protocol == "tcp":
        return TcpProxy(spec, client, local, tls)
    return HttpProxy(spec, client, local, tls)


def core_class(spec: ProxySpec) -> type:
    return TcpProxy if spec.protocol == "tcp" else HttpProxy


__all__ = [
    "HttpProxy",
    "ProxyCore",
    "ProxySpec",
    "SpecError",
    "TcpProxy",
    "core_class",
    "make_spec",
    "new_core",
]
