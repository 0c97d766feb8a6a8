"""Migrations that fail: each one rolls back (or never freezes), the client notices nothing,
and the flow is still served by A, and still movable. Then security and bad CLI input.

The failures are real: an agent stopped or killed, a firewall drop, a VIP missing on B,
the steering daemon stopped. Some cannot be timed from outside, so B's agent runs with a
fault injected at a step of its migration machine (tests/helpers/agent_with_fault.py; the
product has no hook): ``open:exit`` (dies on receiving the move), ``thaw:exit`` (dies
holding the restored frozen socket) and ``restore:stall``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.blobs import blob
from helpers.cluster import HELPERS, Cluster, Session, check_ticker_stream, running_cluster
from helpers.migration import RstCapture
from helpers.peer import answer_of, ask, peer_connect

from pysteer.agent.control import Stream
from pysteer.certs import CertificateAuthority
from pysteer.lab.cluster import AGENT_PORT
from pysteer.rpc import VERSION
from pysteer.rpc.codec import encode, hello
from pysteer.transfer import new_migration_id, seal


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


class Client:
    """A Python ssl client on the TLS ticker, with its key log (to look for leaks)."""

    def __init__(self, cluster: Cluster, keylog: Path) -> None:
        self.cluster = cluster
        before = {f["flow"] for f in cluster.flows()}
        argv = [
            sys.executable,
            str(HELPERS / "line_client.py"),
            str(cluster.lab.plan.vip(4)),
            "443",
            "--tls",
            str(cluster.client_ca),
        ]
        os.environ["SSLKEYLOGFILE"] = str(keylog)
        try:
            self.session = Session(cluster.lab, argv)
        finally:
            del os.environ["SSLKEYLOGFILE"]
        self.session.wait_for("ticker ready")
        self.flow = cluster.wait_new_flow(before, 443)["flow"]
        self.session.start_writing()
        # A freeze longer than the client's RTO (200 ms at least) makes it retransmit into
        # the parked queue: TCPTimeouts counts that, and nothing is lost.
        self.frozen_long = False

    def check_served_by(self, node: str) -> None:
        assert self.cluster.owner(self.flow) == node
        # With the daemon down there is no table to read (the kernel still steers).
        row = self.cluster.steer_row(self.flow) if "steer" in self.cluster.procs else None
        if node == "a":
            assert row is None or (row["action"] in ("PASS", "TO") and row["host"] in (None, "a"))
        else:
            assert row is not None and row["action"] == "TO" and row["host"] == node
        echoes = self.session.text().count("\necho ")
        time.sleep(0.3)
        assert self.session.text().count("\necho ") > echoes, "the flow is not served"

    def end(self) -> None:
        self.session.stop_writing()
        self.session.drain()
        text = self.session.finish()
        check_ticker_stream(text, self.session.sent)


@pytest.fixture
def client(cluster: Cluster, tmp_path: Path) -> Iterator[Client]:
    capture = RstCapture(cluster.lab, "client", "to-steer")
    before = cluster.client_counters()
    with capture:
        c = Client(cluster, tmp_path / "keylog")
        yield c
        c.session.stop_writing()
        c.session.drain()
    c.end()
    after = cluster.client_counters()
    assert capture.count == 0, capture.lines
    if not c.frozen_long:
        assert after["TCPTimeouts"] == before["TCPTimeouts"]
    assert after["ActiveOpens"] - before["ActiveOpens"] == 1


def rolled_back(cluster: Cluster, client: Client, outcome: str, error: str, *extra: str) -> None:
    report = cluster.migrate(client.flow, "b", *extra)
    assert report["exit"] == 1
    assert report["outcome"] == outcome, report
    assert re.search(error, report["error"]), report["error"]
    steps = [s["step"] for s in report["timeline"]]
    if outcome == "rolled-back":
        assert "frozen" in steps and steps[-2:] == ["resumed", "unparked"], steps
    else:
        assert "frozen" not in steps, steps
    client.check_served_by("a")


def moves_again(cluster: Cluster, client: Client) -> None:
    for node in ("b", "a"):
        report = cluster.migrate(client.flow, node)
        assert report["outcome"] == "moved", report
    client.check_served_by("a")


def test_target_unreachable(cluster: Cluster, client: Client) -> None:
    drop = ["nft", "-f", "-"]
    rules = (
        f"table inet pysteer_t {{\n chain guard {{\n"
        f"  type filter hook input priority 0;\n  tcp dport {AGENT_PORT} drop\n }}\n}}\n"
    )
    cluster.lab.run("b", drop, input=rules)  # A's open link to B goes silent too
    try:
        rolled_back(
            cluster, client, "failed", r"node b is unreachable.*no answer", "--timeout", "1"
        )
    finally:
        cluster.lab.run("b", ["nft", "delete", "table", "inet", "pysteer_t"])
    moves_again(cluster, client)


def test_target_cordoned(cluster: Cluster, client: Client) -> None:
    out = cluster.cli("agent", "cordon", "b")
    assert out.returncode == 0, out.stderr
    try:
        rolled_back(cluster, client, "failed", "refuses imports")
    finally:
        assert cluster.cli("agent", "uncordon", "b").returncode == 0
    moves_again(cluster, client)


def test_restore_fails_on_target(cluster: Cluster, client: Client) -> None:
    vip = f"{cluster.lab.plan.vip(4)}/32"
    cluster.lab.run("b", ["ip", "addr", "del", vip, "dev", "lo"])
    try:
        rolled_back(cluster, client, "rolled-back", "restore failed on b.*not configured")
    finally:
        cluster.lab.run("b", ["ip", "addr", "add", vip, "dev", "lo"])
    moves_again(cluster, client)


@pytest.mark.parametrize("fault", ["open:exit", "thaw:exit"])
def test_target_dies_mid_import(cluster: Cluster, client: Client, fault: str) -> None:
    cluster.stop("b")
    cluster.start_agent("b", fault=fault)
    try:
        rolled_back(cluster, client, "rolled-back", "node b: .*connection lost")
        assert cluster.procs["b"].wait(10) != 0
    finally:
        cluster.stop("b")
        cluster.start_agent("b")
    moves_again(cluster, client)


def test_timeout(cluster: Cluster, client: Client) -> None:
    cluster.stop("b")
    cluster.start_agent("b", fault="restore:stall")
    client.frozen_long = True  # frozen for the whole 1 s timeout
    try:
        rolled_back(cluster, client, "rolled-back", "no answer within", "--timeout", "1")
    finally:
        cluster.stop("b")
        cluster.start_agent("b")
    moves_again(cluster, client)


def test_steering_unreachable(cluster: Cluster, client: Client) -> None:
    cluster.stop("steer")
    try:
        rolled_back(cluster, client, "failed", "steering node.*nothing was frozen")
    finally:
        cluster.start_steer()  # the pinned maps kept steering meanwhile
    moves_again(cluster, client)


# --- security ---------------------------------------------------------------------------
def test_foreign_certificate_refused(cluster: Cluster, tmp_path: Path) -> None:
    rogue = CertificateAuthority("rogue CA")
    issued = rogue.issue("a", names=["a"], usage="node")
    (tmp_path / "a.pem").write_bytes(issued.chain_pem)
    (tmp_path / "a.key").write_bytes(issued.key_pem)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        peer_connect(cluster, "a", tmp_path / "a.pem", tmp_path / "a.key", cluster.dir / "ca.pem")
    time.sleep(0.2)
    assert re.search(r"refused a peer connection from \S+: .*CERTIFICATE", cluster.log("b")), (
        cluster.log("b")[-2000:]
    )
    # The cluster's own certificate gets through (the refusal above is about the CA).
    d = cluster.dir
    sock = peer_connect(cluster, "a", d / "a.pem", d / "a.key", d / "ca.pem")
    with sock:
        assert ask(sock, {"op": "hello"})["node"] == "b"


def test_replayed_and_tampered_blobs_refused(cluster: Cluster) -> None:
    key = (cluster.dir / "cluster.key").read_bytes()
    vip = cluster.lab.plan.vip(4)
    mid = new_migration_id()
    sealed = seal(blob(mid, flow=f"10.77.1.2:40000-{vip}:9999"), key, source="a", target="b")
    d = cluster.dir
    sock = peer_connect(cluster, "a", d / "a.pem", d / "a.key", d / "ca.pem")
    with sock:
        first = ask(sock, {"op": "move", "id": mid, "blob": sealed})
        assert first == {"ok": False, "error": "port 9999 is not served here"}
        again = ask(sock, {"op": "move", "id": mid, "blob": sealed})
        assert not again["ok"] and "already imported (replay?)" in again["error"]
        tampered = bytearray(seal(blob(new_migration_id()), key, source="a", target="b"))
        tampered[-5] ^= 1
        answer = ask(sock, {"op": "move", "id": bytes(tampered[5:21]), "blob": bytes(tampered)})
        assert not answer["ok"] and "failed authentication" in answer["error"]
        other = new_migration_id()
        answer = ask(sock, {"op": "move", "id": other, "blob": sealed})
        assert not answer["ok"] and "another migration" in answer["error"]
    log = cluster.log("b")
    assert "already imported" in log and "failed authentication" in log


def test_blob_for_another_node_refused(cluster: Cluster, client: Client) -> None:
    """A blob is bound to its move: b refuses one sealed for another target (c), and one
    delivered by a that b itself sealed; each refusal is logged, and a keeps the flow."""
    key = (cluster.dir / "cluster.key").read_bytes()
    for_c, by_b = new_migration_id(), new_migration_id()
    blobs = {
        for_c: seal(blob(for_c, flow=client.flow), key, source="a", target="c"),
        by_b: seal(blob(by_b, flow=client.flow), key, source="b", target="b"),
    }
    d = cluster.dir
    sock = peer_connect(cluster, "a", d / "a.pem", d / "a.key", d / "ca.pem")
    with sock:
        answer = ask(sock, {"op": "move", "id": for_c, "blob": blobs[for_c]})
        assert answer == {"ok": False, "error": "the blob is sealed for c, not b"}
        answer = ask(sock, {"op": "move", "id": by_b, "blob": blobs[by_b]})
        assert answer == {"ok": False, "error": "the blob was sealed by b but delivered by a"}
    log = cluster.log("b")
    assert f"import {for_c.hex()[:12]} from a refused: the blob is sealed for c, not b" in log
    assert f"import {by_b.hex()[:12]} from a refused: the blob was sealed by b" in log
    client.check_served_by("a")


def test_control_socket_is_root_only(cluster: Cluster) -> None:
    path = Path(f"/run/pysteer/{cluster.lab.prefix}/agent-a.sock")
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    code = f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0 and "PermissionError" in out.stderr, out.stderr


def test_no_secret_in_logs(cluster: Cluster, client: Client, tmp_path: Path) -> None:
    """The client's TLS secrets (its key log) and the cluster key appear in no log line or
    CLI output, in hex or base64, after migrations both ways."""
    outputs = []
    for node in ("b", "a"):
        out = cluster.cli("migrate", "--flow", client.flow, "--to", node, "--json")
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout + out.stderr)
    outputs.append(cluster.cli("flows", "--json").stdout)
    outputs.append(cluster.cli("status", "--json").stdout)
    secrets = []
    for line in (tmp_path / "keylog").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            secrets.append(bytes.fromhex(parts[2]))
    assert len(secrets) >= 4  # handshake and traffic secrets, both ways
    secrets.append((cluster.dir / "cluster.key").read_bytes())
    text = "\n".join([*(cluster.log(n) for n in ("a", "b", "steer")), *outputs])
    for secret in secrets:
        for form in (secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()):
            assert form not in text
    assert json.loads(outputs[0])["outcome"] == "moved"


# --- bad CLI input: exit 2, a message naming the problem, nothing changed -----------------
def test_bad_cli_input(cluster: Cluster, client: Client) -> None:
    vip = cluster.lab.plan.vip(4)
    cases = [
        (["--flow", "10.77.1.2-443", "--to", "b"], "malformed flow"),
        (["--flow", client.flow, "--to", "c"], "unknown node 'c' (nodes: a, b)"),
        (["--flow", f"10.77.1.2:1-{vip}:443", "--to", "b"], "not found on any node"),
        (["--flow", client.flow, "--to", "a"], f"flow {client.flow} is already on a"),
        (["--flow", client.flow, "--to", "b", "--timeout", "0"], "--timeout must be"),
    ]
    for args, message in cases:
        out = cluster.cli("migrate", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert out.stdout == ""
    env = {k: v for k, v in os.environ.items() if k != "PYSTEER_CONFIG"}
    for extra, message in (
        ([], "give --config or set PYSTEER_CONFIG"),
        (["--config", "/nonexistent.toml"], "cannot read"),
    ):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pysteer",
                "migrate",
                "--flow",
                client.flow,
                "--to",
                "b",
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr
    cluster.stop("b")
    try:
        out = cluster.cli("migrate", "--flow", client.flow, "--to", "b")
        assert out.returncode == 3 and "node b is down" in out.stderr, out.stderr
        flows = cluster.cli("flows", "--node", "b")
        assert flows.returncode == 3 and "node b is down" in flows.stderr
        status = cluster.cli("status")
        assert status.returncode == 3 and "node b: DOWN" in status.stdout
        assert "PROBLEM: node b is down (" in status.stdout
    finally:
        cluster.start_agent("b")
    client.check_served_by("a")
    for line in cluster.log("a").splitlines():
        assert "migration" not in line or client.flow not in line, line  # none was attempted


def test_flows_and_status(cluster: Cluster, client: Client) -> None:
    out = cluster.cli("flows")
    assert out.returncode == 0
    row = next(ln for ln in out.stdout.splitlines() if client.flow in ln)
    assert row.split()[:4] == ["a", client.flow, "TLS", "TLSv1.3"]
    assert row.split()[4] in ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
    assert row.split()[-1] == "ticker"
    status = json.loads(cluster.cli("status", "--json").stdout)
    assert status["nodes"]["a"]["up"] and status["nodes"]["b"]["up"]
    assert status["steer"]["reachable"]
    assert all(c["days_left"] > 300 for c in status["certificates"].values())


def test_cli_reaches_a_remote_agent_over_mtls(cluster: Cluster, client: Client) -> None:
    """Without b's local socket (b on another machine), the CLI asks b's agent over its
    mutual-TLS listener with a node certificate of this machine; migrate works both ways."""
    sock = Path(f"/run/pysteer/{cluster.lab.prefix}/agent-b.sock")
    hidden = sock.with_name("agent-b.sock.hidden")

    def on_a(*args: str) -> subprocess.CompletedProcess[str]:  # an operator on host a
        argv = [sys.executable, "-m", "pysteer", *args, "--config", str(cluster.config)]
        return cluster.lab.run("a", argv, check=False)

    sock.rename(hidden)
    try:
        flows = on_a("flows", "--node", "b", "--json")
        assert flows.returncode == 0, flows.stderr
        for node in ("b", "a"):
            out = on_a("migrate", "--flow", client.flow, "--to", node, "--json")
            assert out.returncode == 0, out.stdout + out.stderr
            assert json.loads(out.stdout)["outcome"] == "moved"
        status = json.loads(on_a("status", "--json").stdout)
        assert status["nodes"]["b"]["up"] and status["nodes"]["b"]["pid"] > 0
    finally:
        hidden.rename(sock)
    assert "remote migrate from a" in cluster.log("b")  # b -> a was asked over mTLS
    client.check_served_by("a")


# --- bad requests to an agent: an answer, never a traceback ---------------------------------
def _local(cluster: Cluster, node: str, request: dict | bytes) -> dict:
    """One request (a map, or a frame as it is) on ``node``'s local control socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(f"/run/pysteer/{cluster.lab.prefix}/agent-{node}.sock")
        sock.sendall(encode(hello()))
        assert answer_of(sock) == {"ok": True, "rpc": "hello", "version": VERSION}
        return ask(sock, request) if isinstance(request, dict) else ask_raw(sock, request)


