"""docs/handlers.md's worked example, run as written: ``docs/examples/tally.py`` served in
the namespace lab as ``tally:Tally``, a connection moved from a to b in the middle of a
line, every answer checked; bad snapshots refused; an app that cannot be imported stops
the agent's start with the reason."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cluster import Cluster

from pysteer.app.handlers import HandlerError
from pysteer.lab import Lab
from pysteer.lab.plan import load
from pysteer.lab.pytest_plugin import require_root, unique_prefix
from pysteer.paths import repo_root

EXAMPLES = repo_root() / "docs" / "examples"
PORT = 7100


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_root()
    lab = Lab(prefix=unique_prefix(), plan=load()).up()
    c = Cluster(lab, tmp_path_factory.mktemp("cluster"), services={PORT: ("tally:Tally", False)})
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH")) if p)
    try:
        c.start_steer()
        for host in lab.plan.hosts:  # as in the doc: the module on the agents' path
            c.start_agent(host, env={"PYTHONPATH": path})
        yield c
    finally:
        c.close()
        lab.down()


def lines(sock: socket.socket, n: int) -> list[str]:
    data = b""
    while data.count(b"\n") < n:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    assert data.count(b"\n") == n, data
    return data.decode().splitlines()


def test_the_example_moves_with_its_state(cluster: Cluster) -> None:
    vip = str(cluster.lab.plan.vip(4))
    sock = cluster.lab.call("client", socket.create_connection, (vip, PORT), 10)
    with sock:
        assert lines(sock, 1) == ["tally ready"]
        sock.sendall(b"add apples 3\nadd pears 4\nadd app")  # a line cut in the middle
        assert lines(sock, 2) == ["apples=3", "pears=4"]
        local = sock.getsockname()
        flow = f"{local[0]}:{local[1]}-{vip}:{PORT}"
        report = cluster.migrate(flow, "b")
        assert report["outcome"] == "moved", report
        assert cluster.owner(flow) == "b"
        sock.sendall(b"les 2\nsum\nget pears\nnope\n")
        assert lines(sock, 4) == [
            "apples=5",
            "sum=9 over 2 names",
            "pears=4",
            "error: add NAME N | get NAME | sum",
        ]


@pytest.mark.parametrize(
    "snapshot",
    [
        None,
        {"counts": {}},
        {"counts": {"a": -1}, "partial": b""},
        {"counts": {"a": True}, "partial": b""},
        {"counts": {"x" * 65: 1}, "partial": b""},
        {"counts": {str(i): 1 for i in range(1001)}, "partial": b""},
        {"counts": {}, "partial": b"x" * 1025},
        {"counts": {}, "partial": "text"},
    ],
)
def test_the_example_refuses_a_bad_snapshot(snapshot: object) -> None:
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(EXAMPLES))
    try:
        from tally import Tally  # noqa: PLC0415
    finally:
        sys.path.remove(str(EXAMPLES))
    with pytest.raises(HandlerError, match="malformed tally snapshot"):
        Tally().restore(snapshot)


def test_an_app_that_cannot_be_imported_stops_the_start(cluster: Cluster, tmp_path: Path) -> None:
    """Without the example on its path, b's agent refuses to start, and says why."""
    start = len(cluster.log("b"))
    assert cluster.stop("b") == 0
    try:
        with pytest.raises(RuntimeError, match="b did not start"):
            cluster.start_agent("b")
        log = cluster.log("b")[start:]
        assert "pysteer: error: service 7100: cannot import 'tally'" in log, log
        assert "Traceback" not in log
    finally:
        path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH")) if p)
        cluster.start_agent("b", env={"PYTHONPATH": path})
