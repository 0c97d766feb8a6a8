"""A pysteer cluster on the namespace lab: certificates, cluster file, daemon commands.

``write_cluster(lab, dir)`` makes what an operator makes by hand on real hosts (see the
README): a CA and node certificates, the cluster key and ``cluster.toml`` whose addresses
come from the lab's plan. ``steer_argv`` and ``agent_argv`` are the commands that run
the steering daemon and each host's agent on it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pysteer.agent.argv import agent_argv
from pysteer.certs_cli import write_cluster as write_certs
from pysteer.deathsig import die_with_parent
from pysteer.lab.etcd import Etcd
from pysteer.lab.plan import LabPlan
from pysteer.lab.topology import Lab
from pysteer.safefile import PUBLIC, private_dir
from pysteer.steer import pins

SERVICE_NAME = "vip"  # the DNS name clients verify (s_client -servername vip)
STEER_PORT = 7700
AGENT_PORT = 7701
# port -> (app, tls): a TLS ticker, a TLS HTTP server for downloads, a plain TCP ticker.
# A service: (app, tls) or (app, tls, {more keys}), e.g. a proxy's backend.
ServiceSpec = tuple[str, bool] | tuple[str, bool, dict[str, Any]]
DEFAULT_SERVICES: dict[int, ServiceSpec] = {
    443: ("ticker", True),
    8443: ("http", True),
    7000: ("ticker", False),
}


def _endpoint(addr: object, port: int) -> str:
    text = str(addr)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def write_cluster(
    lab: Lab,
    directory: Path,
    *,
    services: dict[int, ServiceSpec] | None = None,
    force: bool = False,
    workers: dict[str, int] | None = None,
    store: list[str] | None = None,
    steers: list[str] | None = None,
    certs: bool = True,
) -> Path:
    """Write certificates, the cluster key and ``cluster.toml``; returns the file's path.
    ``workers``: node -> its agent's worker processes (default 1); ``store``: the etcd
    members' client endpoints (the shared store)."""
    return write_plan_cluster(
        lab.plan,
        lab.prefix,
        directory,
        services=services,
        force=force,
        workers=workers,
        store=store,
        steers=steers,
        certs=certs,
    )


def write_plan_cluster(
    plan: LabPlan,
    name: str,
    directory: Path,
    *,
    services: dict[int, ServiceSpec] | None = None,
    force: bool = False,
    remote: bool = False,
    workers: dict[str, int] | None = None,
    store: list[str] | None = None,
    steers: list[str] | None = None,
    certs: bool = True,
) -> Path:
    """The same for any machines laid out by ``plan`` (the Vagrant VMs): cluster ``name``.
    ``steers``: the steering nodes the file lists (default: all; certificates are made for
    all, so that one can join later); ``certs`` False: only cluster.toml is written again.

    Each node is marked with its namespace in lab ``name`` (``netns``), so the CLI run in
    the root namespace never sends lab traffic out of it; with ``remote`` (one machine per
    node) it is marked ``remote = true`` instead, so the CLI reaches it over TCP."""
    services = DEFAULT_SERVICES if services is None else services
    lab = None if remote else Lab(prefix=name, plan=plan)

    def where(node: str) -> str:
        return "remote = true" if lab is None else f'netns = "{lab.netns(node)}"'

    listed = list(plan.steers) if steers is None else steers
    if not listed or not set(listed) <= set(plan.steers):
        raise ValueError(f"steering nodes must be some of {plan.steers}, not {steers}")
    if len(listed) > 1 and not store:
        raise ValueError(f"{len(listed)} steering nodes need the shared store (etcd)")
    nodes = {s: [str(steer_address(plan, s))] for s in plan.steers}
    nodes |= {h: [str(plan.address(h, 4)), str(plan.address(h, 6))] for h in plan.hosts}
    # Clients see a service certificate from a CA of its own (service-ca.pem), never
    # one from the control-plane CA.
    service = [SERVICE_NAME, str(plan.vip(4)), str(plan.vip(6)), "localhost"]
    if certs:
        write_certs(directory, nodes, service_names=service, force=force)
    lines = [
        f"# Written by `pysteer lab cluster` for {name!r}",
        "[cluster]",
        f'name = "{name}"',
        f'vip = ["{plan.vip(4)}", "{plan.vip(6)}"]',
        'ca = "ca.pem"',
        'key = "cluster.key"',
        "",
    ]
    for port, (app, tls, *more) in sorted(services.items()):
        lines += [f"[services.{port}]", f'app = "{app}"', f"tls = {str(tls).lower()}"]
        if tls:
            lines += ['cert = "service.pem"', 'key = "service.key"']
        for key, value in (more[0] if more else {}).items():  # a proxy's backend, say
            lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
        lines.append("")
    if store:
        lines += ["[store]", f"endpoints = {json.dumps(store)}", ""]
    several = len(listed) > 1
    for steer in listed:
        lines += [
            f"[steer.{steer}]" if several else "[steer]",
            *([] if several else [f'name = "{steer}"']),
            f'control = "{_endpoint(steer_address(plan, steer), STEER_PORT)}"',
            f'cert = "{steer}.pem"',
            f'key = "{steer}.key"',
            where(steer),
            "",
        ]
    for host in plan.hosts:
        lines += [
            f"[nodes.{host}]",
            f'control = "{_endpoint(plan.address(host, 4), AGENT_PORT)}"',
            f'cert = "{host}.pem"',
            f'key = "{host}.key"',
            where(host),
            *([f"workers = {workers[host]}"] if workers and host in workers else []),
            "",
        ]
    with private_dir(directory) as out:
        out.write("cluster.toml", "\n".join(lines).encode(), PUBLIC)
    return directory / "cluster.toml"


