"""The lab's plan on real machines (the Vagrant demo): set up this machine as one node.

Vagrant gives each VM its IPv4 link addresses from the plan's ``vm`` variant
(``vagrant/plan-vm.json``, generated from ``plan.json``). ``setup_node`` does the rest, as
``pysteer lab`` does for namespaces: the IPv6 link addresses, the role's sysctls, the VIP
on the hosts' lo, and routes to the plan's prefixes through the steering node. It leaves
the default route alone (the VM's own, for management and apt) and can run again.
"""

from __future__ import annotations

import errno
import time
from socket import AF_INET6
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pysteer.lab import routes
from pysteer.lab.plan import LabPlan
from pysteer.lab.topology import LabError
from pysteer.provision import add_vip, role_sysctls, set_sysctls


def _ignore_exists(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def _interface_with(ipr: IPRoute, address: str) -> int:
    for msg in ipr.get_addr():
        if msg.get_attr("IFA_ADDRESS") == address:
            return msg["index"]
    raise LabError(f"no interface holds {address}: did Vagrant configure the private networks?")


IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40  # linux/if_addr.h
DAD_TIMEOUT = 10.0  # seconds: DAD takes about 1 s per address (one probe, then a wait)


def _wait_dad(ipr: IPRoute, timeout: float = DAD_TIMEOUT) -> float:
    """Wait until no IPv6 address here is tentative: until DAD ends, an address cannot be
    a source, and a router's cannot be resolved, so the first connections after set-up
    would stall (a test saw a 5 s connect time out). Returns the seconds waited."""
    start = time.monotonic()
    while True:
        flags = [m.get_attr("IFA_FLAGS") or m["flags"] for m in ipr.get_addr(family=AF_INET6)]
        if any(f & IFA_F_DADFAILED for f in flags):
            raise LabError("an IPv6 address of this node is used by another machine (DAD failed)")
        if not any(f & IFA_F_TENTATIVE for f in flags):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise LabError(f"IPv6 addresses still tentative after {timeout:g} s")
        time.sleep(0.05)


def setup_node(plan: LabPlan, node: str) -> list[str]:
    """Configure this machine as ``node`` of ``plan``; returns what it did, for the log."""
    if node not in plan.nodes:
        raise LabError(f"unknown node {node!r}; the plan has {', '.join(plan.nodes)}")
    steer = node in plan.steers
    ecmp = len(plan.steers) > 1 and not steer
    values = role_sysctls(steer=steer, host=node in plan.hosts, ecmp=ecmp)
    set_sysctls(values)
    done = [f"sysctls: {', '.join(sorted(values))}"]
    with IPRoute() as ipr:
        for link in plan.links:
            for end in (link.steer_end, link.peer_end):
                if end.node != node:
                    continue
                idx = _interface_with(ipr, str(end.v4.ip))
                _ignore_exists(
                    ipr.addr,
                    "add",
                    index=idx,
                    address=str(end.v6.ip),
                    prefixlen=end.v6.network.prefixlen,
                )
                ipr.link("set", index=idx, state="up")
                done.append(f"link {link.subnet}: {end.v4} {end.v6}")
        waited = _wait_dad(ipr)
        if waited > 0.1:
            done.append(f"waited {waited:.1f} s for IPv6 duplicate address detection")
        if steer:
            routes.steer_routes(ipr, plan, node, again=True)
            done.append(f"VIP routed to {plan.default_host}")
            return done
        if node in plan.hosts:
            add_vip(ipr, plan.vip_v4, plan.vip_v6, again=True)
            done.append(f"VIP {plan.vip_v4} {plan.vip_v6} on lo")
        # Not the default route: the VM's own (Vagrant's NAT) must stay.
        routes.peer_routes(ipr, plan, node, dst=(str(plan.v4), str(plan.v6)), again=True)
        several = len(plan.steers) > 1
        via = f"ECMP over {', '.join(plan.steers)}" if several else "the steering node"
        done.append(f"{plan.v4} and {plan.v6} via {via}")
    return done
