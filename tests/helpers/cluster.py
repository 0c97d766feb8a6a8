"""A running pysteer cluster on a lab: steering daemon, two agents, and the CLI around them.

Clients are unmodified programs run in the client namespace. ``Session`` drives one of
them over its stdin/stdout (s_client, gnutls-cli, the Python line client) while the test
migrates its flow with the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pysteer.lab import Lab
from pysteer.lab.clients import Session, check_ticker_stream, netstat  # noqa: F401 - re-exported
from pysteer.lab.cluster import LabCluster
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root, unique_prefix

PYSTEER = [sys.executable, "-m", "pysteer"]
HELPERS = Path(__file__).parent


class Cluster(LabCluster):
    def start_agent(self, node: str, fault: str | None = None, **kw: Any) -> None:
        """``fault``: one injected by agent_with_fault.py (see there)."""
        if fault is not None:
            kw["launcher"] = [sys.executable, str(HELPERS / "agent_with_fault.py"), fault]
        super().start_agent(node, **kw)

    # --- the CLI ------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PYSTEER, *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def flows(self) -> list[dict[str, Any]]:
        out = self.cli("flows", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["flows"]

    def served(self) -> dict[str, str]:
        """flow -> the node serving it, asked of every agent that is up (its control
        socket: no CLI start per call)."""
        from pysteer.agent.control import ask  # noqa: PLC0415
        from pysteer.lab.cluster import control_path_for  # noqa: PLC0415

        out = {}
        for node in self.lab.plan.hosts:
            if node in self.procs and self.procs[node].poll() is None:
                for f in ask(control_path_for(self, node), "flows")["flows"]:
                    out[f["flow"]] = node
        return out

    def owner(self, flow: str) -> str | None:
        return next((f["node"] for f in self.flows() if f["flow"] == flow), None)

    def ticker(self) -> tuple[Session, str]:
        """s_client on the VIP's TLS ticker, writing lines: its session and its flow."""
        before = {f["flow"] for f in self.flows()}
        argv = ["openssl", "s_client", "-connect", f"{self.lab.plan.vip(4)}:443"]
        argv += ["-servername", "vip", "-CAfile", str(self.client_ca), "-quiet"]
        session = Session(self.lab, argv)
        session.wait_for("ticker ready")
        flow = self.wait_new_flow(before, 443)["flow"]
        session.start_writing()
        return session, flow

    def wait_new_flow(self, before: set[str], port: int, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = [
                f
                for f in self.flows()
                if f["flow"] not in before and f["flow"].endswith(f":{port}")
            ]
            if new:
                assert len(new) == 1, new
                return new[0]
            time.sleep(0.05)
        raise AssertionError(f"no new flow to port {port}")

    def migrate(self, flow: str, to: str, *extra: str) -> dict[str, Any]:
        out = self.cli("migrate", "--flow", flow, "--to", to, "--json", *extra)
        assert out.stdout, out.stderr
        report = json.loads(out.stdout)
        report["exit"] = out.returncode
        return report

    def steer(self, *args: str, node: str | None = None) -> subprocess.CompletedProcess[str]:
        """``pysteer steer ARGS`` against a steering daemon (default: the first)."""
        name = self.lab.instance(node or self.lab.plan.steer)
        return subprocess.run(
            [*PYSTEER, "steer", *args, "--name", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def diagnose(self, flow: str, reports: list[dict[str, Any]] | None = None) -> str:
        """What to look at when a flow's stream stalls: each move's outcome and steps, the
        flow's steering entry, its sockets as the kernels see them (a hole in the client's
        data shows as retransmissions on the client and a stuck rcv_nxt on the server)
        and the tails of the daemons' logs."""
        port = flow.split("-", 1)[0].rsplit(":", 1)[1]
        lines = []
        for r in reports or []:
            steps = " ".join(f"{s['step']}@{s['ms']}" for s in r.get("timeline", []))
            lines.append(f"move {r.get('from')}->{r.get('to')}: {r.get('outcome')} {steps}")
        with contextlib.suppress(Exception):
            lines.append(f"steering entry: {self.steer_rows().get(flow)}")
        for node in ("client", *self.lab.plan.hosts):
            out = self.lab.run(
                node, ["ss", "-tinoe", f"( sport = :{port} or dport = :{port} )"], check=False
            )
            lines.append(f"--- ss in {node}:\n{out.stdout.strip()}")
        for name in self.logs:
            lines.append(f"--- {name} log (tail):\n{self.log(name)[-1500:]}")
        return "\n".join(lines)

    def steer_rows(self, node: str | None = None) -> dict[str, dict[str, Any]]:
        out = self.steer("flows", "--json", node=node)
        assert out.returncode == 0, out.stderr
        return {r["flow"]: r for r in json.loads(out.stdout)["flows"]}

    def store_report(self, node: str | None = None) -> dict[str, Any]:
        """A steering daemon's mirror of the shared store (``store`` on its socket)."""
        from pysteer.steer.control import request, socket_path  # noqa: PLC0415

        name = self.lab.instance(node or self.lab.plan.steer)
        return request(socket_path(name), "store")["store"]

    def store_overrides(self) -> dict[str, dict[str, Any]]:
        """Every override in etcd, read from inside the steering namespace."""
        return self._store_shell({"op": "list"})["overrides"]

    def store_admission(self, node: str) -> list[Any] | None:
        """``node``'s admission in etcd: [accepting, drained_to], or None."""
        return self._store_shell({"op": "admission", "node": node})["admission"]

    def _store_shell(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.etcd is not None
        argv = [sys.executable, str(HELPERS / "store_shell.py"), "--cluster", self.lab.prefix]
        argv += ["--ca", str(self.dir / "ca.pem")]
        argv += ["--cert", str(self.dir / "steer.pem"), "--key", str(self.dir / "steer.key")]
        for host, port in self.etcd.endpoints:
            argv += ["--endpoint", f"{host}:{port}"]
        out = self.lab.run("steer", argv, input=json.dumps(request) + "\n", check=True)
        answer = json.loads(out.stdout.splitlines()[0])
        assert answer["ok"], answer
        return answer

    def steer_stats(self) -> dict[str, Any]:
        out = self.steer("stats", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["stats"]

    def steer_row(self, flow: str) -> dict[str, Any] | None:
        out = subprocess.run(
            [*PYSTEER, "steer", "flows", "--json", "--name", self.lab.prefix],
            capture_output=True,
            text=True,
            check=True,
        )
        return next((r for r in json.loads(out.stdout)["flows"] if r["flow"] == flow), None)

    def client_counters(self) -> dict[str, int]:
        ext = self.lab.call("client", netstat, "TcpExt")
        tcp = self.lab.call("client", netstat, "Tcp")
        return {
            "TCPTimeouts": ext["TCPTimeouts"],
            "RetransSegs": tcp["RetransSegs"],
            "EstabResets": tcp["EstabResets"],
            "ActiveOpens": tcp["ActiveOpens"],
        }


@contextlib.contextmanager
def running_cluster(
    directory: Path,
    *,
    extra: list[str] | None = None,
    metrics_port: int | None = None,
    steer_args: list[str] | None = None,
    agent_args: list[str] | None = None,
    services: dict[int, tuple[str, bool]] | None = None,
    workers: dict[str, int] | None = None,
    store: bool | None = None,
    steering: int = 1,
    start_steers: list[str] | None = None,
    store_members: list[str] | None = None,
) -> Iterator[Cluster]:
    """A lab with the steering daemon and both agents running; all removed afterwards.
    ``store``: with the shared store (a one-member etcd in the last host's namespace;
    by default with ``steering`` > 1 only); ``start_steers``: the steering nodes the
    cluster file lists and that start (default: all)."""
    require_root()
    lab = Lab(prefix=unique_prefix(), plan=load(steering=steering)).up()
    cluster = Cluster(
        lab,
        directory,
        extra=extra,
        steer_args=steer_args,
        agent_args=agent_args,
        services=services,
        workers=workers,
        store=store,
        store_members=store_members,
    )
    if metrics_port is not None:
        cluster.serve_metrics(metrics_port)
    try:
        cluster.start(start_steers)
        yield cluster
    finally:
        cluster.close()
        lab.down()
