"""Defects found on the migration path, each fixed and held to it: a snapshot B cannot
continue is refused before the freeze (not after the commit), an export error after the freeze
rolls back, a failed thaw sends nothing, an app that raises is logged and its connection
ended cleanly, and the agent's signals do what the docs say.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cluster import HELPERS, Cluster, Session, check_ticker_stream, running_cluster
from helpers.fleet import Fleet
from helpers.migration import RstCapture

from pysteer.lab.cluster import DEFAULT_SERVICES

BOOM, BOOM_TLS = 7100, 7443
SERVICES = DEFAULT_SERVICES | {
    BOOM: ("helpers.boom:Boom", False),
    BOOM_TLS: ("helpers.boom:Boom", True),
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(HELPERS.parent)  # the agents import helpers.boom
    try:
        with running_cluster(tmp_path_factory.mktemp("cluster"), services=SERVICES) as c:
            yield c
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def quiet(session: Session) -> None:
    """Stop sending and wait for every echo (still under an RST capture: ending the client
    comes after it, because a killed client answers the ticks still coming with a RST)."""
    session.stop_writing()
    session.drain()


def end(session: Session) -> None:
    quiet(session)
    check_ticker_stream(session.finish(), session.sent)


def restart_b(cluster: Cluster, **kw: object) -> None:
    cluster.stop("b")
    cluster.start_agent("b", **kw)  # type: ignore[arg-type]


def test_a_snapshot_b_cannot_continue_is_refused_before_the_freeze(cluster: Cluster) -> None:
    """b runs another app on port 443: its hello says so, and a refuses the move before it
    parks or freezes anything; the flow carries on at a; nothing is lost or served twice.
    (b's own check, inside the move, is tested in tests/unit/test_app_handlers.py.)"""
    other = cluster.dir / "cluster-b.toml"
    text = cluster.config.read_text()
    other.write_text(re.sub(r'(\[services\.443\]\napp = )"ticker"', r'\1"echo"', text))
    restart_b(cluster, config=other)
    session, flow = cluster.ticker()
    try:
        with RstCapture(cluster.lab, "client", "to-steer") as capture:
            report = cluster.migrate(flow, "b")
            assert report["outcome"] == "failed", report
            assert (
                report["error"]
                == "node b cannot continue the connection: port 443 runs 'echo' there, not "
                "'ticker'; nothing was frozen"
            )
            assert cluster.owner(flow) == "a"
            steps = [s["step"] for s in report["timeline"]]
            assert "park" not in steps and "frozen" not in steps, steps
            quiet(session)
        assert capture.count == 0, capture.lines
        end(session)
    finally:
        restart_b(cluster)


def test_an_export_error_after_the_freeze_rolls_back(cluster: Cluster) -> None:
    """The socket is frozen when the export fails: it is thawed, the park undone, the
    failure logged; the connection carries on at a and moves later."""
    cluster.stop("a")
    cluster.start_agent("a", fault="export:fail")
    try:
        session, flow = cluster.ticker()
        report = cluster.migrate(flow, "b")
        assert report["outcome"] == "rolled-back", report
        assert re.search(r"freeze failed here: connection \d+: export failed", report["error"])
        assert [s["step"] for s in report["timeline"]][-1] == "unparked"
        assert cluster.steer_row(flow) is None  # back to its route: the park is gone
        assert "export failed (RuntimeError)" in cluster.log("a")
        assert cluster.owner(flow) == "a"
        end(session)
    finally:
        cluster.stop("a")
        cluster.start_agent("a")


def test_a_failed_thaw_sends_nothing_and_rolls_back(cluster: Cluster) -> None:
    """b leaves repair mode, and the first ACK's injection fails: b freezes the socket
    again and drops it silently (no FIN, no RST reaches the client); a carries on."""
    restart_b(cluster, fault="thaw:fail")
    session, flow = cluster.ticker()
    try:
        with RstCapture(cluster.lab, "client", "to-steer") as capture:
            report = cluster.migrate(flow, "b")
            assert report["outcome"] == "rolled-back", report
            assert "thaw failed on b" in report["error"]
            quiet(session)
        assert capture.count == 0, capture.lines
        end(session)
        assert "aborted: thaw failed" in cluster.log("b")
    finally:
        restart_b(cluster)


def test_an_app_that_raises_is_logged_and_its_connection_ended(cluster: Cluster) -> None:
    """Plain TCP: a FIN (no reset) and a log line naming the flow; TLS: a fatal alert
    first. The connection is no longer listed."""
    vip = str(cluster.lab.plan.vip(4))

    async def plain() -> tuple[bytes, bytes, str]:
        reader, writer = await _open(cluster, vip, BOOM, None)
        writer.write(b"hello\n")
        first = await reader.readexactly(6)
        local = writer.get_extra_info("sockname")
        writer.write(b"boom\n")
        rest = await asyncio.wait_for(reader.read(), 10)  # b"" at the FIN
        writer.close()
        return first, rest, f"{local[0]}:{local[1]}-{vip}:{BOOM}"

    with RstCapture(cluster.lab, "client", "to-steer") as capture:
        first, rest, flow = asyncio.run(plain())
    assert (first, rest) == (b"hello\n", b"")
    assert capture.count == 0, capture.lines
    assert re.search(
        rf"connection \d+ \({re.escape(flow)}\): helpers.boom:Boom failed: "
        "RuntimeError: the app failed on purpose; closing it",
        cluster.log("a"),
    )
    assert flow not in {f["flow"] for f in cluster.flows()}

    async def tls() -> str:
        ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
        reader, writer = await _open(cluster, vip, BOOM_TLS, ctx)
        writer.write(b"boom\n")
        try:
            await asyncio.wait_for(reader.read(), 10)
        except ssl.SSLError as exc:
            return exc.reason or str(exc)
        finally:
            writer.close()
        return "no alert"

    assert asyncio.run(tls()) == "TLSV1_ALERT_INTERNAL_ERROR"


async def _open(cluster: Cluster, vip: str, port: int, ctx: ssl.SSLContext | None) -> tuple:
    import socket  # noqa: PLC0415

    sock = cluster.lab.call("client", socket.create_connection, (vip, port), 5)
    sock.setblocking(False)
    kw = {"ssl": ctx, "server_hostname": "vip"} if ctx else {}
    return await asyncio.open_connection(sock=sock, **kw)


def test_sighup_reloads_and_sigterm_drains_or_ends(tmp_path: Path) -> None:
    """SIGHUP never stops an agent (it reloads the certificates). SIGTERM drains to the
    node's drain_to and says how many moved; without drain_to it ends its connections with
    close_notify and a FIN and says how many."""
    with running_cluster(tmp_path) as cluster:
        text = cluster.config.read_text()
        cluster.config.write_text(text.replace("[nodes.a]\n", '[nodes.a]\ndrain_to = "b"\n'))
        cluster.stop("a")
        cluster.start_agent("a")
        fleet = Fleet(cluster.lab, 443, 20, ca=cluster.client_ca)
        try:
            fleet.start_talking(0.2)
            time.sleep(0.5)
            for node in ("a", "b"):
                cluster.procs[node].send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert all(cluster.procs[n].poll() is None for n in ("a", "b"))
            assert "reloaded the certificates of a" in cluster.log("a")
            assert cluster.stop("a", signal.SIGTERM) == 0
            assert re.search(
                r"agent a stopped: 20 connection\(s\) moved to b, 0 ended", cluster.log("a")
            ), cluster.log("a")[-2000:]
            v = fleet.verdicts(settle=10)
            assert len(v["survived"]) == 20, {k: len(x) for k, x in v.items()}
            assert cluster.stop("b", signal.SIGTERM) == 0
            assert "agent b stopped: 0 connection(s) moved, 20 ended" in cluster.log("b")
            deadline = time.monotonic() + 5
            while not all(c.ended for c in fleet.conns) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert {c.ended for c in fleet.conns} == {"eof"}  # a clean end, not a reset
        finally:
            fleet.shutdown()
