"""What a machine needs to play its role, whoever sets it up: the namespace lab, the
Vagrant VMs, or an operator's own provisioning.

- every node: IPv6 addresses usable at once (no duplicate address detection in the lab);
- a steering node: forwarding on, and loose reverse-path filtering (strict filtering drops
  a host's replies from the VIP on the link the flow was redirected to);
- a host: the VIP on ``lo``, never answered or announced on its links (LVS-DR style), so
  only the steering node draws the VIP's traffic.

Functions that take an ``IPRoute`` act in the namespace that object was opened in; the
callers import pyroute2 (slow to import) only when they provision something.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyroute2 import IPRoute

ALL_SYSCTLS = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}
STEER_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.conf.all.rp_filter": "2",
    "net.ipv4.conf.default.rp_filter": "2",
}
HOST_SYSCTLS = {
    "net.ipv4.conf.all.arp_ignore": "1",
    "net.ipv4.conf.all.arp_announce": "2",
}
# Behind several steering nodes (a router's ECMP): a flow's next hop is chosen by its L4
# hash, so all its packets take one steering node; and a packet may come back over
# another link than its route leaves by, so reverse-path filtering is loose.
ECMP_SYSCTLS = {
    "net.ipv4.fib_multipath_hash_policy": "1",
    "net.ipv6.fib_multipath_hash_policy": "1",
    "net.ipv4.conf.all.rp_filter": "2",
    "net.ipv4.conf.default.rp_filter": "2",
}


def role_sysctls(*, steer: bool, host: bool, ecmp: bool = False) -> dict[str, str]:
    """The sysctls of a node that is a steering node, a host, or (in a test) both;
    ``ecmp``: a node that reaches the others through several steering nodes."""
    values = dict(ALL_SYSCTLS)
    if steer:
        values |= STEER_SYSCTLS
    if host:
        values |= HOST_SYSCTLS
    if ecmp:
        values |= ECMP_SYSCTLS
    return values


def route_default(
    ipr: IPRoute,
    gateways: list[tuple[Any, Any]],
    src: tuple[Any, Any],
    *,
    dst: tuple[str, str] = ("0.0.0.0/0", "::/0"),
) -> None:
    """A node's routes to ``dst`` (v4, v6; default: everything) through steering nodes
    (``gateways``: (v4, v6) of each): one next hop, or ECMP over several, with ``src``
    (v4, v6) as the source address."""
    import socket  # noqa: PLC0415

    targets = dst
    for family, i in ((socket.AF_INET, 0), (socket.AF_INET6, 1)):
        dst_i = targets[i]
        if len(gateways) == 1:
            ipr.route("replace", dst=dst_i, family=family, gateway=str(gateways[0][i]))
        else:
            hops = [{"gateway": str(g[i])} for g in gateways]
            _with_retry(
                lambda d=dst_i, f=family, h=hops, p=str(src[i]): ipr.route(
                    "replace", dst=d, family=f, multipath=h, prefsrc=p
                )
            )


def _with_retry(add: Any, tries: int = 100) -> None:
    """A route whose source address was just added: the kernel refuses it (EINVAL) until
    the address is usable, a few milliseconds later (seen with IPv6 on a fresh link)."""
    import time  # noqa: PLC0415

    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    for attempt in range(tries):
        try:
            add()
            return
        except NetlinkError as exc:
            if exc.code != errno.EINVAL or attempt == tries - 1:
                raise
            time.sleep(0.02)


def set_sysctls(values: dict[str, str]) -> None:
    """Write sysctls; /proc/sys/net follows the writing thread's network namespace."""
    for key, value in values.items():
        Path("/proc/sys", *key.split(".")).write_text(value)


def add_vip(ipr: IPRoute, v4: Any, v6: Any, *, again: bool = False) -> None:
    """The VIP (both families) on ``lo``. ``again``: it may be there already (a re-run)."""
    lo = ipr.link_lookup(ifname="lo")[0]
    for address, length in ((str(v4), 32), (str(v6), 128)):
        _add(ipr, again, "addr", "add", index=lo, address=address, prefixlen=length)


def route_vip(ipr: IPRoute, v4: Any, v6: Any, gw4: Any, gw6: Any, *, again: bool = False) -> None:
    """On a steering node: the VIP's route to its default host (``gw4``/``gw6``)."""
    how = "replace" if again else "add"
    ipr.route(how, dst=f"{v4}/32", gateway=str(gw4))
    ipr.route(how, dst=f"{v6}/128", gateway=str(gw6))


def _add(ipr: IPRoute, again: bool, what: str, *args: Any, **kwargs: Any) -> None:
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415 - see the docstring

    try:
        getattr(ipr, what)(*args, **kwargs)
    except NetlinkError as exc:
        if not (again and exc.code == errno.EEXIST):
            raise
