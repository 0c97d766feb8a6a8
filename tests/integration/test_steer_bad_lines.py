"""A real steering daemon answers bad requests with an error and keeps serving.

Each of these used to raise in the daemon's per-client thread (when requests were JSON
lines): a traceback in its log, the connection dropped without an answer. Now they are
frames of pysteer's RPC, and so are their bad cousins; an old JSON-line client gets one
JSON line that says why it is refused.
"""

import json
import math
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers.steerd import DaemonProc

from pysteer.lab import Lab
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.rpc import VERSION
from pysteer.rpc.codec import MAX_DEPTH, Decoder, encode, hello
from pysteer.steer import pins
from pysteer.steer.control import request, socket_path


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


def framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def answer(sock: socket.socket, decoder: Decoder) -> dict:
    while (message := decoder.next()) is None:
        data = sock.recv(65536)
        assert data, "the daemon hung up"
        decoder.feed(data)
    return message


def test_bad_requests_are_answered_and_the_daemon_keeps_serving(lab: Lab) -> None:
    name = unique_prefix()
    argv = DaemonProc(lab, name).argv
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        started = proc.stdout.readline()
        assert "control at" in started, started
        port = "9" * 5000  # over int()'s 4300-digit limit
        flow = f"{lab.plan.address('client')}:{port}-{lab.plan.vip_v4}:8100"
        deep: object = 0
        for _ in range(100):
            deep = [deep]
        bad = [
            (framed(b"\x82\xa3cmd\xa5stats\xa1x\xa2\xff\xfe"), "a frame's strings must be UTF-8"),
            (encode({"cmd": "stats", "x": deep}), f"a frame nests at most {MAX_DEPTH}"),
            (encode({"cmd": "park", "flow": flow}), "flow"),
            (encode({"cmd": "park", "flow": flow, "lease": math.nan}), "must be finite"),
            (framed(b"\x91\x01"), "a frame must hold a map"),
        ]
        path = socket_path(name)
        with connect(path) as sock:
            decoder = Decoder()
            sock.sendall(encode(hello()))
            assert answer(sock, decoder) == {"ok": True, "rpc": "hello", "version": VERSION}
            for frame, message in bad:
                sock.sendall(frame)
                got = answer(sock, decoder)
                assert got["ok"] is False, got
                assert message in got["error"], got["error"]
                assert len(got["error"]) < 300  # the bad input is not echoed in full
            sock.sendall(encode({"cmd": "stats"}))  # the same connection still serves
            got = answer(sock, decoder)
            assert got["ok"] is True and "stats" in got
        with connect(path) as sock:  # a client of before: one JSON line says why, then EOF
            sock.sendall(json.dumps({"cmd": "stats"}).encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            got = json.loads(data)
            assert got["ok"] is False and got["code"] == "version", got
            assert f"speaks pysteer RPC version {VERSION}" in got["error"]
            assert "so it speaks version 0" in got["error"]
        assert "stats" in request(path, "stats")  # and so does a new one
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        pins.remove(name)
    assert "Traceback" not in out + err
    assert "Exception in thread" not in err
