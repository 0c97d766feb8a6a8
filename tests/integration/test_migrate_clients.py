"""Live migration end to end: unmodified clients keep talking while `pysteer migrate`
moves their connection A -> B -> A ... ten times.

Each client talks to the ticker app (a numbered tick stream plus a counted echo of every
line it sends) or downloads 50 MB from the http app. The test checks, from the client's
own output and counters and a capture on the client link: byte-exact streams both ways,
ticks and echo counters continuing, no RST, no reconnect and no retransmission timeout.
Retransmissions are counted and printed (the benchmark holds the zero target).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.cluster import HELPERS, Cluster, Session, check_ticker_stream, running_cluster
from helpers.migration import RstCapture

from pysteer.app.handlers import http_body
from pysteer.lab import Lab

MOVES = 10
TLS13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
TLS12 = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def client_ifname(lab: Lab) -> str:
    return lab.plan.link(lab.plan.client).peer_end.name


def vip(cluster: Cluster, family: int = 4) -> str:
    return str(cluster.lab.plan.vip(family))


def s_client(cluster: Cluster, *version: str, port: int = 443) -> list[str]:
    # Not -quiet: that would also turn off the interactive K (KeyUpdate) command.
    return [
        "openssl",
        "s_client",
        "-connect",
        f"{vip(cluster)}:{port}",
        "-servername",
        "vip",
        "-verify_hostname",
        "vip",
        "-CAfile",
        str(cluster.client_ca),
        "-verify_return_error",
        *version,
    ]


def migrate_back_and_forth(
    cluster: Cluster, flow: str, moves: int = MOVES, pause: float = 0.1
) -> list[dict[str, Any]]:
    reports, node = [], cluster.owner(flow)
    for _ in range(moves):
        time.sleep(pause)
        node = "b" if node == "a" else "a"
        report = cluster.migrate(flow, node)
        assert report["exit"] == 0 and report["outcome"] == "moved", report
        assert cluster.owner(flow) == node
        reports.append(report)
    return reports


class Watch:
    """The client namespace's counters and a RST capture around a client's whole life."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.capture = RstCapture(cluster.lab, "client", client_ifname(cluster.lab))

    def __enter__(self) -> Watch:
        self.before = self.cluster.client_counters()
        self.capture.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.__exit__(*exc)
        self.after = self.cluster.client_counters()

    def check(self, reports: list[dict[str, Any]], label: str, server_rst_only: str = "") -> None:
        """``server_rst_only``: the service's ADDR.PORT when the client closes first (curl):
        its kernel then answers the server's close_notify, which crosses its own close,
        with a RST. That is the client's own teardown, so only RSTs from the service count.
        """
        delta = {k: self.after[k] - self.before[k] for k in self.after}
        freeze = sorted(r["freeze_ms"] for r in reports)
        print(
            f"\n{label}: {len(reports)} moves, freeze median {freeze[len(freeze) // 2]:.2f} ms "
            f"max {freeze[-1]:.2f} ms; client retransmissions {delta['RetransSegs']}, "
            f"replayed {sum(r['replayed'] for r in reports)} parked packets"
        )
        rsts = self.capture.lines
        if server_rst_only:
            rsts = [ln for ln in rsts if f" {server_rst_only} > " in ln]
        assert rsts == [], self.capture.lines
        own_resets = len(self.capture.lines) - len(rsts)  # the client's own, at its close
        assert delta["TCPTimeouts"] == 0, delta
        assert delta["EstabResets"] <= own_resets, delta  # counted only from ESTABLISHED
        assert delta["ActiveOpens"] == 1, "the client connected more than once"


def ticker_session(
    cluster: Cluster, argv: list[str], label: str, port: int = 443, keyupdate: bool = False
) -> None:
    before = {f["flow"] for f in cluster.flows()}
    with Watch(cluster) as watch:
        session = Session(cluster.lab, argv)
        session.wait_for("ticker ready")
        flow = cluster.wait_new_flow(before, port)["flow"]
        assert cluster.owner(flow) == "a"
        session.start_writing()
        reports = migrate_back_and_forth(cluster, flow, 1 if keyupdate else MOVES)
        if keyupdate:
            for _ in range(2):
                # s_client: KeyUpdate, and ask the server for one too
                session.command(b"K\n", done="KEYUPDATE")
                time.sleep(0.3)
                row = next(f for f in cluster.flows() if f["flow"] == flow)
                assert row["tls"]["key_updates"] == 1, row
                reports += migrate_back_and_forth(cluster, flow, 2)
        time.sleep(0.3)
        session.stop_writing()
        try:
            session.drain()
        except AssertionError as exc:  # a stalled stream: say what the kernels and agents saw
            raise AssertionError(f"{exc}\n{cluster.diagnose(flow, reports)}") from None
    text = session.finish()  # after the capture: a killed client may RST the next tick
    ticks = check_ticker_stream(text, session.sent)
    assert ticks > 10 and len(session.sent) > 20
    watch.check(reports, label)
    assert cluster.owner(flow) is None  # closed on the node that served it last


