"""A real steering daemon answers bad control lines with an error and keeps serving.

Each of these used to raise in the daemon's per-client thread: a traceback in its log, the
connection dropped without an answer.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pysteer.lab import Lab
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.steer import pins
from pysteer.steer.control import LineReader, request, socket_path

PYSTEER = [sys.executable, "-m", "pysteer"]


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A connection to the daemon's socket, waiting for it: the daemon logs "control at"
    just before it binds, so the socket may not exist yet when that line arrives."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_bad_lines_are_answered_and_the_daemon_keeps_serving(lab: Lab) -> None:
    name = unique_prefix()
    argv = [
        *PYSTEER,
        "steer",
        "run",
        "--name",
        name,
        "--ifname",
        "to-client",
        "--netns",
        lab.netns("steer"),
        "--mode",
        "tc",
        "--host",
        f"a=to-a,{lab.mac('a', 'to-steer')}",
        "--host",
        f"b=to-b,{lab.mac('b', 'to-steer')}",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        started = proc.stdout.readline()
        assert "control at" in started, started
        port = "9" * 5000  # over int()'s 4300-digit limit
        flow = f"{lab.plan.address('client')}:{port}-{lab.plan.vip_v4}:8100"
        bad = [
            (b'{"cmd": "stats", "x": "\xff\xfe"}\n', "a request must be UTF-8"),
            (b"[" * 100_000 + b"\n", "a request nests at most 16 levels deep"),
            (json.dumps({"cmd": "park", "flow": flow}).encode() + b"\n", "flow"),
        ]
        path = socket_path(name)
        with connect(path) as sock:
            reader = LineReader(sock)
            for line, message in bad:
                sock.sendall(line)
                answer = json.loads(reader.line())
                assert answer["ok"] is False, answer
                assert message in answer["error"], answer["error"]
                assert len(answer["error"]) < 300  # the bad input is not echoed in full
            sock.sendall(b'{"cmd": "stats"}\n')  # the same connection still serves
            answer = json.loads(reader.line())
            assert answer["ok"] is True and "stats" in answer
        assert "stats" in request(path, "stats")  # and so does a new one
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        pins.remove(name)
    assert "Traceback" not in out + err
    assert "Exception in thread" not in err
