"""An nftables network lock, as CRIU takes one: drop a flow's packets on a host's ingress.

A socket in repair mode still ACKs what it receives, so bytes that reach the old host
after the dump would be acknowledged and then lost. The lock drops them instead, so the
peer retransmits them to the new host. The steering issue replaces this with parking.
"""

from __future__ import annotations

import ipaddress

from pysteer.lab import Lab

TABLE = "pysteer_lock"
_RULESET = f"""
table inet {TABLE} {{
  set flows4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}
  set flows6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}
  chain hold {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr . tcp sport . ip daddr . tcp dport @flows4 counter drop
    ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 counter drop
  }}
}}
"""


class FlowLock:
    """Per-host drop lists for flows ``(client, client_port, server, server_port)``."""

    def __init__(self, lab: Lab, hosts: tuple[str, ...]) -> None:
        self.lab = lab
        for host in hosts:
            lab.run(host, ["nft", "-f", "-"], input=_RULESET)

    @staticmethod
    def _element(flow: tuple[str, int, str, int]) -> tuple[str, str]:
        src, sport, dst, dport = flow
        family = "flows6" if ipaddress.ip_address(src).version == 6 else "flows4"
        return family, f"{{ {src} . {sport} . {dst} . {dport} }}"

    def lock(self, host: str, flow: tuple[str, int, str, int]) -> None:
        family, element = self._element(flow)
        self.lab.run(host, ["nft", "add", "element", "inet", TABLE, family, element])

    def unlock(self, host: str, flow: tuple[str, int, str, int]) -> None:
        family, element = self._element(flow)
        self.lab.run(host, ["nft", "delete", "element", "inet", TABLE, family, element])
