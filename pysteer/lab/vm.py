"""The lab's plan on real machines (the Vagrant demo): set up this machine as one node.

Vagrant gives each VM its IPv4 link addresses from the plan's ``vm`` variant
(``vagrant/plan-vm.json``, generated from ``plan.json``). ``setup_node`` does the rest, as
``pysteer lab`` does for namespaces: the IPv6 link addresses, the role's sysctls, the VIP
on the hosts' lo, and routes to the plan's prefixes through the steering node. It leaves
the default route alone (the VM's own, for management and apt) and can run again.
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pysteer.lab.plan import LabPlan
from pysteer.lab.topology import ALL_SYSCTLS, HOST_SYSCTLS, STEER_SYSCTLS, LabError, set_sysctls


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


def setup_node(plan: LabPlan, node: str) -> list[str]:
    """Configure this machine as ``node`` of ``plan``; returns what it did, for the log."""
    if node not in plan.nodes:
        raise LabError(f"unknown node {node!r}; the plan has {', '.join(plan.nodes)}")
    values = dict(ALL_SYSCTLS)
    if node == plan.steer:
        values |= STEER_SYSCTLS
    if node in plan.hosts:
        values |= HOST_SYSCTLS
    set_sysctls(values)
    done = [f"sysctls: {', '.join(sorted(values))}"]
    with IPRoute() as ipr:
        for link in plan.links:
            for end in (link.steer_end, link.peer_end):
                if end.node != node:
                    continue
                idx = _interface_with(ipr, str(end.v4.ip))
                _ignore_exists(ipr.addr, "add", index=idx, address=str(end.v6.ip),
                               prefixlen=end.v6.network.prefixlen)  # fmt: skip
                ipr.link("set", index=idx, state="up")
                done.append(f"link {link.subnet}: {end.v4} {end.v6}")
        if node == plan.steer:
            gw = plan.link(plan.default_host).peer_end
            ipr.route("replace", dst=f"{plan.vip_v4}/32", gateway=str(gw.v4.ip))
            ipr.route("replace", dst=f"{plan.vip_v6}/128", gateway=str(gw.v6.ip))
            done.append(f"VIP routed to {plan.default_host}")
            return done
        if node in plan.hosts:
            lo = ipr.link_lookup(ifname="lo")[0]
            _ignore_exists(ipr.addr, "add", index=lo, address=str(plan.vip_v4), prefixlen=32)
            _ignore_exists(ipr.addr, "add", index=lo, address=str(plan.vip_v6), prefixlen=128)
            done.append(f"VIP {plan.vip_v4} {plan.vip_v6} on lo")
        steer = plan.link(node).steer_end
        ipr.route("replace", dst=str(plan.v4), gateway=str(steer.v4.ip))
        ipr.route("replace", dst=str(plan.v6), gateway=str(steer.v6.ip))
        done.append(f"{plan.v4} and {plan.v6} via the steering node")
    return done
