"""Native XDP must never black-hole a flow silently.

A native XDP redirect reaches a link only if the link's driver takes XDP frames. Most NIC
drivers take them only when the link runs an XDP program of its own. A veth takes them
only when its *peer* runs one, or has GRO on. In the lab the peer is the host's end of the
link (``to-steer`` in a and b), so the tests turn GRO off there and give or take away that
end's XDP program. The steering node attaches pysteer_pass to its own end, ``to-a`` and
``to-b``: that is what a NIC needs, and on a veth it is not enough.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers.migration import listen
from helpers.steerd import DaemonProc
from pyroute2 import IPRoute

from pysteer.flow import Flow
from pysteer.lab import Lab
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.metrics import SteerCollector
from pysteer.steer import loader, pins, xdp_selftest
from pysteer.steer.steerer import Host, HostSpec, Steerer, SteerError
from pysteer.steer.xdp_watch import open_watch

PORT = 8300
NATIVE_PASS = (loader.XDP_ATTACHED_DRV, loader.PASS_NAME)


class Logged(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")

    def find(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@pytest.fixture
def logged() -> Iterator[Logged]:
    handler, logger = Logged(), logging.getLogger("pysteer.steer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def no_gro_on_the_hosts(lab: Lab) -> None:
    """GRO off on the hosts' ends, so that only an XDP program there can make a veth take
    redirected frames; TX checksum offload off on the client (native XDP between veths
    would forward segments with an unfinished checksum)."""
    for host in lab.plan.hosts:
        lab.run(host, ["ethtool", "-K", "to-steer", "gro", "off"])
        assert "generic-receive-offload: off" in lab.run(host, ["ethtool", "-k", "to-steer"]).stdout
    lab.run("client", ["ethtool", "-K", "to-steer", "tx", "off"])


def xdp(lab: Lab, node: str, ifname: str) -> tuple[int, str] | None:
    return lab.call(node, loader.xdp_program, ifname)


def host_specs(lab: Lab) -> list[HostSpec]:
    return [HostSpec(h, f"to-{h}", lab.mac(h, "to-steer")) for h in lab.plan.hosts]


def hosts_of(lab: Lab) -> list[Host]:
    """The hosts as Steerer resolves them (for the self-test's functions)."""

    def index(name: str) -> int:
        return socket.if_nametoindex(name)

    out = []
    for i, h in enumerate(lab.plan.hosts):
        mac = bytes.fromhex(lab.mac(h, "to-steer").replace(":", ""))
        ours = bytes.fromhex(lab.mac("steer", f"to-{h}").replace(":", ""))
        out.append(Host(i, h, f"to-{h}", lab.call("steer", index, f"to-{h}"), mac, ours, 1500))
    return out


def tx_packets(ifname: str) -> int:
    with IPRoute() as ipr:
        return ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_STATS64")[
            "tx_packets"
        ]


