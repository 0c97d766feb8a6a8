"""The lab's address plan: one layout, several address variants, every address derived.

The plan is data (``plan.json``) so that the namespace lab and the Vagrant VMs share it.
Link N of the layout becomes subnet N of the variant's IPv4 /16 and IPv6 /48; the
steering node is host 1 on every link and the other node host 2; the VIP is host 1 of the
VIP subnet. With more than one steering node (``steering``), steering node K (from 0;
named ``steer``, ``steer2``, ...) has its own link to the client and to every host, on
subnet N + 10 K: the client reaches the VIP through all of them (ECMP).

Only private IPv4 (RFC 1918) and IPv6 ULA (fc00::/7) bases are accepted, so the lab never
claims an address it does not own.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

PLAN_FILE = "plan.json"
DEFAULT_VARIANT = "lab"
_PRIVATE_V4 = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
_ULA = ipaddress.ip_network("fc00::/7")


class PlanError(ValueError):
    """The address plan or an override of it is invalid."""


@dataclass(frozen=True)
class Iface:
    """One end of a lab link: the interface name in its node and its addresses."""

    node: str
    name: str
    v4: ipaddress.IPv4Interface
    v6: ipaddress.IPv6Interface


@dataclass(frozen=True)
class Link:
    """A point-to-point link between a steering node (``steer_end.node``) and one other
    node."""

    peer: str
    subnet: int
    steer_end: Iface
    peer_end: Iface


@dataclass(frozen=True)
class LabPlan:
    """Every node, link and address of one lab, derived from two base prefixes."""

    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network
    client: str
    steer: str
    hosts: tuple[str, ...]
    default_host: str
    links: tuple[Link, ...]
    vip_v4: ipaddress.IPv4Address
    vip_v6: ipaddress.IPv6Address
    layout: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)
    steers: tuple[str, ...] = ()  # every steering node, ``steer`` first

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.client, *self.steers, *self.hosts)

    def link(self, peer: str, steer: str | None = None) -> Link:
        """The link between ``peer`` and steering node ``steer`` (default: the first)."""
        steer = steer or self.steer
        for link in self.links:
            if link.peer == peer and link.steer_end.node == steer:
                return link
        raise PlanError(f"no link between {steer!r} and {peer!r} in the plan")

    def address(self, node: str, family: int = 4) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The node's own address on its link to the first steering node (a steering
        node: its side of its client link)."""
        if node in self.steers:
            end = self.link(self.client, node).steer_end
        else:
            end = self.link(node).peer_end
        return end.v4.ip if family == 4 else end.v6.ip

    def control_address(self, steer: str) -> ipaddress.IPv4Address:
        """Where steering node ``steer`` serves its agents (and any peer reaches it): with
        one steering node, its side of its link to the first host; with several, its own
        address on ``lo`` (host 1 of subnet CONTROL_SUBNET + K), which every other node
        routes over its own link to it (a steering node's link addresses are reachable
        only through that node, and hosts do not forward)."""
        if len(self.steers) == 1:
            return self.link(self.hosts[0], steer).steer_end.v4.ip
        k = self.steers.index(steer)
        return _subnet_v4(self.v4, CONTROL_SUBNET + k).network_address + 1

    def client_home(self, family: int = 4) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """With several steering nodes, the client's own address on ``lo`` (host 2 of
        subnet CLIENT_SUBNET), the source of its connections: the kernel prefers an ECMP
        next hop whose device holds the source address, so an address on one link would
        pin every flow to that link's steering node."""
        net = (
            _subnet_v4(self.v4, CLIENT_SUBNET)
            if family == 4
            else _subnet_v6(self.v6, CLIENT_SUBNET)
        )
        return net.network_address + 2

    def vip(self, family: int = 4) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.vip_v4 if family == 4 else self.vip_v6

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "v4": str(self.v4),
            "v6": str(self.v6),
            "vip": {"v4": str(self.vip_v4), "v6": str(self.vip_v6)},
            **(
                {"steering": len(self.steers), "steers": list(self.steers)}
                if len(self.steers) > 1
                else {}
            ),
            "default_host": self.default_host,
            "links": [
                {
                    "peer": link.peer,
                    "subnet": link.subnet,
                    "steer": _iface_dict(link.steer_end),
                    "peer_end": _iface_dict(link.peer_end),
                }
                for link in self.links
            ],
        }


