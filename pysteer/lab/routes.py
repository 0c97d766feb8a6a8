"""Each node's addresses and routes for a plan with one or several steering nodes: the
namespace lab and the Vagrant VMs (``vm-setup``) both apply them.

- A steering node routes the VIP to the default host over its own link. With several,
  it also has a control address of its own on ``lo``, routes the client's own address
  over its client link, and the other steering nodes' links over its own link to the same
  peer (a reply may leave a host by another steering node than the one its flow came in).
- The client and each host route ``dst`` (the lab: everything; a VM, whose own default
  route must survive: the plan's prefixes) through the steering nodes: one next hop, or
  ECMP over several with the node's own source address (the client's on ``lo``: Linux
  prefers a next hop whose device holds the source, which would pin every flow to one),
  and each steering node's control address over its own link.

``again``: the node may be set up already (a re-run): replace, and skip what exists.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from pysteer.provision import route_default, route_vip

if TYPE_CHECKING:
    from pyroute2 import IPRoute

    from pysteer.lab.plan import LabPlan

DEFAULT = ("0.0.0.0/0", "::/0")


def steer_routes(ipr: IPRoute, plan: LabPlan, steer: str, *, again: bool = False) -> None:
    default = plan.link(plan.default_host, steer).peer_end
    route_vip(ipr, plan.vip_v4, plan.vip_v6, default.v4.ip, default.v6.ip, again=again)
    if len(plan.steers) == 1:
        return
    lo = ipr.link_lookup(ifname="lo")[0]
    _quiet(again, ipr.addr, "add", index=lo, address=str(plan.control_address(steer)), prefixlen=32)
    client = plan.link(plan.client, steer).peer_end
    how = "replace" if again else "add"
    ipr.route(how, dst=f"{plan.client_home(4)}/32", gateway=str(client.v4.ip))
    ipr.route(how, dst=f"{plan.client_home(6)}/128", gateway=str(client.v6.ip))
    for other in plan.links:
        if other.steer_end.node == steer:
            continue
        via = plan.link(other.peer, steer).peer_end
        ipr.route(how, dst=str(other.peer_end.v4.network), gateway=str(via.v4.ip))
        ipr.route(how, dst=str(other.peer_end.v6.network), gateway=str(via.v6.ip))


def peer_routes(
    ipr: IPRoute,
    plan: LabPlan,
    peer: str,
    steers: list[str] | None = None,
    *,
    dst: tuple[str, str] = DEFAULT,
    again: bool = False,
) -> None:
    """``steers``: the steering nodes to route through (default: all of the plan's)."""
    several = len(plan.steers) > 1
    if peer == plan.client and several:
        lo = ipr.link_lookup(ifname="lo")[0]
        _quiet(again, ipr.addr, "add", index=lo, address=str(plan.client_home(4)), prefixlen=32)
        _quiet(again, ipr.addr, "add", index=lo, address=str(plan.client_home(6)), prefixlen=128)
    next_hops(ipr, plan, peer, list(plan.steers) if steers is None else steers, dst=dst)
    if several:
        how = "replace" if again else "add"
        for steer in plan.steers:
            via = plan.link(peer, steer).steer_end.v4.ip
            ipr.route(how, dst=f"{plan.control_address(steer)}/32", gateway=str(via))


def next_hops(
    ipr: IPRoute, plan: LabPlan, peer: str, steers: list[str], *, dst: tuple[str, str] = DEFAULT
) -> None:
    """``dst`` through ``steers`` (what a router does when it adds or withdraws one)."""
    gateways = [
        (plan.link(peer, s).steer_end.v4.ip, plan.link(peer, s).steer_end.v6.ip) for s in steers
    ]
    mine = plan.link(peer).peer_end
    src: tuple[Any, Any] = (mine.v4.ip, mine.v6.ip)
    if peer == plan.client and len(plan.steers) > 1:
        src = (plan.client_home(4), plan.client_home(6))
    route_default(ipr, gateways, src, dst=dst)


def _quiet(again: bool, fn: Any, *args: Any, **kwargs: Any) -> None:
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if not (again and exc.code == errno.EEXIST):
            raise