def client_socket(lab: Lab, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.bind((str(lab.plan.address("client")), port))
        s.settimeout(10)
        return s

    return lab.call("client", make)


def metric(st: Steerer, name: str) -> float:
    for family in SteerCollector(st).collect():
        if family.name == name:
            return family.samples[0].value
    raise AssertionError(f"no metric {name}")


def test_native_xdp_carries_bytes_when_the_links_take_xdp_frames(lab: Lab, logged: Logged) -> None:
    """The hosts' ends run XDP (GRO off): the self-test passes, a flow steered to b carries
    8 MiB end to end through the XDP redirect, and no redirect fails. Detaching removes
    pysteer's programs, and only those."""
    no_gro_on_the_hosts(lab)
    for host in lab.plan.hosts:
        assert lab.call(host, loader.attach_pass, "to-steer")
    st = Steerer(
        unique_prefix(),
        "to-client",
        namespace=lab.netns("steer"),
        mode="xdp-native",
        hosts=host_specs(lab),
    )
    try:
        assert st.mode == "xdp-native"
        assert xdp(lab, "steer", "to-client") == (loader.XDP_ATTACHED_DRV, loader.STEER_XDP_NAME)
        assert xdp(lab, "steer", "to-a") == xdp(lab, "steer", "to-b") == NATIVE_PASS
        assert logged.find(
            "native XDP on to-client: the self-test's frames redirected to to-a, to-b left them"
        ), logged.lines
        assert st.stats()["redirect_failed"] == 0  # the self-test's frames are not counted
        vip = str(lab.plan.vip_v4)
        on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
        client = client_socket(lab, 43000)
        flow = Flow.parse(f"{lab.plan.address('client')}:43000-{vip}:{PORT}")
        st.to(flow, "b")
        client.connect((vip, PORT))
        on_b.settimeout(5)
        server, _ = on_b.accept()
        server.settimeout(10)
        block, total = os.urandom(1 << 20), 8
        digest = hashlib.sha256()
        got = 0

        def receive() -> None:
            nonlocal got
            while got < total << 20:
                data = server.recv(1 << 20)
                if not data:
                    return
                digest.update(data)
                got += len(data)

        reader = threading.Thread(target=receive)
        reader.start()
        for _ in range(total):
            client.sendall(block)
        reader.join(30)
        assert got == total << 20
        assert digest.digest() == hashlib.sha256(block * total).digest()
        view = st.get(flow)
        assert view.bytes[2] >= total << 20  # every byte went through the redirect
        stats = st.stats()
        assert stats["xdp_fallback"] == 0  # ... the XDP one: nothing was left to tc
        assert stats["redirected"] >= view.packets[2] > 5000
        assert stats["redirect_failed"] == 0
        assert metric(st, "pysteer_steer_redirect_failed_packets") == 0
        st.gc()
        assert not logged.find("redirected by XDP were lost")
        for s in (client, server, on_b):
            s.close()
    finally:
        st.destroy()
    assert xdp(lab, "steer", "to-client") is None
    assert xdp(lab, "steer", "to-a") is None and xdp(lab, "steer", "to-b") is None
    for host in lab.plan.hosts:  # not pysteer's to remove: the host's own
        assert xdp(lab, host, "to-steer") == NATIVE_PASS


def test_lost_redirects_are_counted_and_logged_by_the_daemon(lab: Lab) -> None:
    """A flow steered to b by native XDP carries bytes while b's end runs XDP. Once that
    program is removed by hand (GRO stays off), b's link refuses the redirected frames:
    the data is lost, the redirect-failure counter rises, and the daemon logs it. With the
    program back, the client's retransmission gets through. ``steer destroy --ifname``
    takes pysteer_pass off the hosts' links."""
    no_gro_on_the_hosts(lab)
    for host in lab.plan.hosts:
        lab.call(host, loader.attach_pass, "to-steer")
    d = DaemonProc(lab, unique_prefix(), "--mode", "xdp-native", "--gc-interval", "0.2", mode=None)
    vip = str(lab.plan.vip_v4)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
    on_b.settimeout(5)
    d.start()
    try:
        assert "self-test's frames redirected to to-a, to-b left them" in d.log()
        assert xdp(lab, "steer", "to-a") == xdp(lab, "steer", "to-b") == NATIVE_PASS
        flow = f"{lab.plan.address('client')}:43001-{vip}:{PORT}"
        assert d.cli("to", flow, "b").returncode == 0
        client = client_socket(lab, 43001)
        client.connect((vip, PORT))
        server, _ = on_b.accept()
        client.sendall(b"before")
        server.settimeout(5)
        assert server.recv(100) == b"before"
        before = d.stats()
        assert before["redirect_failed"] == 0
        lab.run("b", ["ip", "link", "set", "dev", "to-steer", "xdp", "off"])
        client.sendall(b"after")
        server.settimeout(1.0)
        with pytest.raises(TimeoutError):
            server.recv(100)  # lost on the way: b's link refused it
        d.wait_for("redirected by XDP were lost", 5)
        line = next(x for x in d.log().splitlines() if "redirected by XDP were lost" in x)
        assert " ERROR " in line and "to-b: " in line and "(EOPNOTSUPP)" in line, line
        after = d.stats()
        assert after["redirect_failed"] >= 1  # the segment, and any retransmission
        assert after["redirected"] > before["redirected"]  # "redirected" says nothing more
        lab.call("b", loader.attach_pass, "to-steer")
        server.settimeout(15)
        assert server.recv(100) == b"after"  # the client's retransmission got through
        for s in (client, server):
            s.close()
    finally:
        on_b.close()
        d.stop()
        out = d.cli("destroy", "--ifname", "to-client", "--netns", lab.netns("steer"))
        with contextlib.suppress(OSError):
            pins.remove(d.name)
    assert out.returncode == 0, out.stderr
    assert xdp(lab, "steer", "to-client") is None
    assert xdp(lab, "steer", "to-a") is None and xdp(lab, "steer", "to-b") is None


def test_the_self_test_sees_whether_a_redirected_frame_leaves_the_link(lab: Lab) -> None:
    """The self-test on b's link: refused while nothing on b's end takes XDP frames, even with
    pysteer_pass on the steering node's end (a NIC would need that; a veth needs its peer's);
    passed with GRO, or an XDP program, on b's end, and then its frames left to-b."""
    no_gro_on_the_hosts(lab)
    to_b = [h for h in hosts_of(lab) if h.name == "b"]

    def self_test() -> tuple[str | None, int, float]:
        watch = open_watch()
        try:
            sent = tx_packets("to-b")
            started = time.monotonic()
            why = xdp_selftest.check(watch, to_b)
            took = time.monotonic() - started
            while tx_packets("to-b") - sent < xdp_selftest.PROBE_FRAMES and (
                time.monotonic() - started < 0.5  # b's end counts them as it takes them
            ):
                time.sleep(0.01)
            return why, tx_packets("to-b") - sent, took
        finally:
            watch.close()

    refused = "XDP redirect to to-b is refused (EOPNOTSUPP)"
    why, _, took = lab.call("steer", self_test)
    assert why is not None and why.startswith(refused), why
    assert took < 0.2, took
    assert lab.call("steer", loader.attach_pass, "to-b")
    why, _, _ = lab.call("steer", self_test)
    assert why is not None and why.startswith(refused), why
    for fix in ("gro", "xdp"):
        if fix == "gro":
            lab.run("b", ["ethtool", "-K", "to-steer", "gro", "on"])
        else:
            lab.run("b", ["ethtool", "-K", "to-steer", "gro", "off"])
            assert lab.call("b", loader.attach_pass, "to-steer")
        why, left, took = lab.call("steer", self_test)
        assert why is None, (fix, why)
        assert left >= xdp_selftest.PROBE_FRAMES, (fix, left)  # counted at b's end
        assert took < 0.2, took
    assert lab.call("steer", loader.detach_pass, "to-b")


def test_auto_picks_tc_on_veth_and_says_why(lab: Lab, logged: Logged) -> None:
    """In the lab auto picks tc (a veth), logs why, and puts no XDP program anywhere. Where
    auto resolves to native XDP (a NIC), the self-test decides: run here on the lab's links,
    it falls back to tc while the hosts' ends take no XDP frames, and keeps native XDP
    once they run XDP."""
    no_gro_on_the_hosts(lab)
    st = Steerer(
        unique_prefix(),
        "to-client",
        namespace=lab.netns("steer"),
        mode="auto",
        hosts=host_specs(lab),
    )
    try:
        assert st.mode == "tc"
        assert logged.find("auto mode: to-client is a veth: tc"), logged.lines
        for link in ("to-client", "to-a", "to-b"):
            assert xdp(lab, "steer", link) is None
        assert st.stats()["redirect_failed"] == 0
    finally:
        st.destroy()
    hosts = hosts_of(lab)

    def auto_on_a_nic(requested: str = "auto") -> tuple[str, bool, float]:
        for host in hosts:  # what Steerer._install_host does in native mode
            xdp_selftest.add_host("to-client", "xdp-native", host, None)
        started = time.monotonic()
        mode, watch = xdp_selftest.start("to-client", "xdp-native", requested, hosts)
        took = time.monotonic() - started
        if watch is not None:
            watch.close()
        return mode, watch is not None, took

    mode, watched, took = lab.call("steer", auto_on_a_nic)
    assert (mode, watched) == ("tc", False)
    assert logged.find(
        "auto mode: tc on to-client, not native XDP: the self-test failed: "
        "XDP redirect to to-a is refused (EOPNOTSUPP)"
    ), logged.lines
    assert xdp(lab, "steer", "to-a") is None and xdp(lab, "steer", "to-b") is None
    assert took < 1.0, took  # compiling the watch included
    # asked for explicitly, native XDP is kept, and the failed self-test is an error
    assert lab.call("steer", auto_on_a_nic, "xdp-native")[:2] == ("xdp-native", True)
    assert logged.find(
        "ERROR native XDP on to-client: the self-test failed: XDP redirect to "
        "to-a is refused (EOPNOTSUPP)"
    ), logged.lines
    for host in lab.plan.hosts:
        lab.call(host, loader.attach_pass, "to-steer")
    mode, watched, took = lab.call("steer", auto_on_a_nic)
    assert (mode, watched) == ("xdp-native", True)
    assert xdp(lab, "steer", "to-a") == xdp(lab, "steer", "to-b") == NATIVE_PASS
    print(f"\nauto's XDP start (watch + self-test of 2 links): {took * 1000:.0f} ms")
    for link in ("to-a", "to-b"):
        assert lab.call("steer", loader.detach_pass, link)


def test_a_host_mac_of_the_steering_node_itself_is_refused(lab: Lab) -> None:
    own = lab.mac("steer", "to-client")
    with pytest.raises(SteerError, match="the steering node's own MAC"):
        Steerer(
            unique_prefix(),
            "to-client",
            namespace=lab.netns("steer"),
            mode="xdp-native",
            hosts=[HostSpec("a", "to-a", own)],
        )
    for link in ("to-client", "to-a"):  # nothing was attached
        assert xdp(lab, "steer", link) is None
    assert (
        "pysteer"
        not in lab.run("steer", ["tc", "filter", "show", "dev", "to-client", "ingress"]).stdout
    )