def steer_address(plan: LabPlan, steer: str) -> Any:
    """Where steering node ``steer`` listens for agents (``LabPlan.control_address``)."""
    return plan.control_address(steer)


def steer_argv(lab: Lab, config: Path, mode: str = "tc", steer: str | None = None) -> list[str]:
    """The daemon of steering node ``steer`` (default: the first) for ``config``, run
    from the root namespace."""
    plan = lab.plan
    steer = steer or plan.steer
    hosts = []
    for host in plan.hosts:
        link = plan.link(host, steer)
        mac = lab.mac(host, link.peer_end.name)
        hosts += ["--host", f"{host}={link.steer_end.name},{mac}"]
    d = config.parent
    return [
        sys.executable,
        "-m",
        "pysteer",
        "steer",
        "run",
        "--name",
        lab.instance(steer),
        "--netns",
        lab.netns(steer),
        "--ifname",
        plan.link(plan.client, steer).steer_end.name,
        "--mode",
        mode,
        *hosts,
        "--listen",
        _endpoint(steer_address(plan, steer), STEER_PORT),
        "--tls-cert",
        str(d / f"{steer}.pem"),
        "--tls-key",
        str(d / f"{steer}.key"),
        "--tls-ca",
        str(d / "ca.pem"),
    ]


class LabCluster:
    """The cluster's daemons on a lab: start, stop and kill them; their logs in ``dir``."""

    def __init__(
        self,
        lab: Lab,
        directory: Path,
        *,
        extra: list[str] | None = None,
        steer_args: list[str] | None = None,
        agent_args: list[str] | None = None,
        services: dict[int, ServiceSpec] | None = None,
        workers: dict[str, int] | None = None,
        store: bool | None = None,
        store_members: list[str] | None = None,
    ) -> None:
        """``extra``: options for every daemon (``--log-json``, for instance);
        ``steer_args``, ``agent_args``: for the steering daemon, for each agent;
        ``workers``: node -> its agent's worker processes; ``store``: a one-member etcd
        in the last host's namespace holds the shared store (started by ``start``; by
        default only with several steering nodes, which need it); ``store_members``: the
        nodes whose namespaces run its members instead (three: a three-member cluster)."""
        self.lab = lab
        self.dir = directory
        self.etcd: Etcd | None = None
        endpoints = None
        if store or (store is None and len(lab.plan.steers) > 1):
            # On the last host: every steering node reaches a host's address over its own
            # link (a steering node's addresses are not reachable from another one).
            members = store_members or [lab.plan.hosts[-1]]
            self.etcd = Etcd(lab, directory / "etcd", directory, members)
            endpoints = [f"{h}:{p}" for h, p in self.etcd.endpoints]
        self.steers = list(lab.plan.steers)  # the steering nodes the cluster file lists
        self._write = functools.partial(
            write_cluster, lab, directory, services=services, workers=workers, store=endpoints
        )
        self.config = self._write()
        self.extra = list(extra or [])
        self.steer_args = list(steer_args or [])
        self.agent_args = list(agent_args or [])
        self.metrics: dict[str, tuple[str, int]] = {}  # node -> its metrics listener
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.logs: dict[str, Path] = {}

    @property
    def client_ca(self) -> Path:
        """What the lab's clients trust for the VIP: the service CA, not the cluster's."""
        return self.dir / "service-ca.pem"

    # --- daemons ------------------------------------------------------------------------
    @staticmethod
    def _tied_to_this_process() -> Callable[[], None]:
        """A ``preexec_fn`` that makes the kernel SIGKILL the daemon when we die.

        A test or benchmark that crashes (one segfaulted) never runs ``close``: its daemons
        used to run on for good. SIGKILL, not SIGTERM: nobody is left to wait for an
        orderly stop, and it cannot be ignored. Daemons start from the main thread, which
        lives as long as the cluster (see ``die_with_parent``).
        """
        return die_with_parent(signal.SIGKILL)

    def _start(self, name: str, popen: Any, env: dict[str, str] | None = None) -> None:
        log = self.dir / f"{name}.log"
        self.logs[name] = log
        start = log.stat().st_size if log.exists() else 0
        out = log.open("a")
        proc = popen(
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=self._tied_to_this_process(),
        )
        out.close()
        deadline = time.monotonic() + 60
        while "control at" not in log.read_text()[start:]:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()  # a daemon that never said it was up is not left behind
                proc.wait()
                raise RuntimeError(f"{name} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        self.procs[name] = proc

    def serve_metrics(self, port: int = 9100) -> None:
        """Make every daemon started from now on serve Prometheus metrics on 127.0.0.1:PORT
        of its own namespace."""
        self.metrics = {
            n: ("127.0.0.1", port) for n in (*self.lab.plan.steers, *self.lab.plan.hosts)
        }

    def _extra(self, node: str) -> list[str]:
        if node in self.metrics:
            return [*self.extra, "--metrics", f"127.0.0.1:{self.metrics[node][1]}"]
        return self.extra

    def start_steer(self, *args: str, node: str | None = None) -> None:
        """Start steering node ``node``'s daemon (default: the first; its process and log
        are named after the node). ``args``: more options for this start only (on top of
        ``steer_args``)."""
        node = node or self.lab.plan.steer
        store = []
        if self.etcd is not None:
            for host, port in self.etcd.endpoints:
                store += ["--store", f"{host}:{port}"]
            store += ["--store-cluster", self.lab.prefix]
        argv = [
            *steer_argv(self.lab, self.config, steer=node),
            *store,
            *self._extra(node),
            *self.steer_args,
            *args,
        ]
        self._start(node, lambda **kw: subprocess.Popen(argv, **kw))

    def start_agent(
        self,
        node: str,
        *,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        """``config``: another cluster file for this node only; ``env``: more environment
        variables; ``launcher``: what runs ``pysteer`` (default ``python -m pysteer``), e.g.
        a test's wrapper that injects a fault."""
        full_env = dict(os.environ, **env) if env else None
        argv = [*agent_argv(config or self.config, node), *self._extra(node), *self.agent_args]
        if launcher is not None:
            argv = [*launcher, *argv[3:]]
        self._start(node, lambda **kw: self.lab.popen(node, argv, **kw), full_env)

    def list_steers(self, steers: list[str]) -> None:
        """Rewrite the cluster file with these steering nodes (a node joins or leaves);
        running daemons read it on SIGHUP."""
        self.config = self._write(steers=steers, certs=False)
        self.steers = list(steers)

    def start(self, steers: list[str] | None = None) -> LabCluster:
        """Start the store, the steering daemons (``steers``: only these, listed alone
        in the cluster file) and the agents."""
        if steers is not None:
            self.list_steers(steers)
        if self.etcd is not None:
            self.etcd.start()
        for steer in self.steers:
            self.start_steer(node=steer)
        for host in self.lab.plan.hosts:
            self.start_agent(host)
        return self

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(15)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        if self.etcd is not None:
            self.etcd.close()
        for steer in self.lab.plan.steers:
            pins.remove(self.lab.instance(steer))

    def log(self, name: str) -> str:
        return self.logs[name].read_text()


def control_path_for(cluster: LabCluster, node: str) -> Path:
    """The local control socket of ``node``'s agent in ``cluster``."""
    from pysteer.agent.agent import control_path  # noqa: PLC0415

    return control_path(cluster.lab.prefix, node)
