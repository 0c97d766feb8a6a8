"""etcd members in the namespace lab, from Debian's etcd-server: TLS only.

Each member listens for clients and peers on its node's lab address, with a certificate
from the cluster's CA (the name ``etcd`` and its address) and requires a certificate
signed by that CA from every client and peer: no plaintext port is opened, even here.
Its data lives under ``directory`` and goes with it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pysteer.certs import CertificateAuthority
from pysteer.lab.procs import accepts, stop_process
from pysteer.safefile import PRIVATE, PUBLIC, private_dir

if TYPE_CHECKING:
    from pysteer.lab.topology import Lab

ETCD = "/usr/bin/etcd"
CLIENT_PORT, PEER_PORT = 2379, 2380


class EtcdError(RuntimeError):
    """An etcd member could not be started; the message has the end of its log."""


def node_address(lab: Lab, node: str) -> str:
    """A lab node's IPv4 address that other nodes reach (a steering node: its control
    address)."""
    if node in lab.plan.steers:
        return str(lab.plan.control_address(node))
    return str(lab.plan.address(node, 4))


@dataclass
class Etcd:
    """etcd members named after the lab nodes they run in (one member: a one-node
    cluster). ``certs``: a directory with the cluster's ``ca.pem`` and ``ca.key``."""

    lab: Lab
    directory: Path
    certs: Path
    nodes: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(node_address(self.lab, n), CLIENT_PORT) for n in self.nodes]

    def issue(self) -> None:
        """Each member's certificate (the name ``etcd`` and its address), from the CA."""
        ca = CertificateAuthority.load(
            (self.certs / "ca.pem").read_bytes(), (self.certs / "ca.key").read_bytes()
        )
        with private_dir(self.directory) as out:
            for node in self.nodes:
                name = f"etcd-{node}"
                issued = ca.issue(
                    name, names=[name, "etcd", node_address(self.lab, node)], usage="node"
                )
                out.write(f"{name}.pem", issued.cert_pem, PUBLIC)
                out.write(f"{name}.key", issued.key_pem, PRIVATE)
            out.write("ca.pem", ca.cert_pem, PUBLIC)

    def argv(self, node: str) -> list[str]:
        d, me = self.directory, node_address(self.lab, node)
        cluster = ",".join(
            f"etcd-{n}=https://{node_address(self.lab, n)}:{PEER_PORT}" for n in self.nodes
        )
        tls = [f"--trusted-ca-file={d}/ca.pem", f"--peer-trusted-ca-file={d}/ca.pem"]
        tls += [f"--cert-file={d}/etcd-{node}.pem", f"--key-file={d}/etcd-{node}.key"]
        tls += [f"--peer-cert-file={d}/etcd-{node}.pem", f"--peer-key-file={d}/etcd-{node}.key"]
        return [
            ETCD,
            f"--name=etcd-{node}",
            f"--data-dir={d}/data-{node}",
            f"--listen-client-urls=https://{me}:{CLIENT_PORT}",
            f"--advertise-client-urls=https://{me}:{CLIENT_PORT}",
            f"--listen-peer-urls=https://{me}:{PEER_PORT}",
            f"--initial-advertise-peer-urls=https://{me}:{PEER_PORT}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-token=pysteer-{self.lab.prefix}",
            "--initial-cluster-state=new",
            "--client-cert-auth",
            "--peer-client-cert-auth",
            *tls,
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def start(self, node: str | None = None) -> Etcd:
        """Start one member (or all); wait until each accepts connections."""
        if shutil.which(ETCD) is None:
            raise EtcdError("etcd is not installed (scripts/setup installs etcd-server)")
        if not (self.directory / "ca.pem").exists():
            self.issue()
        for n in [node] if node else self.nodes:
            log = (self.directory / f"etcd-{n}.log").open("ab")
            self.procs[n] = self.lab.popen(
                n, self.argv(n), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
        deadline = time.monotonic() + 30
        for n in [node] if node else self.nodes:
            address = (node_address(self.lab, n), CLIENT_PORT)
            while not self.lab.call(n, accepts, address):
                if self.procs[n].poll() is not None or time.monotonic() > deadline:
                    self.stop(n)
                    raise EtcdError(f"etcd-{n} did not start:\n{self.log(n)[-2000:]}")
                time.sleep(0.05)
        self.wait_healthy(node or self.nodes[0])
        return self

    def wait_healthy(self, node: str, timeout: float = 30) -> None:
        """Until the member on ``node`` serves a linearized read (a leader is elected and
        a quorum is up), asked with etcdctl from inside the node's namespace."""
        d, me = self.directory, node_address(self.lab, node)
        argv = ["etcdctl", f"--endpoints=https://{me}:{CLIENT_PORT}", f"--cacert={d}/ca.pem"]
        argv += [f"--cert={d}/etcd-{node}.pem", f"--key={d}/etcd-{node}.key"]
        argv += ["--command-timeout=2s", "endpoint", "health"]
        deadline = time.monotonic() + timeout
        while True:
            out = self.lab.run(
                node, argv, check=False, env={"ETCDCTL_API": "3", "PATH": "/usr/bin"}
            )
            if out.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd-{node} is not healthy: {out.stderr.strip()[-500:]}")
            time.sleep(0.1)

    def stop(self, node: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(node, None)
        if proc is not None:
            # etcd 3.4 can hang in its graceful stop after handing over leadership (seen
            # here): its WAL is synced, so a kill after a while loses nothing.
            stop_process(proc, 3, sig)

    def close(self) -> None:
        """Stop every member at once (one by one, each waits for the others' leader)."""
        procs, self.procs = self.procs, {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()  # its data goes with the directory
                proc.wait()

    def log(self, node: str) -> str:
        path = self.directory / f"etcd-{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""
