"""Hardening of the daemons that hold keys: no core dumps, pin directories nobody else can
change, and control clients that cannot hold a connection slot forever."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pysteer.rpc.codec import Decoder, encode, hello
from pysteer.steer import daemon as steerd
from pysteer.steer import pins
from pysteer.steer.daemon import Daemon

NOBODY = 65534


def test_harden_turns_core_dumps_off() -> None:
    """In a child: the test process itself must stay as it was."""
    code = (
        "import resource; from pysteer.harden import dumpable, harden\n"
        "assert dumpable()\n"
        "harden()\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE), dumpable())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(0, 0) False"


# --- pin directories ---------------------------------------------------------------------
@pytest.fixture
def bpffs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /sys/fs/bpf: a sticky world-writable directory, as bpffs's root is."""
    root = tmp_path / "bpf"
    root.mkdir()
    root.chmod(0o1777)
    monkeypatch.setattr(pins, "BPFFS", root)
    monkeypatch.setattr(pins, "PIN_ROOT", root / "pysteer")
    monkeypatch.setattr(pins, "ensure_bpffs", lambda: None)
    monkeypatch.setattr(pins, "is_bpffs", lambda path=root: True)
    return root


def test_pin_dirs_are_made_private(bpffs: Path) -> None:
    path = pins.pin_dir("inst")
    assert path == bpffs / "pysteer" / "inst"
    for made in (path, path.parent):
        st = made.lstat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert pins.pin_dir("inst") == path  # a second start uses them as they are
    (path / "flows").write_bytes(b"")  # stands for a pinned map
    pins.remove("inst")
    assert not path.exists() and path.parent.is_dir()


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: makes a directory owned by another user")


@pytest.mark.parametrize("which", ["root", "instance"])
def test_a_pin_dir_made_by_another_user_is_refused(bpffs: Path, which: str) -> None:
    needs_root()
    target = bpffs / "pysteer" if which == "root" else bpffs / "pysteer" / "inst"
    target.parent.mkdir(mode=0o700, exist_ok=True)
    target.mkdir(mode=0o755)
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(pins.PinError) as info:
        pins.pin_dir("inst")
    assert str(info.value).startswith(
        f"refusing the pin directory {target}: it belongs to uid {NOBODY}, not to uid 0"
    )
    assert f"rm -r {target}" in str(info.value)
    with pytest.raises(pins.PinError):
        pins.pinned_maps("inst")  # nothing in it is read either
    if which == "instance":
        (target / "flows").write_bytes(b"")
        with pytest.raises(pins.PinError):
            pins.remove("inst")
        assert (target / "flows").exists()  # nothing was removed


def test_a_pin_dir_others_may_write_is_refused(bpffs: Path) -> None:
    (bpffs / "pysteer").mkdir(mode=0o700)
    inst = bpffs / "pysteer" / "inst"
    inst.mkdir()
    inst.chmod(0o777)
    with pytest.raises(pins.PinError) as info:
        pins.pin_dir("inst")
    assert str(info.value) == (
        f"refusing the pin directory {inst}: its group or others may write it (mode 0777), "
        f"so they could rename or unlink the pins in it. Check what it holds, then "
        f"chmod go-w {inst}, then start again"
    )
    inst.chmod(0o775)
    with pytest.raises(pins.PinError, match=r"mode 0775"):
        pins.pin_dir("inst")
    inst.chmod(0o755)  # what pysteer made before it made them 0700: still fine
    assert pins.pin_dir("inst") == inst


def test_a_symlinked_pin_dir_is_refused_and_never_followed(bpffs: Path, tmp_path: Path) -> None:
    (bpffs / "pysteer").mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "precious").write_text("keep me")
    link = bpffs / "pysteer" / "inst"
    link.symlink_to(elsewhere)
    with pytest.raises(pins.PinError, match=r"it is a symbolic link .*rm "):
        pins.pin_dir("inst")
    with pytest.raises(pins.PinError, match=r"symbolic link"):
        pins.remove("inst")  # it used to unlink everything the link pointed to
    assert (elsewhere / "precious").read_text() == "keep me"
    link.unlink()
    link.write_text("")
    with pytest.raises(pins.PinError, match=r"it is not a directory"):
        pins.pin_dir("inst")


