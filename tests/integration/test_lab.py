"""The namespace lab: reachability over IPv4 and IPv6, clean removal, coexistence, repair."""

import contextlib
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.waiting import wait_until

from pysteer import netns
from pysteer.lab import Lab, LabError, load, plan
from pysteer.lab.pytest_plugin import unique_prefix

PORT = 7000


def _listen(family: int, addr: str) -> socket.socket:
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, PORT))
    srv.listen()
    srv.settimeout(5)
    return srv


def _connect_and_send(family: int, addr: str, payload: bytes) -> tuple[str, bytes]:
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect((addr, PORT))
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := c.recv(65536):
            echoed += chunk
        return c.getsockname()[0], echoed


def _echo_once(srv: socket.socket) -> str:
    conn, peer = srv.accept()
    with conn:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(data[::-1])
    return peer[0]


def check_vip_reaches_default_host(lab: Lab, family: int) -> None:
    """A client connection to VIP:port lands on host a (not b) and carries bytes exactly."""
    vip = str(lab.plan.vip(4 if family == socket.AF_INET else 6))
    on_a = lab.call("a", _listen, family, vip)
    on_b = lab.call("b", _listen, family, vip)
    payload = os.urandom(200_000)
    seen: dict[str, str] = {}
    server = threading.Thread(target=lambda: seen.setdefault("peer", _echo_once(on_a)))
    server.start()
    try:
        local, echoed = lab.call("client", _connect_and_send, family, vip, payload)
    finally:
        server.join(10)
    assert echoed == payload[::-1]
    client_addr = str(lab.plan.address("client", 4 if family == socket.AF_INET else 6))
    assert local == client_addr
    assert seen["peer"] == client_addr
    on_b.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        on_b.accept()  # host b never saw a connection
    on_a.close()
    on_b.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_client_reaches_server_in_host_a_through_vip(lab: Lab, family: int) -> None:
    check_vip_reaches_default_host(lab, family)


def test_run_and_call_execute_inside_the_namespace(lab: Lab) -> None:
    out = lab.run("client", ["ip", "-o", "-4", "addr", "show", "dev", "to-steer"]).stdout
    assert f" {lab.plan.link('client').peer_end.v4} " in out
    inode = lab.call("steer", lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inode == netns.inode(lab.netns("steer"))
    assert os.stat("/proc/thread-self/ns/net").st_ino != inode  # the caller did not move
    route = lab.run("steer", ["ip", "route", "get", str(lab.plan.vip_v4)]).stdout
    assert f"via {lab.plan.link('a').peer_end.v4.ip} dev to-a" in route
    with pytest.raises(LabError, match="unknown lab node 'c'"):
        lab.run("c", ["true"])


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip() for line in out.stdout.splitlines()}


