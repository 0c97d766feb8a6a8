"""An nftables network lock, as CRIU takes one: drop chosen flows' packets in a namespace.

A socket in repair mode still ACKs what it receives, so bytes that reach the old host
after the dump would be acknowledged and then lost. The lock drops them instead, so the
peer retransmits them to the new host. The steering issue replaces this with parking.
"""

from __future__ import annotations

import ipaddress
import subprocess

from pysteer import netns
from pysteer.lab import Lab
from pysteer.tcp.constants import INJECT_MARK

TABLE = "pysteer_lock"

Flow = tuple[str, int, str, int]  # source address, source port, destination address, port


class NftDrop:
    """A set of flows dropped at one netfilter hook of one network namespace."""

    def __init__(self, namespace: str, hook: str = "prerouting") -> None:
        self.namespace = namespace
        self.table = f"{TABLE}_{hook}"
        self._nft(
            "-f",
            "-",
            input=f"""
table inet {self.table} {{
  set flows4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}
  set flows6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}
  chain hold {{
    type filter hook {hook} priority -300; policy accept;
    meta mark {INJECT_MARK:#x} accept
    ip saddr . tcp sport . ip daddr . tcp dport @flows4 counter drop
    ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 counter drop
  }}
}}
""",
        )

    def _nft(self, *args: str, input: str | None = None) -> None:
        subprocess.run(
            netns.exec_argv(self.namespace, ["nft", *args]), input=input, text=True, check=True
        )

    @staticmethod
    def _element(flow: Flow) -> tuple[str, str]:
        src, sport, dst, dport = flow
        family = "flows6" if ipaddress.ip_address(src).version == 6 else "flows4"
        return family, f"{{ {src} . {sport} . {dst} . {dport} }}"

    def add(self, flow: Flow) -> None:
        family, element = self._element(flow)
        self._nft("add", "element", "inet", self.table, family, element)

    def remove(self, flow: Flow) -> None:
        family, element = self._element(flow)
        self._nft("delete", "element", "inet", self.table, family, element)


class FlowLock:
    """Per-host ingress drop lists for flows ``(client, client_port, server, server_port)``."""

    def __init__(self, lab: Lab, hosts: tuple[str, ...]) -> None:
        self.drops = {host: NftDrop(lab.netns(host)) for host in hosts}

    def lock(self, host: str, flow: Flow) -> None:
        self.drops[host].add(flow)

    def unlock(self, host: str, flow: Flow) -> None:
        self.drops[host].remove(flow)
