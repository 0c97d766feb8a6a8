"""The steering daemon and its CLI: control, restart without losing steering, bad input."""

import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.migration import listen
from helpers.steerd import PYSTEER, DaemonProc, cli

from pysteer.lab import Lab
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.paths import RUN_DIR
from pysteer.steer import pins
from pysteer.steer.control import ControlError, request, socket_path
from pysteer.steer.pins import PIN_ROOT

PORT = 8100


@pytest.fixture
def daemon(lab: Lab) -> Iterator[DaemonProc]:
    d = DaemonProc(lab, unique_prefix())
    d.start()
    yield d
    d.stop()
    pins.remove(d.name)


def exchange(client: socket.socket, server: socket.socket, data: bytes) -> None:
    client.sendall(data)
    got = b""
    while len(got) < len(data):
        got += server.recv(65536)
    assert got == data


def test_restart_keeps_steering(lab: Lab, daemon: DaemonProc) -> None:
    vip = str(lab.plan.vip_v4)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)

    def make() -> socket.socket:
        s = socket.socket()
        s.bind((str(lab.plan.address("client")), 42000))
        s.settimeout(10)
        return s

    client = lab.call("client", make)
    flow = f"{lab.plan.address('client')}:42000-{vip}:{PORT}"
    out = cli(daemon.name, "to", flow, "b")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{flow} -> b (0 parked packets replayed)"
    client.connect((vip, PORT))
    on_b.settimeout(5)
    server, _ = on_b.accept()
    exchange(client, server, b"before the crash")
    daemon.kill()
    exchange(client, server, b"while no daemon runs" * 1000)  # pinned maps keep steering
    daemon.start()
    exchange(client, server, b"after the restart")
    rows = json.loads(cli(daemon.name, "flows", "--json").stdout)["flows"]
    assert [(r["flow"], r["action"], r["host"]) for r in rows] == [(flow, "TO", "b")]
    assert rows[0]["packets"]["to"] >= 6
    human = cli(daemon.name, "flows").stdout.splitlines()
    assert human[1].startswith(flow) and " TO " in human[1]
    stats = json.loads(cli(daemon.name, "stats", "--json").stdout)["stats"]
    assert stats["redirected"] >= rows[0]["packets"]["to"]
    hosts = json.loads(cli(daemon.name, "hosts", "--json").stdout)["hosts"]
    assert [h["name"] for h in hosts] == ["a", "b"]
    text = cli(daemon.name, "hosts").stdout.splitlines()
    assert [line.split()[:2] for line in text] == [["HOST", "ID"], ["a", "0"], ["b", "1"]]
    for s in (client, server, on_b):
        s.close()


