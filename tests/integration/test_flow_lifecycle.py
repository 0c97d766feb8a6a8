"""The steering table does not only grow: an entry ends with its connection, a stale one
never captures a new connection, idle ones are collected, a full table is an error the
operator sees, and a daemon that fails to start changes nothing that runs.

These run the real steering daemon on the lab with plain sockets on the hosts; the tests
with agents (moves, drains) are in test_lifecycle_cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from helpers.migration import listen
from helpers.steerd import PYSTEER, DaemonProc
from helpers.waiting import wait_until

from pysteer import tcp
from pysteer.lab import Lab
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.steer import pins

PORT = 8200


@pytest.fixture
def steerd(lab: Lab) -> Iterator[DaemonProc]:
    d = DaemonProc(lab, unique_prefix(), "--gc-interval", "0.2", "--idle-timeout", "2")
    d.start()
    yield d
    d.stop()
    pins.remove(d.name)


def client_on(lab: Lab, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((str(lab.plan.address("client")), port))
        s.settimeout(5)
        return s

    return lab.call("client", make)


def flow_of(lab: Lab, port: int) -> str:
    return f"{lab.plan.address('client')}:{port}-{lab.plan.vip_v4}:{PORT}"


def exchange(a: socket.socket, b: socket.socket, data: bytes) -> None:
    a.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = b.recv(65536)
        assert chunk, "closed"
        got += chunk
    assert got == data


def entries(d: DaemonProc) -> dict[str, dict]:
    return {r["flow"]: r for r in d.rows()}


def linger0(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize(
    "how", ["client-closes", "service-closes", "client-resets", "service-resets"]
)
def test_an_entry_ends_with_its_connection(lab: Lab, steerd: DaemonProc, how: str) -> None:
    """TO(b) from the first SYN; the entry goes at the last ACK after both FINs (whichever
    side closes first) or at a RST, and the counters say which."""
    vip = str(lab.plan.vip_v4)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
    on_b.settimeout(5)
    port = 44000 + ["client-closes", "service-closes", "client-resets", "service-resets"].index(how)
    flow = flow_of(lab, port)
    assert steerd.cli("to", flow, "b").returncode == 0
    client = client_on(lab, port)
    client.connect((vip, PORT))
    server, _ = on_b.accept()
    exchange(client, server, b"to b and back" * 100)
    exchange(server, client, b"and back" * 100)
    before = steerd.stats()
    assert entries(steerd)[flow]["action"] == "TO"
    if how == "client-closes":
        client.shutdown(socket.SHUT_WR)
        assert server.recv(10) == b""
        server.close()
        assert client.recv(10) == b""
    elif how == "service-closes":
        server.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""
        client.close()
        assert server.recv(10) == b""
    elif how == "client-resets":
        linger0(client)
    else:
        linger0(server)
    if how.endswith("resets"):
        (client if how == "client-resets" else server).close()
    wait_until(lambda: flow not in entries(steerd), 3, f"the entry of {flow} to go")
    after = steerd.stats()
    key = "closed_rst" if how.endswith("resets") else "closed_fin"
    assert after[key] == before[key] + 1, json.dumps([before, after])
    for s in (client, server, on_b):
        s.close()


def vanish(sock: socket.socket) -> None:
    """End a connection without a FIN or RST (as if its host froze and never came back)."""
    tcp.dump(sock)
    tcp.release(sock)


def test_a_new_syn_replaces_a_stale_entry(lab: Lab, steerd: DaemonProc) -> None:
    """An entry whose connection ended unseen (no FIN, no RST) says TO(b). b serves nothing
    there any more. A new connection from the same source port must reach the default host
    (a), not b: its SYN, with a new sequence number, replaces the stale entry."""
    vip = str(lab.plan.vip_v4)
    on_a = lab.call("a", listen, socket.AF_INET, vip, PORT)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
    on_a.settimeout(5)
    on_b.settimeout(5)
    port = 44100
    flow = flow_of(lab, port)
    assert steerd.cli("to", flow, "b").returncode == 0
    client = client_on(lab, port)
    client.connect((vip, PORT))
    server, _ = on_b.accept()
    exchange(client, server, b"the old connection")
    lab.call("client", vanish, client)
    lab.call("b", vanish, server)
    on_b.close()  # b's service is gone too (its agent stopped)
    assert entries(steerd)[flow]["action"] == "TO"  # stale: nothing saw it end
    stale = steerd.stats()["stale_syn"]
    again = client_on(lab, port)
    again.connect((vip, PORT))
    fresh, _ = on_a.accept()
    exchange(again, fresh, b"a new connection on the same 4-tuple reaches a")
    assert steerd.stats()["stale_syn"] == stale + 1
    assert flow not in entries(steerd)  # routed by default: it needs no entry
    for s in (again, fresh, on_a):
        s.close()


def test_a_retransmitted_syn_keeps_its_entry(lab: Lab, steerd: DaemonProc) -> None:
    """The entry a diverted SYN created is not mistaken for a stale one when that SYN is
    sent again (the SYN-ACK was lost): same sequence number, same entry, same host."""
    vip = str(lab.plan.vip_v4)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
    on_b.settimeout(5)
    assert steerd.cli("divert", vip, "b").returncode == 0
    drop = (
        "table inet pt {\n chain o {\n  type filter hook output priority 0;\n"
        "  tcp flags & (syn | ack) == syn | ack drop\n }\n}\n"
    )
    lab.run("b", ["nft", "-f", "-"], input=drop)  # b's first SYN-ACKs are lost
    client = client_on(lab, 44200)
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        client.connect((vip, PORT))
    time.sleep(1.5)  # the client sends its SYN again after 1 s
    lab.run("b", ["nft", "delete", "table", "inet", "pt"])
    client.setblocking(True)
    client.settimeout(10)
    server, _ = on_b.accept()
    exchange(client, server, b"established on b after a retransmitted SYN")
    assert steerd.stats()["stale_syn"] == 0
    assert entries(steerd)[flow_of(lab, 44200)]["host"] == "b"
    assert steerd.cli("divert", vip, "--clear").returncode == 0
    for s in (client, server, on_b):
        s.close()


def test_idle_entries_are_collected_and_gc_forget_work(lab: Lab) -> None:
    """Entries nobody uses go after the idle timeout (none is claimed: no agents run
    here); a flow with traffic stays; `steer gc --dry-run` lists without removing;
    `steer forget` removes one entry at once."""
    d = DaemonProc(lab, unique_prefix(), "--gc-interval", "3600", "--idle-timeout", "1.5")
    d.start()
    try:
        vip = str(lab.plan.vip_v4)
        on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
        on_b.settimeout(5)
        idle = [flow_of(lab, p) for p in (44301, 44302, 44303)]
        for flow in idle:
            assert d.cli("to", flow, "b").returncode == 0
        busy_flow = flow_of(lab, 44310)
        assert d.cli("to", busy_flow, "b").returncode == 0
        client = client_on(lab, 44310)
        client.connect((vip, PORT))
        server, _ = on_b.accept()
        busy = threading.Event()
        errors: list[BaseException] = []

        def keep_busy() -> None:  # traffic every 0.2 s: never idle for 1.5 s
            try:
                while not busy.wait(0.2):
                    exchange(client, server, b"busy")
            except BaseException as exc:
                errors.append(exc)

        talker = threading.Thread(target=keep_busy, daemon=True)
        talker.start()
        time.sleep(2.5)
        dry = d.cli("gc", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        listed = {r["flow"]: r["reason"] for r in json.loads(dry.stdout)["removed"]}
        assert listed == dict.fromkeys(idle, "idle")
        assert set(entries(d)) == {*idle, busy_flow}  # a dry run removes nothing
        forgot = d.cli("forget", idle[0])
        assert forgot.returncode == 0 and "forgotten" in forgot.stdout
        again = d.cli("forget", idle[0])
        assert again.returncode == 2 and "is not in the table" in again.stderr
        done = d.cli("gc")
        assert done.returncode == 0 and "removed 2 entries" in done.stdout, done.stdout
        assert set(entries(d)) == {busy_flow}
        busy.set()
        talker.join(5)
        assert errors == []
        exchange(client, server, b"the busy flow still goes to b")
        assert d.stats()["gc_idle"] == 2
        for s in (client, server, on_b):
            s.close()
    finally:
        d.stop()
        pins.remove(d.name)


def scrape(lab: Lab, port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    return lab.call("steer", get)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def test_a_full_table_is_an_error_the_operator_sees(lab: Lab) -> None:
    """With room for 2 flows: a third park is refused, logged, counted and exported; and a
    SYN that a drain would divert goes its usual way, counted, logged, exported."""
    d = DaemonProc(
        lab,
        unique_prefix(),
        "--max-flows",
        "2",
        "--gc-interval",
        "0.2",
        "--metrics",
        "127.0.0.1:9187",
    )
    d.start()
    try:
        vip = str(lab.plan.vip_v4)
        for port in (44401, 44402):
            assert d.cli("park", flow_of(lab, port)).returncode == 0
        out = d.cli("park", flow_of(lab, 44403))
        assert out.returncode == 2 and "flow table is full" in out.stderr
        wait_until(lambda: "flow table is full: cannot add" in d.log(), 2, "the log line")
        on_a = lab.call("a", listen, socket.AF_INET, vip, PORT)
        on_a.settimeout(5)
        assert d.cli("divert", vip, "b").returncode == 0
        client = client_on(lab, 44404)
        client.connect((vip, PORT))  # not diverted: no room; it goes to a
        server, _ = on_a.accept()
        exchange(client, server, b"not diverted, but not lost")
        stats = d.stats()
        assert (stats["table_full"], stats["divert_failed"]) == (1, 1), stats
        assert (stats["flows"], stats["capacity"]) == (2, 2)
        human = d.cli("stats").stdout
        assert "WARNING: the flow table (2 entries) was full" in human
        wait_until(lambda: "1 new connection(s) could not be diverted" in d.log(), 3, "log")
        text = scrape(lab, 9187)
        assert metric(text, "pysteer_steer_table_full_errors_total") == 1
        assert metric(text, "pysteer_steer_divert_failed_connections_total") == 1
        assert metric(text, "pysteer_steer_flow_capacity") == 2
        for s in (client, server, on_a):
            s.close()
    finally:
        d.stop()
        pins.remove(d.name)


def test_max_flows_must_match_the_pinned_table(lab: Lab) -> None:
    """A pinned table keeps its size: a different --max-flows is refused with a clear
    message and nothing changes; without --max-flows the pinned size is used."""
    d = DaemonProc(lab, unique_prefix())
    d.start("--max-flows", "8")
    try:
        flow = flow_of(lab, 44501)
        assert d.cli("to", flow, "b").returncode == 0
        d.stop()
        out = subprocess.run(
            [*d.argv, "--max-flows", "16"], capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 2
        assert "holds 8 flows, and --max-flows 16 differs" in out.stderr
        assert "nothing running was changed" in out.stderr
        d.start()
        assert d.stats()["capacity"] == 8
        assert entries(d)[flow]["host"] == "b"
    finally:
        d.stop()
        pins.remove(d.name)


def test_a_failed_start_leaves_steering_running(lab: Lab) -> None:
    """A live flow steered to b keeps going while daemons with a wrong host, interface, MAC
    or the steering node's own MAC fail to start; a restart with the hosts in another
    order keeps every host's id."""
    d = DaemonProc(lab, unique_prefix())
    d.start()
    vip = str(lab.plan.vip_v4)
    on_b = lab.call("b", listen, socket.AF_INET, vip, PORT)
    on_b.settimeout(5)
    flow = flow_of(lab, 44601)
    try:
        assert d.cli("to", flow, "b").returncode == 0
        client = client_on(lab, 44601)
        client.connect((vip, PORT))
        server, _ = on_b.accept()
        exchange(client, server, b"before")
        d.stop()
        own = lab.mac("steer", "to-b")
        base = d.argv[: d.argv.index("--host")]
        good = d.argv[d.argv.index("--host") :]
        bad = {
            "host": (["--host", "a=10.77.99.2", *good[2:]], "--host a: no route"),
            "ifname": (
                [*good, "--host", "c=to-nowhere,02:00:00:00:00:01"],
                "no interface 'to-nowhere'",
            ),
            "mac": (["--host", "a=to-a,zz:00:00:00:00:01", *good[2:]], "not a MAC address"),
            "own mac": (["--host", f"a=to-a,{own}", *good[2:]], "the steering node's own MAC"),
            "client link": (
                [*[x if x != "to-client" else "to-nowhere" for x in base[4:]]],
                "no interface",
            ),
        }
        for what, (args, message) in bad.items():
            argv = base + args if what != "client link" else [*base[:4], *args, *good]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            assert out.returncode == 2, (what, out.stderr)
            assert message in out.stderr, (what, out.stderr)
            assert "Traceback" not in out.stderr
            exchange(client, server, f"steering still runs after a bad {what}".encode())
        filters = lab.run("steer", ["tc", "filter", "show", "dev", "to-client", "ingress"])
        assert "pysteer_steer" in filters.stdout
        swapped = ["--host", good[3], "--host", good[1]]  # b first, then a
        d.argv = base + swapped
        d.start()
        assert entries(d)[flow]["host"] == "b"
        assert {
            h["name"]: h["id"] for h in json.loads(d.cli("hosts", "--json").stdout)["hosts"]
        } == {
            "a": 0,
            "b": 1,
        }
        exchange(client, server, b"and after the restart")
        for s in (client, server, on_b):
            s.close()
    finally:
        d.stop()
        pins.remove(d.name)


def test_lab_down_removes_pins_locks_and_daemon(lab_factory: Callable[..., Lab]) -> None:
    """What a lab's cluster leaves outside its namespaces goes with `pysteer lab down`."""
    lab = lab_factory()
    d = DaemonProc(lab, lab.prefix)
    d.start()
    run = lab.state_dir.parent
    ledger_dir = run / lab.prefix
    ledger_dir.mkdir(exist_ok=True)
    (ledger_dir / "ledger-a.log").write_text("")
    paths = [
        pins.PIN_ROOT / lab.prefix,
        run / f"steer-{lab.prefix}.lock",
        run / f"steer-{lab.prefix}.sock",
        ledger_dir,
    ]
    assert all(p.exists() for p in paths)
    out = subprocess.run(
        [*PYSTEER, "lab", "down", "--prefix", lab.prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert d.proc is not None and d.proc.wait(10) is not None
    assert [p for p in paths if p.exists()] == []
