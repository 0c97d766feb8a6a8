"""`pysteer lab vm-setup`, the Vagrant VMs' provisioning, on namespaces standing in for VMs.

Each namespace gets what Vagrant gives a VM: interfaces named eth1.. holding only their
IPv4 link address from the plan's vm variant, and a default route of its own that must
survive. vm-setup (run twice) must make the VIP reachable from the client over IPv4 and
IPv6, and the hosts reachable from each other through the steering node. With two
steering nodes (``--steering 2``, the Vagrantfile's PYSTEER_STEERING=2), the client's
connections to the VIP spread over both.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pysteer import netns
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root, unique_prefix

PLAN = load("vm")
VM_SETUP = [sys.executable, "-m", "pysteer", "lab", "vm-setup"]


@pytest.fixture(params=[1, 2], ids=["one-steering-node", "two-steering-nodes"])
def vms(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    require_root()
    global PLAN  # noqa: PLW0603 - the tests below read the plan the VMs were made for
    PLAN = load("vm", steering=request.param)
    prefix = unique_prefix()
    names = {node: f"{prefix}-{node}" for node in PLAN.nodes}
    for name in names.values():
        pr_netns.create(name)
    try:
        with IPRoute() as ipr:
            for i, link in enumerate(PLAN.links, 1):
                ipr.link(
                    "add", ifname=f"v{prefix}{i}", kind="veth", peer={"ifname": f"p{prefix}{i}"}
                )
                for ifname, node in (
                    (f"v{prefix}{i}", link.steer_end.node),
                    (f"p{prefix}{i}", link.peer),
                ):
                    idx = ipr.link_lookup(ifname=ifname)[0]
                    ipr.link("set", index=idx, net_ns_fd=names[node])

        def vagrant_like(node: str) -> None:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                n = 0
                for i, link in enumerate(PLAN.links, 1):
                    for end, ifname in (
                        (link.steer_end, f"v{prefix}{i}"),
                        (link.peer_end, f"p{prefix}{i}"),
                    ):
                        if end.node != node:
                            continue
                        n += 1
                        idx = ipr.link_lookup(ifname=ifname)[0]
                        ipr.link("set", index=idx, ifname=f"eth{n}", state="up")
                        ipr.addr(
                            "add",
                            index=idx,
                            address=str(end.v4.ip),
                            prefixlen=end.v4.network.prefixlen,
                        )
                dummy = "mgmt0"  # the VM's own NAT link and default route
                ipr.link("add", ifname=dummy, kind="veth", peer={"ifname": "mgmt1"})
                idx = ipr.link_lookup(ifname=dummy)[0]
                ipr.link("set", index=idx, state="up")
                ipr.addr("add", index=idx, address="192.0.2.10", prefixlen=24)
                ipr.route("add", dst="0.0.0.0/0", gateway="192.0.2.1")

        for node, name in names.items():
            netns.call_in(name, vagrant_like, node)
        yield names
    finally:
        for name in names.values():
            for pid in netns.pids(name):
                subprocess.run(["kill", "-9", str(pid)], check=False)
            pr_netns.remove(name)


def default_route(name: str) -> str:
    def read() -> str:
        with IPRoute() as ipr:
            routes = ipr.get_default_routes(family=socket.AF_INET)
            return routes[0].get_attr("RTA_GATEWAY") if routes else ""

    return netns.call_in(name, read)


def test_vm_setup_connects_the_plan(vms: dict[str, str]) -> None:
    for _ in range(2):  # idempotent
        for node, name in vms.items():
            out = subprocess.run(
                netns.exec_argv(
                    name, [*VM_SETUP, "--node", node, "--steering", str(len(PLAN.steers))]
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            assert out.returncode == 0, out.stderr
    assert "VIP routed to a" in out.stdout or out.stdout
    for name in vms.values():
        assert default_route(name) == "192.0.2.1"  # the VM's own default route is kept
    for family, vip in ((socket.AF_INET, str(PLAN.vip_v4)), (socket.AF_INET6, str(PLAN.vip_v6))):
        server = netns.call_in(vms["a"], socket.create_server, (vip, 9400), family=family)
        client = netns.call_in(vms["client"], socket.create_connection, (vip, 9400), 5)
        conn, peer = server.accept()
        v = 4 if family == socket.AF_INET else 6
        client_address = PLAN.address("client", v) if len(PLAN.steers) == 1 else PLAN.client_home(v)
        assert peer[0] == str(client_address)
        client.sendall(b"over the steering node")
        assert conn.recv(100) == b"over the steering node"
        for s in (client, conn, server):
            s.close()
    if len(PLAN.steers) > 1:  # the client's flows hash over both steering nodes
        gateways = set()
        for sport in range(40000, 40032):
            argv = ["ip", "-j", "route", "get", str(PLAN.vip_v4), "from"]
            argv += [
                str(PLAN.client_home(4)),
                "ipproto",
                "tcp",
                "sport",
                str(sport),
                "dport",
                "443",
            ]
            out = subprocess.run(
                netns.exec_argv(vms["client"], argv), capture_output=True, text=True, check=True
            )
            gateways.add(json.loads(out.stdout)[0]["gateway"])
        steer_ends = {str(PLAN.link(PLAN.client, s).steer_end.v4.ip) for s in PLAN.steers}
        assert gateways == steer_ends
    # host to host (the agents' peer traffic), through the steering node
    b_addr = str(PLAN.address("b"))
    server = netns.call_in(vms["b"], socket.create_server, (b_addr, 9401))
    client = netns.call_in(vms["a"], socket.create_connection, (b_addr, 9401), 5)
    conn, _ = server.accept()
    for s in (client, conn, server):
        s.close()


def test_vm_setup_refuses_unknown_node(vms: dict[str, str]) -> None:
    out = subprocess.run(
        netns.exec_argv(
            vms["a"], [sys.executable, "-m", "pysteer", "lab", "vm-setup", "--node", "c"]
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "unknown node 'c'" in out.stderr