def test_bad_input(lab: Lab, daemon: DaemonProc) -> None:
    vip = lab.plan.vip_v4
    flow = f"{lab.plan.address('client')}:42001-{vip}:{PORT}"
    cases = [
        (("to", "10.0.0.1:80", "b"), "malformed flow '10.0.0.1:80'"),
        (("to", flow, "c"), "unknown host 'c' (known: a, b)"),
        (("pass", flow), f"flow {flow} is not in the table"),
    ]
    for args, message in cases:
        out = cli(daemon.name, *args)
        assert out.returncode == 2
        assert out.stderr.strip().startswith(f"pysteer: error: {message}")
    second = DaemonProc(lab, daemon.name)
    out = subprocess.run(second.argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert f"another steering daemon already runs instance '{daemon.name}'" in out.stderr
    insecure = subprocess.run(
        [*second.argv, "--listen", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert insecure.returncode == 2
    assert "--listen needs --tls-cert, --tls-key and --tls-ca (mutual TLS)" in insecure.stderr
    gone = cli("nosuchdaemon", "flows")
    assert gone.returncode == 3  # down: distinct from bad input
    assert "no steering daemon at /run/pysteer/steer-nosuchdaemon.sock" in gone.stderr


def test_full_flow_table_is_an_error(lab: Lab) -> None:
    d = DaemonProc(lab, unique_prefix(), "--max-flows", "2")
    d.start()
    try:
        base = f"{lab.plan.address('client')}"
        for port in (43001, 43002):
            assert cli(d.name, "park", f"{base}:{port}-{lab.plan.vip_v4}:80").returncode == 0
        out = cli(d.name, "park", f"{base}:43003-{lab.plan.vip_v4}:80")
        assert out.returncode == 2
        assert "flow table is full" in out.stderr
        rows = json.loads(cli(d.name, "flows", "--json").stdout)["flows"]
        assert len(rows) == 2
    finally:
        d.stop()
        pins.remove(d.name)
    assert os.path.exists(PIN_ROOT)


def test_remote_control_needs_a_client_certificate(lab: Lab, tmp_path) -> None:
    """The optional TCP listener speaks only to agents with a certificate from the CA
    (identities beyond that: tests/integration/test_identity.py)."""
    from pysteer.certs import CertificateAuthority  # noqa: PLC0415
    from pysteer.identity import client_context  # noqa: PLC0415
    from pysteer.steer.control import ControlError, request_remote  # noqa: PLC0415

    ca, other = CertificateAuthority(), CertificateAuthority("another CA")
    node = ca.issue("steer", names=["steer", "127.0.0.1"], usage="node")
    agent, stranger = ca.issue("a", usage="node"), other.issue("a", usage="node")
    files = {}
    for name, pem in (
        ("ca", ca.cert_pem),
        ("node", node.chain_pem),
        ("node.key", node.key_pem),
        ("agent", agent.cert_pem),
        ("agent.key", agent.key_pem),
        ("stranger", stranger.cert_pem),
        ("stranger.key", stranger.key_pem),
    ):
        files[name] = tmp_path / name
        files[name].write_bytes(pem)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = DaemonProc(
        lab,
        unique_prefix(),
        "--listen",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(files["node"]),
        "--tls-key",
        str(files["node.key"]),
        "--tls-ca",
        str(files["ca"]),
    )
    d.start()
    try:
        good = client_context(files["agent"], files["agent.key"], files["ca"])
        # The listener lives in the steering node's namespace, next to its interfaces.
        answer = lab.call("steer", request_remote, ("127.0.0.1", port), good, "steer", "hosts")
        assert [h["name"] for h in answer["hosts"]] == ["a", "b"]
        bad = client_context(files["stranger"], files["stranger.key"], files["ca"])
        anonymous = ssl.create_default_context(cafile=str(files["ca"]))
        for ctx in (bad, anonymous):
            with pytest.raises(ControlError) as info:
                lab.call("steer", request_remote, ("127.0.0.1", port), ctx, "steer", "hosts")
            assert "Connection refused" not in str(info.value)  # refused by TLS, not absent
    finally:
        d.stop()
        pins.remove(d.name)


def test_cli_park_then_to_replays_the_syn(lab: Lab, daemon: DaemonProc) -> None:
    """Park a flow before it starts: its SYN waits at the steering node, and `to b`
    replays it to b, where the connection is then established."""
    vip = str(lab.plan.vip_v4)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
    flow = f"{lab.plan.address('client')}:42100-{vip}:{PORT}"
    assert cli(daemon.name, "park", flow).returncode == 0

    def make() -> socket.socket:
        s = socket.socket()
        s.bind((str(lab.plan.address("client")), 42100))
        s.setblocking(False)
        return s

    client = lab.call("client", make)
    with contextlib.suppress(BlockingIOError):
        client.connect((vip, PORT))  # the SYN is parked
    deadline = time.monotonic() + 5
    while not json.loads(cli(daemon.name, "flows", "--json").stdout)["flows"][0]["parked"]:
        assert time.monotonic() < deadline, "the SYN was never parked"
        time.sleep(0.05)
    out = cli(daemon.name, "to", flow, "b", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["replayed"] >= 1
    on_b.settimeout(5)
    server, _ = on_b.accept()
    client.setblocking(True)
    client.settimeout(5)
    exchange(client, server, b"established through the replayed SYN")
    row = json.loads(cli(daemon.name, "flows", "--json").stdout)["flows"][0]
    assert row["parked"] == row["replayed"] >= 1
    assert (row["park_dropped"], row["park_lost"]) == (0, 0)
    for s in (client, server, on_b):
        s.close()


def test_hosts_by_address(lab: Lab) -> None:
    """--host NAME=ADDRESS: the daemon finds the link and the MAC (ARP) itself."""
    name = unique_prefix()
    d = DaemonProc(lab, name)
    first = d.argv.index("--host")
    d.argv[first : first + 4] = [
        "--host",
        f"a={lab.plan.address('a')}",
        "--host",
        f"b={lab.plan.address('b')}",
    ]
    d.start()
    try:
        hosts = json.loads(cli(name, "hosts", "--json").stdout)["hosts"]
        assert [(h["name"], h["ifname"], h["mac"]) for h in hosts] == [
            ("a", "to-a", lab.mac("a", "to-steer")),
            ("b", "to-b", lab.mac("b", "to-steer")),
        ]
    finally:
        d.stop()
        pins.remove(name)
    bad = subprocess.run(
        [
            *PYSTEER,
            "steer",
            "run",
            "--name",
            unique_prefix(),
            "--ifname",
            "to-client",
            "--netns",
            lab.netns("steer"),
            "--host",
            "a=to-a",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "NAME=IFNAME,MAC or NAME=ADDRESS" in bad.stderr


def test_a_batch_is_answered_request_by_request(lab: Lab, daemon: DaemonProc) -> None:
    """A drain's requests in one round trip: each answered as if alone, in order; a
    refusal stays with its own request; what a batch may not hold is refused in place."""
    vip = lab.plan.vip_v4
    flows = [f"{lab.plan.address('client')}:{42100 + i}-{vip}:{PORT}" for i in range(3)]
    parks = [{"cmd": "park", "flow": f, "token": 7000 + i, "lease": 5} for i, f in enumerate(flows)]
    path = socket_path(daemon.name)
    answer = request(path, "batch", requests=[*parks, parks[0] | {"token": 9999}, {"cmd": "gc"}])
    got = answer["answers"]
    assert [a["ok"] for a in got] == [True, True, True, False, False], got
    assert got[3]["code"] == "conflict" and "being moved by migration" in got[3]["error"]
    assert got[4]["error"] == "a batch holds only park, revert, claim, decision"
    rows = {r["flow"]: r for r in daemon.rows()}
    assert all(rows[f]["action"] == "PARK" for f in flows)
    claims = [
        {"cmd": "claim", "flow": flows[0], "host": "b", "token": 7000},
        {"cmd": "revert", "flow": flows[1], "token": 7001, "host": "a"},
        {"cmd": "decision", "flow": flows[2], "token": 7002},
        {"cmd": "claim", "flow": flows[1], "host": "b", "token": 7001},
    ]
    got = request(path, "batch", requests=claims)["answers"]
    assert got[0]["ok"] and isinstance(got[0]["parked_ms"], float) and got[0]["parked_ms"] > 0
    assert got[1]["ok"] and got[2] == {"ok": True, "decision": "pending", "host": None}
    assert not got[3]["ok"] and got[3]["code"] == "aborted"  # reverted first: the claim loses
    rows = {r["flow"]: r for r in daemon.rows()}
    assert rows[flows[0]]["action"] == "TO" and rows[flows[0]]["host"] == "b"
    for bad in ([], "x", [{"cmd": "park"}] * 257):
        with pytest.raises(ControlError, match=r"requests must be a list of 1\.\.256"):
            request(path, "batch", requests=bad)
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_stopped_daemon_leaves_no_lock_behind(lab: Lab) -> None:
    """The lock holds the daemon's pid while it runs and goes with it: /run keeps no file
    per instance ever run (a test suite's hundreds of instances left hundreds)."""

    def lock_path(name: str) -> Path:
        return RUN_DIR / f"steer-{name}.lock"

    d = DaemonProc(lab, unique_prefix())
    try:
        d.start()
        assert d.proc is not None
        assert lock_path(d.name).read_text().strip() == str(d.proc.pid)
        d.stop()
        assert not lock_path(d.name).exists()
        d.start()  # and it starts again
        assert lock_path(d.name).read_text().strip() == str(d.proc.pid)
    finally:
        d.stop()
        pins.remove(d.name)
    assert not lock_path(d.name).exists()


def test_every_change_is_logged_with_who_asked(lab: Lab, daemon: DaemonProc) -> None:
    """park, to, pass, forget and divert leave an info line each: the flow (or address),
    what was done, and who asked (here the local control socket; an agent by name)."""
    vip = str(lab.plan.vip_v4)
    flow = f"{lab.plan.address('client')}:42999-{vip}:{PORT}"
    for args in (("park", flow), ("to", flow, "b"), ("pass", flow), ("forget", flow)):
        out = cli(daemon.name, *args)
        assert out.returncode == 0, out.stderr
    assert cli(daemon.name, "divert", vip, "b").returncode == 0
    assert cli(daemon.name, "divert", vip, "--clear").returncode == 0
    asked = "asked by the local control socket"
    for line in (
        f"INFO park {flow}, {asked}",
        f"INFO to {flow} to b, {asked}",
        f"INFO pass {flow}, {asked}",
        f"INFO forget {flow}, {asked}",
        f"INFO divert new connections to {vip} to b, {asked}",
        f"INFO divert new connections to {vip} back to its route, {asked}",
    ):
        daemon.wait_for(line, 5)