@pytest.mark.parametrize("suite", TLS13)
def test_s_client_tls13(cluster: Cluster, suite: str) -> None:
    ticker_session(cluster, s_client(cluster, "-tls1_3", "-ciphersuites", suite), suite)


@pytest.mark.parametrize("cipher", TLS12)
def test_s_client_tls12(cluster: Cluster, cipher: str) -> None:
    ticker_session(cluster, s_client(cluster, "-tls1_2", "-cipher", cipher), cipher)


def test_gnutls_cli(cluster: Cluster) -> None:
    argv = [
        "gnutls-cli",
        "--x509cafile",
        str(cluster.client_ca),
        "--verify-hostname",
        "vip",
        "--logfile",
        "/dev/null",
        "-p",
        "443",
        vip(cluster),
    ]
    ticker_session(cluster, argv, "gnutls-cli")


def test_python_ssl(cluster: Cluster) -> None:
    argv = [
        sys.executable,
        str(HELPERS / "line_client.py"),
        vip(cluster),
        "443",
        "--tls",
        str(cluster.client_ca),
    ]
    ticker_session(cluster, argv, "python ssl")


def test_plain_tcp(cluster: Cluster) -> None:
    argv = [sys.executable, str(HELPERS / "line_client.py"), vip(cluster), "7000"]
    ticker_session(cluster, argv, "plain TCP", port=7000)


def test_keyupdate_after_migration(cluster: Cluster) -> None:
    """s_client's K after a move: both sides rekey, and the next moves carry the new keys."""
    ticker_session(cluster, s_client(cluster, "-tls1_3"), "KeyUpdate", keyupdate=True)


def test_ipv6_tls(cluster: Cluster) -> None:
    argv = [
        sys.executable,
        str(HELPERS / "line_client.py"),
        vip(cluster, 6),
        "443",
        "--tls",
        str(cluster.client_ca),
    ]
    before = {f["flow"] for f in cluster.flows()}
    with Watch(cluster) as watch:
        session = Session(cluster.lab, argv)
        session.wait_for("ticker ready")
        flow = cluster.wait_new_flow(before, 443)["flow"]
        assert flow.startswith("[")
        session.start_writing()
        reports = migrate_back_and_forth(cluster, flow, 2)
        session.stop_writing()
        session.drain()
    text = session.finish()
    check_ticker_stream(text, session.sent)
    watch.check(reports, "IPv6")


def test_curl_50mb(cluster: Cluster, tmp_path: Path) -> None:
    """50 MB at 2.5 MB/s: 20 s, so the ten moves (each a CLI start) land mid-download."""
    size = 50_000_000
    target = tmp_path / "body"
    before = {f["flow"] for f in cluster.flows()}
    with Watch(cluster) as watch:
        curl = cluster.lab.popen(
            "client",
            [
                "curl",
                "--silent",
                "--show-error",
                "--fail",
                "--http1.1",
                "--limit-rate",
                "2500K",
                "--cacert",
                str(cluster.client_ca),
                "--resolve",
                f"vip:8443:{vip(cluster)}",
                "-o",
                str(target),
                f"https://vip:8443/bytes/{size}",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        flow = cluster.wait_new_flow(before, 8443)["flow"]
        reports = migrate_back_and_forth(cluster, flow, MOVES, pause=0.2)
        assert curl.poll() is None, "the download ended before the last move"
        assert curl.wait(120) == 0, curl.stderr.read()
        curl.stderr.close()
    body = target.read_bytes()
    assert len(body) == size
    assert hashlib.sha256(body).digest() == hashlib.sha256(http_body(size)).digest()
    watch.check(reports, "curl 50 MB", server_rst_only=f"{vip(cluster)}.8443")