def _pids_in(inodes: set[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):  # gone, or another user namespace's init
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.append(int(entry))
    return found


def test_down_leaves_no_namespace_link_or_process() -> None:
    links_before = _root_links()
    lab = Lab(prefix=unique_prefix()).up()
    try:
        assert _root_links() == links_before  # the lab adds nothing to the root namespace
        inodes = {name: netns.inode(name) for name in lab.namespaces.values()}
        procs = [
            lab.popen(node, ["sleep", "300"], stdout=subprocess.DEVNULL) for node in lab.plan.nodes
        ]
        # setsid'd children survive the parent's death: down must find them by namespace.
        orphan = lab.popen("b", ["setsid", "sleep", "300"])
        # `ip netns exec` enters the namespace after Popen returns: wait until each has one.
        wait_until(
            lambda: all(netns.pids(name) for name in lab.namespaces.values()),
            10,
            "a process in every namespace",
        )
        assert lab.down() == list(lab.namespaces.values())
        for proc in [*procs, orphan]:
            assert proc.wait(5) is not None
        for name in inodes:
            assert not netns.exists(name)
        assert _pids_in(set(inodes.values())) == []
        assert _root_links() == links_before
        assert not lab.state_file.exists()
        assert lab.down() == []  # safe twice
    finally:  # a failure above must not leave the lab behind (down is safe twice)
        lab.down()


def test_two_labs_coexist(lab_factory: Callable[..., Lab]) -> None:
    first = lab_factory()
    second = lab_factory(v4="10.78.0.0/16", v6="fd70:7374:6566::/48")
    same_plan = lab_factory()
    for lab in (first, second, same_plan):
        check_vip_reaches_default_host(lab, socket.AF_INET)
    second.down()
    assert not any(netns.exists(n) for n in second.namespaces.values())
    assert first.problems() == []
    check_vip_reaches_default_host(first, socket.AF_INET6)


def test_up_is_idempotent_and_repairs_a_half_built_lab(lab: Lab) -> None:
    inode = netns.inode(lab.netns("client"))
    assert lab.ensure() == "already up"
    assert netns.inode(lab.netns("client")) == inode  # already up: nothing rebuilt
    subprocess.run(["ip", "netns", "del", lab.netns("b")], check=True)
    lab.run("a", ["ip", "link", "set", "to-steer", "down"])
    # The kernel destroys a deleted namespace's veth ends (and so their peers) asynchronously.
    deadline = time.monotonic() + 5
    while lab.run("steer", ["ip", "link", "show", "to-b"], check=False).returncode == 0:
        assert time.monotonic() < deadline, "to-b outlived its peer's namespace"
        time.sleep(0.01)
    assert sorted(lab.problems()) == sorted(
        [
            f"namespace {lab.netns('b')} is missing",
            f"{lab.netns('a')}: interface to-steer is down",
            f"{lab.netns('steer')}: interface to-b is missing",
        ]
    )
    assert lab.ensure() == "repaired"
    assert lab.problems() == []
    check_vip_reaches_default_host(lab, socket.AF_INET)


def test_prefix_colliding_with_foreign_namespace_is_refused() -> None:
    prefix = unique_prefix()
    foreign = f"{prefix}-a"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        lab = Lab(prefix=prefix)
        with pytest.raises(LabError, match=f"collides with existing network namespaces {foreign}"):
            lab.up()
        with pytest.raises(LabError, match="were not made by pysteer lab"):
            lab.down()
        assert [n for n in lab.namespaces.values() if netns.exists(n)] == [foreign]
        assert not lab.state_file.exists()
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True)


def test_failed_up_removes_everything() -> None:
    """A host name too long for an interface name makes veth creation fail midway."""
    doc_layout = {
        "client": "client",
        "steer": "steer",
        "hosts": ["a", "hostwithlongname"],
        "default_host": "a",
        "links": {"client": 1, "a": 2, "hostwithlongname": 3},
        "vip_subnet": 100,
    }
    lab = Lab(prefix=unique_prefix(), plan=plan.build(doc_layout, "10.79.0.0/16", "fd79::/48"))
    with pytest.raises(LabError, match="lab up failed, everything it made is removed"):
        lab.up()
    assert [n for n in lab.namespaces.values() if netns.exists(n)] == []
    assert not lab.state_file.exists()


def test_different_plan_on_existing_lab_is_refused(lab: Lab) -> None:
    other = Lab(prefix=lab.prefix, plan=load(v4="10.80.0.0/16"))
    with pytest.raises(LabError, match="exists with a different address plan"):
        other.up()
    assert lab.problems() == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pysteer", "lab", *args], capture_output=True, text=True, check=False
    )


