"""Prometheus metrics (opt-in, ``--metrics HOST:PORT``) and JSON log lines (``--log-json``).

Each process has its own registry: the agent counts migrations by outcome, the freeze
window and the flows it serves; the steering daemon reports its packet counters, read from
the kernel's maps at scrape time. Neither ever carries a secret: only counts, durations
and node names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

FREEZE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets); ValueError with the reason otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def serve(registry: CollectorRegistry, listen: tuple[str, int]) -> None:
    """Serve ``/metrics`` for ``registry`` on a background thread (and log where)."""
    start_http_server(listen[1], addr=listen[0], registry=registry)
    host = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
    logging.getLogger("pysteer").info("metrics at http://%s:%d/metrics", host, listen[1])


def certificate_expiry(paths: dict[str, Path], node: str) -> GaugeMetricFamily:
    """Seconds until each certificate in these PEM files expires, read at each scrape (a
    rotated file shows at once). A bundle's certificates each get their own series,
    named by their CN: a CA being retired must not hide the next one."""
    import datetime  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415

    family = GaugeMetricFamily(
        "pysteer_certificate_expiry_seconds",
        "Seconds until a certificate this daemon uses expires (negative: expired)",
        labels=["node", "certificate", "subject"],
    )
    now = datetime.datetime.now(datetime.UTC)
    for name, path in paths.items():
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue  # unreadable: the daemon's own reload or start says why
        for cert in certs if name == "ca" else certs[:1]:
            cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            subject = str(cns[0].value) if cns else cert.subject.rfc4514_string()
            left = (cert.not_valid_after_utc - now).total_seconds()
            family.add_metric([node, name, subject], left)
    return family


class _Certificates(Collector):
    def __init__(self, paths: dict[str, Path], node: str) -> None:
        self.paths, self.node = paths, node

    def collect(self) -> Iterator[Any]:
        yield certificate_expiry(self.paths, self.node)


class AgentMetrics:
    def __init__(
        self,
        node: str,
        flows: Callable[[], int],
        *,
        accepting: Callable[[], bool] = lambda: True,
        drained: Callable[[], bool] = lambda: False,
        in_doubt: Callable[[], int] = lambda: 0,
        certificates: dict[str, Path] | None = None,
    ) -> None:
        """``certificates``: name ("node", "ca") -> the PEM file it uses."""
        self.registry = CollectorRegistry()
        for name, help_, read in (
            (
                "pysteer_node_accepting",
                "1 if this node takes imports (not drained, cordoned)",
                accepting,
            ),
            (
                "pysteer_node_drained",
                "1 if this node was drained (new connections diverted)",
                drained,
            ),
            ("pysteer_migrations_in_doubt", "Migrations whose outcome is not known yet", in_doubt),
        ):
            gauge = Gauge(name, help_, ["node"], registry=self.registry)
            gauge.labels(node).set_function(lambda read=read: float(read()))
        if certificates:
            self.registry.register(_Certificates(certificates, node))
        self.migrations = Counter(
            "pysteer_migrations",
            "Migrations started here, by outcome",
            ["node", "outcome"],
            registry=self.registry,
        )
        self.freeze = Histogram(
            "pysteer_freeze_window_seconds",
            "Park to replay done, for flows moved away from here",
            ["node"],
            buckets=FREEZE_BUCKETS,
            registry=self.registry,
        )
        self.imports = Counter(
            "pysteer_imports",
            "Flows imported from peers, by outcome",
            ["node", "outcome"],
            registry=self.registry,
        )
        flows_gauge = Gauge(
            "pysteer_flows", "Connections served by this node", ["node"], registry=self.registry
        )
        flows_gauge.labels(node).set_function(flows)
        self.node = node

    def migration(self, report: dict[str, Any]) -> None:
        self.migrations.labels(self.node, report["outcome"]).inc()
        if report.get("freeze_ms") is not None:
            self.freeze.labels(self.node).observe(report["freeze_ms"] / 1000)

    def imported(self, outcome: str) -> None:
        self.imports.labels(self.node, outcome).inc()


class SteerCollector(Collector):
    """The steering daemon's counters, read from its maps at each scrape."""

    def __init__(
        self,
        steerer: Any,
        certificates: dict[str, Path] | None = None,
        node: str = "steer",
        store: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``store``: the shared store's mirror report (None: no store)."""
        self.steerer, self.certificates, self.node = steerer, certificates, node
        self.store = store

    def collect(self) -> Iterator[Any]:
        st = self.steerer
        stats = st.stats()
        for name, key, help_ in (
            ("parked_packets", "parked", "Packets parked (held for a move)"),
            ("replayed_packets", "replayed", "Parked packets replayed"),
            ("park_dropped_packets", "park_dropped", "Parked packets dropped over the bound"),
            ("redirected_packets", "redirected", "Packets redirected to a host"),
            (
                "redirect_failed_packets",
                "redirect_failed",
                "Packets redirected by XDP that the kernel lost (refused or dropped by the "
                "target link's driver)",
            ),
            ("seen_packets", "seen", "Packets the program saw"),
            (
                "new_diverted_connections",
                "new_diverted",
                "New connections sent to a drain's target",
            ),
            (
                "divert_failed_connections",
                "divert_failed",
                "New connections not diverted because the flow table was full",
            ),
            ("table_full_errors", "table_full", "Changes refused because the flow table was full"),
            ("no_host_dropped_packets", "drop_no_host", "Packets dropped: their host is unknown"),
            ("ttl_dropped_packets", "drop_ttl", "Packets dropped: TTL or hop limit ran out"),
            (
                "park_full_dropped_packets",
                "drop_park_full",
                "Packets dropped by the program: the flow's park queue was full",
            ),
            ("park_lost_packets", "park_lost", "Parked packets lost before their replay"),
            ("xdp_fallback_packets", "xdp_fallback", "Packets XDP passed on to the tc program"),
            ("closed_flows", "closed_fin", "Entries removed at a connection's last ACK"),
            ("reset_flows", "closed_rst", "Entries removed at a connection's RST"),
            ("stale_syn_flows", "stale_syn", "Entries replaced by a new SYN on their 4-tuple"),
            ("agent_closed_flows", "closed_by_agents", "Entries removed at an agent's notice"),
            ("idle_flows", "gc_idle", "Entries removed after the idle timeout"),
            ("stale_flows", "gc_stale", "Entries removed by an agent's sync"),
            ("expired_leases", "lease_expired", "Parks rolled back when their lease ran out"),
            ("store_set_flows", "store_set", "Entries set from the shared store's overrides"),
            ("store_unset_flows", "store_unset", "Entries removed as the shared store did"),
            (
                "store_unknown_host_overrides",
                "store_unknown_host",
                "Overrides (or diversions) in the shared store to a host this node lacks",
            ),
            (
                "opened_flows",
                "opened_steered",
                "Entries set at an agent's notice of a connection it accepted (a drain's)",
            ),
        ):
            family = CounterMetricFamily(f"pysteer_steer_{name}", help_)
            family.add_metric([], stats.get(key, 0))
            yield family
        by_action: dict[str, int] = {}
        for _flow, view in st.items():
            action = view.action.name if hasattr(view.action, "name") else str(view.action)
            by_action[action] = by_action.get(action, 0) + 1
        flows = GaugeMetricFamily(
            "pysteer_steer_flows", "Flows in the table, by action", labels=["action"]
        )
        for action, count in sorted(by_action.items()):
            flows.add_metric([action], count)
        yield flows
        capacity = GaugeMetricFamily("pysteer_steer_flow_capacity", "Size of the flow table")
        capacity.add_metric([], st.max_flows)
        yield capacity
        usage = st.table_usage()
        fill = GaugeMetricFamily(
            "pysteer_steer_flow_table_fill", "Share of the flow table in use (0 to 1)"
        )
        fill.add_metric([], usage["flows"] / max(usage["capacity"], 1))
        yield fill
        if self.store is not None:
            yield from store_metrics(self.store())
        if self.certificates:
            yield certificate_expiry(self.certificates, self.node)


def store_metrics(report: dict[str, Any]) -> Iterator[Any]:
    """The steering node's mirror of the shared store: whether it is in step, and what
    it holds and did."""
    up = GaugeMetricFamily(
        "pysteer_steer_store_synced",
        "1 when the mirror of the shared store is in step (0: loading, resyncing, or down)",
    )
    up.add_metric([], 1 if report.get("state") == "synced" else 0)
    yield up
    for name, key, help_ in (
        ("overrides", "overrides", "Flow overrides mirrored from the shared store"),
        ("revision", "revision", "The shared store's revision the mirror is at"),
    ):
        gauge = GaugeMetricFamily(f"pysteer_steer_store_{name}", help_)
        gauge.add_metric([], report.get(key, 0))
        yield gauge
    for name, key, help_ in (
        ("loads", "loads", "Full reads of the shared store (start, watch gaps, outages)"),
        ("outages", "outages", "Times the shared store stopped answering"),
        ("bad_values", "bad", "Values in the shared store that were skipped as malformed"),
        ("reader_restarts", "restarts", "Times the store reader process was started again"),
    ):
        counter = CounterMetricFamily(f"pysteer_steer_store_{name}", help_)
        counter.add_metric([], report.get(key, 0))
        yield counter


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the agent's worker)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "t": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry)


class _Output(logging.StreamHandler):
    """Standard output, and standard error once that is gone (a daemon run with its
    output piped to a reader that went away): log lines are never a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)  # a bad record: logging's own report
        elif self.stream is not sys.stderr:
            self.setStream(sys.stderr)
            with contextlib.suppress(Exception):
                self.emit(record)
        # else: standard error is gone too; nowhere is left to say it


def setup_logging(json_lines: bool, worker: int | None = None) -> None:
    """Log to stdout; ``worker``: this is one of an agent's worker processes, which share
    the supervisor's output, so each line says which."""
    handler = _Output(sys.stdout)
    if json_lines:
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = "" if worker is None else f"[w{worker}]"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(name)s{tag} %(levelname)s %(message)s")
        )
    root = logging.getLogger("pysteer")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