def test_bpffs_root_writable_without_sticky_bit_is_refused(bpffs: Path) -> None:
    bpffs.chmod(0o777)
    with pytest.raises(pins.PinError, match=r"without the sticky bit \(mode 0777\).*chmod \+t"):
        pins.pin_dir("inst")
    assert not (bpffs / "pysteer").exists()


@pytest.mark.parametrize("name", ["inst\n", "../x", "", "A", "a/b"])
def test_bad_instance_names_are_refused(bpffs: Path, name: str) -> None:
    for use in (pins.pin_dir, pins.pinned_maps, pins.remove):
        with pytest.raises(pins.PinError, match="invalid steering instance name"):
            use(name)
    assert not (bpffs / "pysteer").exists()


# --- control clients: deadlines ----------------------------------------------------------
@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steerd, "REQUEST_TIMEOUT", 0.5)


def serve(idle: float | None) -> tuple[socket.socket, threading.Thread]:
    ours, theirs = socket.socketpair()
    daemon = Daemon(None, Path("/nonexistent"))  # type: ignore[arg-type]
    thread = threading.Thread(target=daemon._client, args=(theirs, idle), daemon=True)
    thread.start()
    ours.settimeout(10)
    return ours, thread


def answer(sock: socket.socket) -> dict:
    decoder = Decoder()
    while (message := decoder.next()) is None:
        data = sock.recv(65536)
        assert data, "hung up on"
        decoder.feed(data)
    return message


@pytest.fixture
def idle_client(quick: None) -> Iterator[tuple[socket.socket, threading.Thread]]:
    ours, thread = serve(idle=0.5)
    yield ours, thread
    ours.close()
    thread.join(10)


def test_an_idle_local_client_is_hung_up_on(idle_client) -> None:
    ours, thread = idle_client
    start = time.monotonic()
    assert ours.recv(100) == b""  # no request within the idle timeout: hung up
    assert 0.4 < time.monotonic() - start < 5
    thread.join(5)
    assert not thread.is_alive()


def test_a_dribbling_local_client_is_hung_up_on(idle_client) -> None:
    ours, thread = idle_client
    start = time.monotonic()
    with pytest.raises(OSError):  # hung up on while it dribbles
        for byte in encode(hello()) + encode({"cmd": "stats", "padding": "x" * 40}):
            ours.send(bytes([byte]))
            time.sleep(0.05)
    assert time.monotonic() - start < 5
    thread.join(5)
    assert not thread.is_alive()


def test_a_local_client_that_talks_is_served(idle_client) -> None:
    ours, _ = idle_client
    time.sleep(0.3)
    ours.sendall(encode(hello()))
    assert answer(ours)["ok"] is True
    for _ in range(3):  # each request gets its own deadline
        time.sleep(0.3)
        ours.sendall(encode({"cmd": "nope"}))
        assert answer(ours)["error"] == "unknown command 'nope'"


def test_an_agent_may_stay_silent_but_not_dribble(quick: None) -> None:
    """A TLS client (an agent) keeps its link open between migrations: no idle limit, but
    a request it started must arrive within REQUEST_TIMEOUT."""
    ours, thread = serve(idle=None)
    try:
        time.sleep(1.0)  # twice REQUEST_TIMEOUT, silent
        ours.sendall(encode(hello()))
        assert answer(ours)["ok"] is True
        time.sleep(1.0)
        ours.sendall(encode({"cmd": "nope"}))
        assert answer(ours)["ok"] is False
        ours.sendall(encode({"cmd": "nope"})[:7])
        start = time.monotonic()
        last = answer(ours)  # why, then it hangs up
        assert ours.recv(100) == b""
        assert 0.4 < time.monotonic() - start < 5
        assert last["code"] == "protocol" and "part of a frame" in last["error"]
    finally:
        ours.close()
        thread.join(10)
    assert not thread.is_alive()
