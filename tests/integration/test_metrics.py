"""Prometheus metrics and JSON logs: the counters match what the test did.

Agents and the steering daemon run with ``--metrics 127.0.0.1:9100`` (in their own
namespaces) and ``--log-json``. The test moves one TLS flow a -> b -> a, makes one move
fail (b cordoned), and scrapes every endpoint.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
import yaml
from helpers.cluster import PYSTEER, Cluster, running_cluster

from pysteer.lab.clients import LineClient, check_ticker_stream
from pysteer.paths import repo_root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(  # with the shared store: its metrics are scraped too
        tmp_path_factory.mktemp("cluster"), extra=["--log-json"], metrics_port=9100, store=True
    ) as c:
        yield c


def scrape(cluster: Cluster, node: str) -> dict[str, float]:
    """``name{labels}`` -> value, from the node's /metrics."""

    def get() -> str:
        with urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=5) as r:
            return r.read().decode()

    text = cluster.lab.call(node, get)
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_match_what_happened(cluster: Cluster) -> None:
    vip = str(cluster.lab.plan.vip(4))
    ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
    raw = cluster.lab.call("client", socket.create_connection, (vip, 443))
    client = LineClient(raw, interval=0.05, ssl=ctx, server_hostname="vip")
    client.start()
    local = client.sock.getsockname()
    flow = f"{local[0]}:{local[1]}-{vip}:443"
    assert scrape(cluster, "a")['pysteer_flows{node="a"}'] == 1
    reports = [cluster.migrate(flow, "b"), cluster.migrate(flow, "a")]
    assert [r["outcome"] for r in reports] == ["moved", "moved"]
    assert cluster.cli("agent", "cordon", "b").returncode == 0
    failed = cluster.migrate(flow, "b")
    assert failed["outcome"] == "failed"
    cordoned = scrape(cluster, "b")
    assert cordoned['pysteer_node_accepting{node="b"}'] == 0
    assert cluster.cli("agent", "uncordon", "b").returncode == 0

    a, b = scrape(cluster, "a"), scrape(cluster, "b")
    assert a['pysteer_migrations_total{node="a",outcome="moved"}'] == 1
    assert a['pysteer_migrations_total{node="a",outcome="failed"}'] == 1
    assert b['pysteer_migrations_total{node="b",outcome="moved"}'] == 1
    assert a['pysteer_imports_total{node="a",outcome="committed"}'] == 1
    assert b['pysteer_imports_total{node="b",outcome="committed"}'] == 1
    assert a['pysteer_freeze_window_seconds_count{node="a"}'] == 1
    assert b['pysteer_freeze_window_seconds_count{node="b"}'] == 1
    assert a['pysteer_freeze_window_seconds_sum{node="a"}'] == pytest.approx(
        reports[0]["freeze_ms"] / 1000, rel=1e-6
    )
    assert a['pysteer_flows{node="a"}'] == 1 and b['pysteer_flows{node="b"}'] == 0
    assert b['pysteer_node_accepting{node="b"}'] == 1 and a['pysteer_node_drained{node="a"}'] == 0
    assert a['pysteer_migrations_in_doubt{node="a"}'] == 0
    days = 86400
    expiry = "pysteer_certificate_expiry_seconds"
    cert = a[f'{expiry}{{certificate="node",node="a",subject="a"}}']
    assert 364 * days < cert <= 365 * days  # the lab issues them for 365 days
    ca = a[f'{expiry}{{certificate="ca",node="a",subject="pysteer control-plane CA"}}']
    assert 364 * days < ca <= 365 * days

    steer = scrape(cluster, "steer")
    stats = json.loads(
        subprocess.run(
            [*PYSTEER, "steer", "stats", "--json", "--name", cluster.lab.prefix],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["stats"]
    assert steer["pysteer_steer_parked_packets_total"] == stats["parked"]
    assert steer["pysteer_steer_replayed_packets_total"] == stats["replayed"]
    assert steer["pysteer_steer_park_dropped_packets_total"] == stats["park_dropped"] == 0
    assert steer["pysteer_steer_replayed_packets_total"] == sum(r["replayed"] for r in reports)
    assert steer['pysteer_steer_flows{action="TO"}'] == 1  # our flow, back on a by TO(a)
    for name, key in (
        ("no_host_dropped_packets", "drop_no_host"),
        ("ttl_dropped_packets", "drop_ttl"),
        ("park_full_dropped_packets", "drop_park_full"),
        ("table_full_errors", "table_full"),
        ("park_lost_packets", "park_lost"),
    ):
        assert steer[f"pysteer_steer_{name}_total"] == stats[key], name
    # The store: the flow moved to b and back is at a, recorded (the override says a).
    assert steer["pysteer_steer_store_synced"] == 1
    assert (
        steer["pysteer_steer_store_overrides"] == 1
        and steer["pysteer_steer_store_loads_total"] == 1
    )
    assert steer["pysteer_steer_store_outages_total"] == 0
    usage = sum(v for k, v in steer.items() if k.startswith("pysteer_steer_flows{"))
    assert steer["pysteer_steer_flow_table_fill"] == usage / steer["pysteer_steer_flow_capacity"]
    prefix = cluster.lab.prefix
    steer_cert = steer[f'{expiry}{{certificate="node",node="{prefix}",subject="steer"}}']
    assert 364 * days < steer_cert <= 365 * days

    check_ticker_stream(client.finish(), client.sent)
    client.close()
    exported = {k.split("{")[0] for k in (*a, *b, *steer)}
    check_monitoring_files(exported)
    for name in ("a", "b", "steer"):
        messages = []
        for line in cluster.log(name).splitlines():
            entry = json.loads(line)  # every line is one JSON object
            assert set(entry) >= {"t", "level", "logger", "msg"}
            messages.append(entry["msg"])
        assert "metrics at http://127.0.0.1:9100/metrics" in messages  # where to scrape
    assert any(
        re.search(r"migration \w+ .* -> b: moved", json.loads(ln)["msg"])
        for ln in cluster.log("a").splitlines()
    )


MONITORING = repo_root() / "docs" / "monitoring"
PROMETHEUS_OWN = {"up"}  # what Prometheus itself records for each scrape


def check_monitoring_files(exported: set[str]) -> None:
    """The shipped Grafana dashboard and alerting rules use only metric names that the
    daemons export (as scraped above), so neither can silently show nothing."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((MONITORING / "prometheus-alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {r["alert"] for r in alerts} >= {
        "PysteerNodeDown",
        "PysteerFlowTableFilling",
        "PysteerMigrationInDoubt",
        "PysteerCertificateExpiring",
    }
    exprs += [r["expr"] for r in alerts]
    assert all(r["labels"]["severity"] and r["annotations"]["summary"] for r in alerts)
    used = {
        name for e in exprs for name in re.findall(r"\b(?:pysteer_[a-z_]+|up)\b(?=[{\[ )]|$)", e)
    }
    assert len(used) > 20
    missing = sorted(used - exported - PROMETHEUS_OWN)
    assert not missing, f"not exported: {missing}"