def ask_raw(sock: socket.socket, frame: bytes) -> dict:
    sock.sendall(frame)
    return answer_of(sock)


def framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_bad_requests_to_an_agent(cluster: Cluster) -> None:
    """Requests of the wrong shape, on the local socket and over mutual TLS, each get a
    clear refusal; the agent keeps serving, and its log holds no traceback. A drain leaves
    none either (its stop watcher is awaited before the next request is read)."""
    local: list[tuple[dict | bytes, str]] = [
        ({"cmd": "drain", "to": ["b"]}, "cannot drain a to ['b']"),
        ({"cmd": "drain", "to": "b", "batch": True}, "batch must be 1..4096"),
        ({"cmd": ["flows"]}, "cmd must be a string"),
        (
            {"cmd": "migrate", "flow": "10.77.1.2:1-10.77.100.1:443", "to": ["b"]},
            "to must be a node name",
        ),
        (
            {"cmd": "migrate", "flow": "10.77.1.2:1-10.77.100.1:" + "9" * 5000},
            "malformed flow",
        ),
        ({"cmd": "resolve", "id": ["x"], "keep": "source"}, "id must be a migration id"),
        ({"cmd": "status", "pad": "x" * 100_000}, "bytes is over the 65536-byte limit"),
        (framed(b"\x81\xa3cmd" + b"\x91" * 5000 + b"\x00"), "the peer sent invalid msgpack"),
        (framed(b"\x81\xa3cmd" + b"\x91" * 500 + b"\x00"), "a frame nests at most 32"),
        (framed(b"\xff\xfe"), "the peer sent invalid msgpack"),
        (framed(b"\x81\xa3cmd\xa2\xff\xfe"), "a frame's strings must be UTF-8"),
    ]
    for request, message in local:
        answer = _local(cluster, "a", request)
        assert answer["ok"] is False and message in answer["error"], (str(request)[:60], answer)
    d = cluster.dir
    sock = peer_connect(cluster, "a", d / "a.pem", d / "a.key", d / "ca.pem")
    with sock:
        for request, message in [
            ({"op": [1]}, "op must be a string"),
            ({"op": {"x": 1}}, "op must be a string"),
            ({"op": "control", "request": {"cmd": "drain", "to": ["b"]}}, "remote commands"),
            ({"op": "control", "request": ["flows"]}, "remote commands"),
            ({"op": "move", "id": "not bytes"}, "needs a 16-byte migration id"),
            ({"op": "nonsense", "id": bytes(16)}, "unknown op 'nonsense'"),
            ({"op": "batch"}, "requests must be a list of 1..256"),
            ({"op": "batch", "requests": []}, "requests must be a list of 1..256"),
            ({"op": "batch", "requests": [{"op": "outcome", "id": bytes(16)}] * 257}, "1..256"),
        ]:
            answer = ask(sock, request)
            assert answer["ok"] is False and message in answer["error"], (request, answer)
        # A batch answers each request on its own: a bad one never fails the others.
        mixed = [
            {"op": "outcome", "id": bytes(16)},
            {"op": "batch", "requests": [{"op": "hello"}]},
            {"op": "control", "request": {"cmd": "flows"}},
            "not a map",
            {"op": "move", "id": bytes(16), "blob": b"garbage"},
            {"op": "move", "id": b"short"},
        ]
        answers = ask(sock, {"op": "batch", "requests": mixed})["answers"]
        assert answers[0] == {"ok": True, "outcome": None}
        assert all(a["ok"] is False for a in answers[1:]), answers
        assert "a batch holds only move and outcome" in answers[1]["error"]
        assert "a batch holds only move and outcome" in answers[2]["error"]
        assert "a batch holds only move and outcome" in answers[3]["error"]
        assert answers[4]["error"] == "sealed blob too short", answers[4]
        assert "needs a 16-byte migration id" in answers[5]["error"]
        assert ask(sock, {"op": "hello"})["node"] == "b"  # the same link still serves
    stream = Stream(
        Path(f"/run/pysteer/{cluster.lab.prefix}/agent-a.sock"),
        "drain",
        to="b",
        batch=8,
        timeout_s=5,
    )
    try:
        while "progress" in stream.next():
            pass
    finally:
        stream.close()
    assert _local(cluster, "a", {"cmd": "undrain"})["ok"]
    time.sleep(0.3)
    for node in ("a", "b"):
        log = cluster.log(node)
        assert "Traceback" not in log and "readuntil" not in log, log[-3000:]
    assert _local(cluster, "a", {"cmd": "flows"})["ok"]