def _iface_dict(iface: Iface) -> dict[str, str]:
    return {"node": iface.node, "ifname": iface.name, "v4": str(iface.v4), "v6": str(iface.v6)}


def steer_ifname(peer: str) -> str:
    """Interface name on the steering node for its link to ``peer``."""
    return f"to-{peer}"


PEER_IFNAME = "to-steer"
MAX_STEERING = 8  # steering nodes in one lab (subnets N + 10 K stay below the VIP's)
SUBNET_STRIDE = 10
CONTROL_SUBNET = 90  # steering node K's control address is in subnet 90 + K (several)
CLIENT_SUBNET = 80  # the client's own address, with several steering nodes


def steer_name(first: str, k: int) -> str:
    """Steering node K's name: the layout's for the first, then ``<it>2``, ``<it>3``..."""
    return first if k == 0 else f"{first}{k + 1}"


def peer_ifname(first: str, steer: str) -> str:
    """A node's interface towards steering node ``steer``."""
    return PEER_IFNAME if steer == first else f"to-{steer}"


def _base_v4(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise PlanError(f"IPv4 base {text!r} is not a network: {exc}") from None
    if net.prefixlen != 16:
        raise PlanError(f"IPv4 base {text} must be a /16 (the plan uses /24 subnets of it)")
    if not any(net.subnet_of(p) for p in _PRIVATE_V4):
        raise PlanError(
            f"IPv4 base {text} is not private (RFC 1918); the lab only uses addresses it owns"
        )
    return net


def _base_v6(text: str) -> ipaddress.IPv6Network:
    try:
        net = ipaddress.IPv6Network(text)
    except ValueError as exc:
        raise PlanError(f"IPv6 base {text!r} is not a network: {exc}") from None
    if net.prefixlen != 48:
        raise PlanError(f"IPv6 base {text} must be a /48 (the plan uses /64 subnets of it)")
    if not net.subnet_of(_ULA):
        raise PlanError(
            f"IPv6 base {text} is not a ULA (fc00::/7); the lab only uses addresses it owns"
        )
    return net


def _subnet_v4(base: ipaddress.IPv4Network, n: int) -> ipaddress.IPv4Network:
    if not 0 <= n < 1 << 8:
        _bad_subnet(n)
    return ipaddress.IPv4Network((int(base.network_address) + (n << 8), 24))


def _subnet_v6(base: ipaddress.IPv6Network, n: int) -> ipaddress.IPv6Network:
    if not 0 <= n < 1 << 16:
        _bad_subnet(n)
    return ipaddress.IPv6Network((int(base.network_address) + (n << 64), 64))


def _bad_subnet(n: int) -> None:
    raise PlanError(f"subnet index {n} is out of range 0..255")


def build(layout: dict[str, Any], v4: str, v6: str, steering: int = 1) -> LabPlan:
    """Derive a full plan from a layout and two base prefixes, with ``steering``
    steering nodes."""
    base4, base6 = _base_v4(v4), _base_v6(v6)
    if isinstance(steering, bool) or not isinstance(steering, int):
        raise PlanError(f"steering must be a number of steering nodes, not {steering!r}")
    if not 1 <= steering <= MAX_STEERING:
        raise PlanError(f"steering must be 1..{MAX_STEERING} steering nodes, not {steering}")
    try:
        client, steer = str(layout["client"]), str(layout["steer"])
        hosts = tuple(str(h) for h in layout["hosts"])
        default_host = str(layout["default_host"])
        subnets = {str(k): int(v) for k, v in layout["links"].items()}
        vip_subnet = int(layout["vip_subnet"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"malformed plan layout: {exc!r}") from None
    if default_host not in hosts:
        raise PlanError(f"default host {default_host!r} is not one of the hosts {hosts}")
    if set(subnets) != {client, *hosts}:
        raise PlanError("the layout must link the steering node to the client and every host")
    steers = tuple(steer_name(steer, k) for k in range(steering))
    if set(steers) & {client, *hosts}:
        raise PlanError(f"steering node names {steers} collide with the other nodes")
    used = [n + SUBNET_STRIDE * k for k in range(steering) for n in subnets.values()]
    used.append(vip_subnet)
    if steering > 1:
        used += [CONTROL_SUBNET + k for k in range(steering)] + [CLIENT_SUBNET]
    if len(set(used)) != len(used) or not all(0 < n < 256 for n in used):
        raise PlanError(f"subnet indexes must be distinct and in 1..255: {used}")

    links = []
    for k, node in enumerate(steers):
        for peer, first in subnets.items():
            n = first + SUBNET_STRIDE * k
            links.append(
                _link(base4, base6, steer=node, peer=peer, n=n, peer_if=peer_ifname(steer, node))
            )
    return LabPlan(
        v4=base4,
        v6=base6,
        client=client,
        steer=steer,
        hosts=hosts,
        default_host=default_host,
        links=tuple(links),
        vip_v4=_subnet_v4(base4, vip_subnet).network_address + 1,
        vip_v6=_subnet_v6(base6, vip_subnet).network_address + 1,
        layout=layout,
        steers=steers,
    )


def _link(
    base4: ipaddress.IPv4Network,
    base6: ipaddress.IPv6Network,
    *,
    steer: str,
    peer: str,
    n: int,
    peer_if: str,
) -> Link:
    s4, s6 = _subnet_v4(base4, n), _subnet_v6(base6, n)
    return Link(
        peer=peer,
        subnet=n,
        steer_end=Iface(
            steer,
            steer_ifname(peer),
            ipaddress.IPv4Interface((s4.network_address + 1, 24)),
            ipaddress.IPv6Interface((s6.network_address + 1, 64)),
        ),
        peer_end=Iface(
            peer,
            peer_if,
            ipaddress.IPv4Interface((s4.network_address + 2, 24)),
            ipaddress.IPv6Interface((s6.network_address + 2, 64)),
        ),
    )


def from_dict(saved: dict[str, Any]) -> LabPlan:
    """Rebuild a plan from ``LabPlan.to_dict()`` output (a lab's state file)."""
    try:
        return build(saved["layout"], saved["v4"], saved["v6"], saved.get("steering", 1))
    except (KeyError, TypeError) as exc:
        raise PlanError(f"malformed saved plan: {exc!r}") from None


def load_document(path: Path | None = None) -> dict[str, Any]:
    """The plan document: the packaged ``plan.json``, or a file of the same shape."""
    try:
        if path is None:
            text = resources.files(__package__).joinpath(PLAN_FILE).read_text()
        else:
            text = Path(path).read_text()
        doc = json.loads(text)
    except OSError as exc:
        raise PlanError(f"cannot read plan {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan {path or PLAN_FILE} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "layout" not in doc or "variants" not in doc:
        raise PlanError(f"plan {path or PLAN_FILE} needs 'layout' and 'variants'")
    return doc


def load(
    variant: str = DEFAULT_VARIANT,
    *,
    path: Path | None = None,
    v4: str | None = None,
    v6: str | None = None,
    steering: int = 1,
) -> LabPlan:
    """Load a plan variant, optionally overriding its base prefixes; ``steering``
    steering nodes."""
    doc = load_document(path)
    variants = doc["variants"]
    if variant not in variants:
        raise PlanError(f"no plan variant {variant!r}; known: {', '.join(sorted(variants))}")
    bases = variants[variant]
    return build(doc["layout"], v4 or bases["v4"], v6 or bases["v6"], steering)
