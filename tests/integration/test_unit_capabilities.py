"""The systemd units give each daemon only some capabilities: are they enough? Each daemon
runs here with its bounding set cut to its unit's CapabilityBoundingSet (setpriv), and
no new privileges, and a TLS connection moves a -> b -> a under a live client."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cluster import Cluster, check_ticker_stream

from pysteer.lab import Lab
from pysteer.lab.clients import LineClient
from pysteer.lab.cluster import steer_argv
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root, unique_prefix
from pysteer.paths import repo_root

UNITS = repo_root() / "packaging" / "systemd"


def bounding(unit: str) -> list[str]:
    """setpriv's options for the unit's capability set."""
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", (UNITS / unit).read_text(), re.M)
    assert caps
    names = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps.group(1).split())
    return ["setpriv", "--no-new-privs", "--bounding-set", f"-all,{names}", "--"]


def test_the_units_capabilities_are_enough(tmp_path: Path) -> None:
    require_root()
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing: scripts/setup installs it")
    lab = Lab(prefix=unique_prefix(), plan=load()).up()
    cluster = Cluster(lab, tmp_path / "cluster")
    try:
        argv = [*bounding("pysteer-steer@.service"), *steer_argv(lab, cluster.config)]
        cluster._start("steer", lambda **kw: subprocess.Popen(argv, **kw))
        agent = [*bounding("pysteer-agent@.service"), sys.executable, "-m", "pysteer"]
        for host in lab.plan.hosts:
            cluster.start_agent(host, launcher=agent)
        for name in ("steer", *lab.plan.hosts):  # really cut: no CAP_SYS_PTRACE, for one
            status = Path(f"/proc/{cluster.procs[name].pid}/status").read_text()
            bnd = int(re.search(r"^CapBnd:\s*(\w+)", status, re.M).group(1), 16)
            assert not bnd & (1 << 19), name  # CAP_SYS_PTRACE
        vip = str(lab.plan.vip(4))
        ctx = ssl.create_default_context(cafile=str(cluster.client_ca))
        raw = lab.call("client", socket.create_connection, (vip, 443))
        client = LineClient(raw, ssl=ctx, server_hostname="vip")
        client.start()
        host, port = client.sock.getsockname()[:2]
        flow = f"{host}:{port}-{vip}:443"
        time.sleep(0.3)
        for to in ("b", "a"):
            report = cluster.migrate(flow, to)
            assert report["outcome"] == "moved", (report, cluster.log(to)[-2000:])
        time.sleep(0.3)
        check_ticker_stream(client.finish(), client.sent)
        client.close()
    finally:
        cluster.close()
        lab.down()
