"""Flows as operators write them: ``SRC:PORT-DST:PORT``, IPv6 in brackets.

``10.0.0.2:51000-10.0.0.100:443`` and ``[fd00::2]:51000-[fd00::64]:443``. The same
syntax is used by every pysteer command.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# Ports are ASCII digits (``\d`` takes any Unicode digit), at most 5 of them: ``int()`` then
# never sees a number over Python's 4300-digit limit (a plain ValueError).
_ENDPOINT = r"(?:\[(?P<{0}6>[0-9A-Fa-f:.]+)\]|(?P<{0}4>[0-9.]+)):(?P<{0}port>[0-9]{{1,5}})"
_FLOW_RE = re.compile(f"{_ENDPOINT.format('s')}-{_ENDPOINT.format('d')}")
_SHOWN = 100  # characters of a bad flow quoted in an error message


def _quote(text: str) -> str:
    """``text`` as repr, cut short: an error answer never grows with its input."""
    return repr(text) if len(text) <= _SHOWN else f"{text[:_SHOWN]!r}... ({len(text)} chars)"


class FlowSyntaxError(ValueError):
    """A flow string that does not parse; the message shows the expected form."""


@dataclass(frozen=True)
class Flow:
    """A TCP flow from a client to a service address (the steering node's view)."""

    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    dport: int

    @property
    def family(self) -> int:
        return self.src.version

    @classmethod
    def parse(cls, text: str) -> Flow:
        """The flow ``text`` names; anything else raises FlowSyntaxError, never another error."""
        if not isinstance(text, str):
            raise FlowSyntaxError(f"a flow is a string, not {type(text).__name__}")
        shown = _quote(text)
        m = _FLOW_RE.fullmatch(text.strip())
        if not m and "[" not in text and text.count(":") > 2:
            raise FlowSyntaxError(
                f"malformed flow {shown}: put IPv6 addresses in brackets, e.g. "
                "[fd00::2]:51000-[fd00::64]:443"
            )
        if not m:
            raise FlowSyntaxError(
                f"malformed flow {shown}: expected SRC:PORT-DST:PORT, "
                "e.g. 10.0.0.2:51000-10.0.0.100:443 or [fd00::2]:51000-[fd00::64]:443"
            )
        ends = []
        for side in "sd":
            host = m.group(f"{side}6") or m.group(f"{side}4")
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                bad = _quote(host)
                raise FlowSyntaxError(f"malformed flow {shown}: bad address {bad}") from None
            if m.group(f"{side}6") is not None and addr.version == 4:
                raise FlowSyntaxError(
                    f"malformed flow {shown}: {addr} is an IPv4 address, written without brackets"
                )
            if m.group(f"{side}6") is None and addr.version == 6:
                raise FlowSyntaxError(f"malformed flow {shown}: put IPv6 addresses in brackets")
            port = int(m.group(f"{side}port"))
            if not 1 <= port <= 65535:
                raise FlowSyntaxError(f"malformed flow {shown}: port {port} out of 1..65535")
            ends.append((addr, port))
        (src, sport), (dst, dport) = ends
        if src.version != dst.version:
            raise FlowSyntaxError(f"malformed flow {shown}: mixes IPv4 and IPv6")
        return cls(src, sport, dst, dport)

    def __str__(self) -> str:
        def end(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
            return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"

        return f"{end(self.src, self.sport)}-{end(self.dst, self.dport)}"

    @classmethod
    def of_server_socket(cls, local: tuple, peer: tuple) -> Flow:
        """The flow of a server-side socket (peer is the client, local the service)."""
        return cls(ipaddress.ip_address(peer[0]), peer[1], ipaddress.ip_address(local[0]), local[1])
