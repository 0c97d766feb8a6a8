"""The daemons that hold keys, hardened (security review, item 13), seen from outside:

- neither may dump core, nor be read through /proc by a process without CAP_SYS_PTRACE;
- the steering daemon refuses pin directories another user could change, and a start it
  refuses leaves the pinned maps and the attached program as they were;
- its control connections are bounded per listener: beyond the bound it refuses at once
  (never queues), its thread count stays bounded, and the other listener still serves;
  on the TLS listener, unauthenticated connections are bounded per source address and
  sessions per host, so neither a flood nor one host can keep the other agents out.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.steerd import DaemonProc, cli
from helpers.waiting import wait_until

from pysteer.lab import Lab
from pysteer.lab.cluster import STEER_PORT, agent_argv, steer_argv, write_cluster
from pysteer.lab.pytest_plugin import unique_prefix
from pysteer.rpc.codec import Decoder
from pysteer.steer import pins
from pysteer.steer.control import ControlError, request, request_remote, socket_path
from pysteer.steer.pins import PIN_ROOT

# The bounds the daemon is expected to keep (pysteer.steer.daemon); literal here, so the
# test also runs against a version that has none.
MAX_LOCAL_CLIENTS = 64
MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE, MAX_SESSIONS_PER_HOST = 64, 20, 24
SLACK = 8  # threads besides the connections' that may come and go (the TLS accept loop...)
NOBODY = 65534
# Prefixes of a command that exec it (same pid): without CAP_SYS_PTRACE (root loses it
# at exec once it is out of the bounding set); and also with core files as big as allowed.
NO_PTRACE = ["setpriv", "--bounding-set", "-sys_ptrace", "--"]
_HARD = resource.getrlimit(resource.RLIMIT_CORE)[1]
_CORES = "unlimited" if _HARD == resource.RLIM_INFINITY else str(_HARD)
UNHARDENED = [*NO_PTRACE, "prlimit", f"--core={_CORES}:{_CORES}", "--"]


def readable_without_ptrace(pid: int) -> bool:
    """Whether a root process without CAP_SYS_PTRACE may open /proc/PID/mem.

    The kernel shows no process's dumpable flag, but applies it here: a process of the
    same uid whose capabilities include the target's may open its mem (a ptrace access
    check) only if the target is dumpable; CAP_SYS_PTRACE would bypass the flag, so the
    checker and the target both run without it."""
    code = f"open('/proc/{pid}/mem', 'rb').close()"
    out = subprocess.run(
        [*NO_PTRACE, "python3", "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0 or "PermissionError" in out.stderr, out.stderr
    return out.returncode == 0


def core_limit(pid: int) -> tuple[str, str]:
    """The soft and hard core file size limits of ``pid`` (from /proc/PID/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit in /proc/PID/limits")


def start_daemon(
    argv: list[str], log: Path, popen: Callable[..., subprocess.Popen], started: list
) -> int:
    """Start a daemon as an unhardened one would run (added to ``started``); its pid once
    it serves."""
    with log.open("a") as out:
        proc = popen([*UNHARDENED, *argv], stdout=out, stderr=subprocess.STDOUT)
    started.append(proc)
    deadline = time.monotonic() + 60
    while "control at" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc.pid


@pytest.fixture
def cluster_files(lab: Lab, tmp_path: Path) -> Iterator[Path]:
    """The lab's cluster file (certificates, keys); the steering instance is removed after."""
    yield write_cluster(lab, tmp_path / "cluster")
    pins.remove(lab.prefix)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_daemons_holding_keys_are_not_dumpable(lab: Lab, cluster_files: Path) -> None:
    """Both daemons, started with core files allowed and without CAP_SYS_PTRACE, drop
    their core limit to 0 (soft and hard) and become non-dumpable."""
    sleeper = subprocess.Popen([*UNHARDENED, "sleep", "60"])
    procs: list[subprocess.Popen] = []
    try:
        assert readable_without_ptrace(sleeper.pid)  # the check sees a dumpable process
        assert core_limit(sleeper.pid) == (_CORES, _CORES) != ("0", "0")
        logs = cluster_files.parent
        pids = [
            start_daemon(
                steer_argv(lab, cluster_files), logs / "steer.log", subprocess.Popen, procs
            ),
            start_daemon(
                agent_argv(cluster_files, "a"),
                logs / "a.log",
                lambda argv, **kw: lab.popen("a", argv, **kw),
                procs,
            ),
        ]
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"run" in cmdline, cmdline  # the daemon itself, not a wrapper
        seen = {pid: (core_limit(pid), readable_without_ptrace(pid)) for pid in pids}
        assert seen == dict.fromkeys(pids, (("0", "0"), False))
    finally:
        sleeper.kill()
        sleeper.wait()
        stop(procs)


# --- pin directories -----------------------------------------------------------------------
def start_refused(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a daemon that should refuse to start; one that starts is stopped, and fails."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    said = ""
    for line in proc.stdout:  # until it exits, or says it serves
        said += line
        if "control at" in line:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
            pytest.fail(f"the daemon started:\n{said}")
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, said, err)


def tc_state(lab: Lab) -> str:
    """The program attached to the steering node's client link (tc, ingress)."""
    return lab.run("steer", ["tc", "filter", "show", "dev", "to-client", "ingress"]).stdout


def pinned(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in path.iterdir()}


def test_pin_dirs_others_could_change_are_refused(lab: Lab) -> None:
    """A running instance's pin directory, taken over by another user or opened to all,
    stops the next start with a clear error; the start changes nothing."""
    d = DaemonProc(lab, unique_prefix())
    path = PIN_ROOT / d.name
    flow = f"{lab.plan.address('client')}:42300-{lab.plan.vip_v4}:8100"
    try:
        d.start()
        assert cli(d.name, "park", flow).returncode == 0
        d.stop()
        maps, attached = pinned(path), tc_state(lab)
        assert maps and "pysteer" in attached
        for tamper, why, restore in (
            (
                lambda: os.chown(path, NOBODY, NOBODY),
                f"it belongs to uid {NOBODY}, not to uid 0",
                lambda: os.chown(path, 0, 0),
            ),
            (
                lambda: path.chmod(0o777),
                "its group or others may write it (mode 0777)",
                lambda: path.chmod(0o700),
            ),
        ):
            tamper()
            try:
                out = start_refused(d.argv)
            finally:
                restore()
            assert out.returncode == 2, out
            assert out.stderr.startswith(
                f"pysteer: error: refusing the pin directory {path}: {why}"
            ), out.stderr
            assert out.stderr.rstrip().endswith("nothing running was changed"), out.stderr
            assert "Traceback" not in out.stderr
            assert (pinned(path), tc_state(lab)) == (maps, attached)
        d.start()  # restored: the same maps, the parked flow still in them
        assert [r["flow"] for r in d.rows()] == [flow]
    finally:
        d.stop()
        pins.remove(d.name)


def test_a_symlinked_pin_dir_is_refused(lab: Lab) -> None:
    """A pin directory that is a symlink (here to a directory of ours) is never used."""
    d = DaemonProc(lab, unique_prefix())
    link, real = PIN_ROOT / d.name, PIN_ROOT / f"{d.name}-real"
    PIN_ROOT.mkdir(mode=0o700, exist_ok=True)
    real.mkdir(mode=0o700)
    link.symlink_to(real)
    try:
        out = start_refused(d.argv)
        assert out.returncode == 2, out
        assert f"refusing the pin directory {link}: it is a symbolic link" in out.stderr
        assert "Traceback" not in out.stderr
        assert list(real.iterdir()) == []  # nothing was pinned through it
    finally:
        link.unlink()
        for entry in real.iterdir():  # what a daemon that followed the link pinned
            entry.unlink()
        real.rmdir()


# --- bounded control connections ---------------------------------------------------------
def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def answered(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of ``socks`` the daemon has written to, or hung up on."""
    poll = select.poll()
    for sock in socks:
        poll.register(sock, select.POLLIN)
    ready = {fd for fd, _ in poll.poll(0)}
    return [sock for sock in socks if sock.fileno() in ready]


def hung_up(socks: list[ssl.SSLSocket]) -> list[ssl.SSLSocket]:
    """Those of the TLS ``socks`` the daemon has closed (a session ticket is not a close)."""
    gone = []
    for sock in socks:
        sock.settimeout(0.05)
        try:
            if sock.recv(1) == b"":
                gone.append(sock)
        except (TimeoutError, ssl.SSLWantReadError):
            pass
        except (ssl.SSLError, OSError):
            gone.append(sock)
    return gone


def first_answer(sock: socket.socket) -> dict:
    """The first answer on ``sock`` (the RPC's, in place of its hello's), its error cut
    to 45 characters."""
    decoder = Decoder()
    decoder.feed(sock.recv(1000))
    answer = decoder.next()
    assert answer is not None
    return answer | {"error": answer["error"][:45]}


def connect_unix(path: Path, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        socks.append(sock)
    return socks


def connect_tcp(address: tuple[str, int], count: int) -> list[socket.socket]:
    return [socket.create_connection(address, timeout=10) for _ in range(count)]


def close(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


class Steering:
    """A steering daemon with its TLS listener, and a client for each listener."""

    def __init__(self, lab: Lab, cluster_files: Path) -> None:
        self.lab, self.d = lab, DaemonProc(lab, lab.prefix)
        self.d.argv = steer_argv(lab, cluster_files)
        here = cluster_files.parent
        self.agent = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.agent.load_verify_locations(here / "ca.pem")
        self.agent.load_cert_chain(here / "a.pem", here / "a.key")  # a steered host's agent
        self.remote = (str(lab.plan.link(lab.plan.hosts[0]).steer_end.v4.ip), STEER_PORT)
        self.path = socket_path(lab.prefix)

    @property
    def pid(self) -> int:
        assert self.d.proc is not None
        return self.d.proc.pid

    def remote_ok(self) -> bool:
        """Whether a steered host's agent gets an answer on the TLS listener."""
        with contextlib.suppress(ControlError):
            answer = self.lab.call(
                "steer", request_remote, self.remote, self.agent, self.lab.plan.steer, "hosts"
            )
            return [h["name"] for h in answer["hosts"]] == ["a", "b"]
        return False

    def local_ok(self) -> bool:
        """Whether a command on the unix socket gets an answer."""
        with contextlib.suppress(ControlError):
            return "stats" in request(self.path, "stats", timeout=5)
        return False


@pytest.fixture
def steering(lab: Lab, cluster_files: Path) -> Iterator[Steering]:
    s = Steering(lab, cluster_files)
    s.d.start()
    try:
        assert s.local_ok() and s.remote_ok()
        yield s
    finally:
        s.d.stop()


def settle(check: Callable[[], bool], timeout: float) -> None:
    """Wait until ``check`` holds or ``timeout`` passes (what then holds is asserted)."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_local_control_connections_are_bounded(steering: Steering) -> None:
    """20 unix connections more than the bound: those are refused at once with a reason,
    the daemon's threads stay bounded, and the TLS listener still serves; once the hogs
    are gone, so does the unix socket."""
    extra, pid = 20, steering.pid
    base = threads(pid)
    hogs = connect_unix(steering.path, MAX_LOCAL_CLIENTS + extra)
    try:
        settle(lambda: len(answered(hogs)) >= extra, 10)
        refused = answered(hogs)
        start = time.monotonic()
        try:
            request(steering.path, "stats", timeout=5)
            late = "answered"
        except ControlError as exc:
            late = str(exc)
        late = late.removeprefix(f"steering daemon at {steering.path}: ")
        facts = {
            "refused": len(refused),
            "threads within the bound": threads(pid) <= base + MAX_LOCAL_CLIENTS + SLACK,
            "why": first_answer(refused[0]) if refused else None,
            "one more, refused at once": (late[:45], time.monotonic() - start < 2),
            "TLS listener serves": steering.remote_ok(),  # it has a budget of its own
        }
        busy = "steering daemon busy: 64 control connections "
        assert facts == {
            "refused": extra,
            "threads within the bound": True,
            "why": {"ok": False, "code": "busy", "error": busy},
            "one more, refused at once": (busy, True),
            "TLS listener serves": True,
        }
    finally:
        close(hogs)
    settle(steering.local_ok, 10)
    assert request(steering.path, "stats")["stats"]["control_refused"] == extra + 1
    log = steering.d.log()
    assert 1 <= log.count("control connection(s) on the control socket") <= 2, log  # no flood
    assert "Traceback" not in log


def test_remote_control_connections_are_bounded(steering: Steering) -> None:
    """A flood of TCP connections that never start a handshake, from the client's address:
    beyond the per-source bound they are closed at once, the daemon's threads stay
    bounded, and the agents (other addresses) are still served, as is the unix socket.
    (Before, 256 such connections locked every agent out for their 10 s handshakes.)"""
    extra, pid = 44, steering.pid
    base = threads(pid)
    floods = steering.lab.call(
        "client", connect_tcp, steering.remote, MAX_HANDSHAKES_PER_SOURCE + extra
    )
    try:
        settle(lambda: len(answered(floods)) >= extra, 5)  # the others wait out 5 s
        facts = {
            "closed": len(answered(floods)),
            "threads within the bound": threads(pid) <= base + MAX_HANDSHAKES + SLACK,
            "unix socket serves": steering.local_ok(),
            "agent served": steering.remote_ok(),  # from the steering node's own address
        }
    finally:
        close(floods)
    assert facts == {
        "closed": extra,
        "threads within the bound": True,
        "unix socket serves": True,
        "agent served": True,
    }
    log = steering.d.log()
    assert 1 <= log.count("control connection(s) on the TLS listener (handshakes)") <= 2, log
    assert "Traceback" not in log


def test_one_host_cannot_use_up_the_sessions(steering: Steering, cluster_files: Path) -> None:
    """Host a opens more authenticated sessions than a host may hold: the extra ones are
    closed, and host b's agent is still served."""
    here = cluster_files.parent
    b = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    b.load_verify_locations(here / "ca.pem")
    b.load_cert_chain(here / "b.pem", here / "b.key")
    extra = 3

    def sessions(count: int) -> list[ssl.SSLSocket]:
        out = []
        for _ in range(count):
            raw = socket.create_connection(steering.remote, timeout=10)
            out.append(steering.agent.wrap_socket(raw, server_hostname=steering.lab.plan.steer))
        return out

    held = steering.lab.call("steer", sessions, MAX_SESSIONS_PER_HOST + extra)
    try:
        settle(lambda: len(hung_up(held)) >= extra, 5)
        closed = len(hung_up(held))
        answer = steering.lab.call(
            "steer", request_remote, steering.remote, b, steering.lab.plan.steer, "hosts"
        )
    finally:
        close(held)
    assert (closed, [h["name"] for h in answer["hosts"]]) == (extra, ["a", "b"])
    wait_until(steering.remote_ok, 15, "host a to be served again")