def test_cli_up_status_down() -> None:
    prefix = unique_prefix()
    try:
        up = _cli("up", "--prefix", prefix, "--v4", "10.81.0.0/16", "--json")
        assert up.returncode == 0, up.stderr
        status = json.loads(_cli("status", "--prefix", prefix, "--json").stdout)
        assert status["state"] == "up"
        assert status["vip"] == {"v4": "10.81.100.1", "v6": "fd70:7374:6565:64::1"}
        assert {n: e["netns"] for n, e in status["nodes"].items()} == {
            "client": f"{prefix}-client",
            "steer": f"{prefix}-steer",
            "a": f"{prefix}-a",
            "b": f"{prefix}-b",
        }
        assert status["nodes"]["a"]["interfaces"]["lo"]["addresses"] == [
            "10.81.100.1/32",
            "fd70:7374:6565:64::1/128",
        ]
        assert status["nodes"]["client"]["interfaces"]["to-steer"]["addresses"] == [
            "10.81.1.2/24",
            "fd70:7374:6565:1::2/64",
        ]
        human = _cli("status", "--prefix", prefix)
        assert human.returncode == 0
        assert human.stdout.startswith(f"lab {prefix}: up\n  VIP 10.81.100.1")
        assert _cli("up", "--prefix", prefix).stdout.startswith(f"lab {prefix}: already up")
    finally:
        down = _cli("down", "--prefix", prefix)
    assert down.returncode == 0
    assert down.stdout.strip() == (
        f"lab {prefix}: removed {prefix}-client, {prefix}-steer, {prefix}-a, {prefix}-b"
    )
    again = _cli("down", "--prefix", prefix)
    assert (again.returncode, again.stdout.strip()) == (0, f"lab {prefix}: nothing to remove")
    gone = _cli("status", "--prefix", prefix)
    assert gone.returncode == 2
    assert f"no lab named '{prefix}'" in gone.stderr


def test_concurrent_up_of_one_lab_builds_it_once() -> None:
    prefix = unique_prefix()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pysteer", "lab", "up", "--prefix", prefix],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        results = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], results
        firsts = sorted(out.splitlines()[0] for out, _ in results)
        assert firsts == [
            f"lab {prefix}: already up",
            f"lab {prefix}: already up",
            f"lab {prefix}: up",
        ]
        assert Lab.existing(prefix).problems() == []
    finally:
        Lab.existing(prefix).down()


def test_cli_cluster_keys_live_where_only_root_can_create() -> None:
    """`lab cluster` without --dir writes into /run/pysteer/PREFIX/cluster, 0700 and root's
    (no predictable /tmp path another user could prepare), and `lab down` removes it."""
    prefix = unique_prefix()
    directory = Path("/run/pysteer") / prefix / "cluster"
    try:
        assert _cli("up", "--prefix", prefix, "--v4", "10.82.0.0/16").returncode == 0
        out = _cli("cluster", "--prefix", prefix)
        assert out.returncode == 0, out.stderr
        assert f"cluster file: {directory}/cluster.toml" in out.stdout
        st = directory.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
        assert (directory / "service-ca.pem").exists()
        again = _cli("cluster", "--prefix", prefix)
        assert again.returncode == 2 and "already holds a cluster" in again.stderr
        assert _cli("cluster", "--variant", "vm").returncode == 2  # needs a --dir
    finally:
        down = _cli("down", "--prefix", prefix)
    assert down.returncode == 0
    assert not directory.exists() and not directory.parent.exists()


def test_cli_with_two_steering_nodes_writes_a_cluster_that_runs() -> None:
    """`lab up --steering 2` then `lab cluster`: the printed commands (an etcd member,
    two steering daemons, two agents) start a cluster whose status is all up."""
    prefix = unique_prefix()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        assert _cli("up", "--prefix", prefix, "--steering", "2").returncode == 0
        assert "steer2" in Lab.existing(prefix).plan.steers
        out = _cli("cluster", "--prefix", prefix, "--json")
        assert out.returncode == 0, out.stderr
        made = json.loads(out.stdout)
        commands = made["commands"]
        assert "etcd" in commands[0] and sum("steer run" in c for c in commands) == 2
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        for command in commands:
            procs.append(
                subprocess.Popen(
                    shlex.split(command),
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        status = [sys.executable, "-m", "pysteer", "status", "--json", "--config", made["config"]]
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(status, capture_output=True, text=True, check=False)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out.returncode == 0, out.stdout + out.stderr
        steers = json.loads(out.stdout)["steers"]
        assert set(steers) == {"steer", "steer2"} and all(s["reachable"] for s in steers.values())
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        _cli("down", "--prefix", prefix)
