"""The checks behind ``pysteer doctor``: can this machine run pysteer?

Each check returns a ``Check`` and never raises, so one broken piece never hides the
others. Every failure carries a hint that says how to fix it. Checks take their inputs
(paths, versions, the BPF source) as parameters so tests can drive each failure for real.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from OpenSSL import SSL
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from pysteer import netns
from pysteer.bpfload import BpfBuildError, compile_file, load_func
from pysteer.paths import bpf_dir
from pysteer.steer.pins import BPFFS, NR_BPF, is_bpffs
from pysteer.tcp import constants as tc

Status = Literal["ok", "warn", "fail"]

PROBE_SOURCE = Path("probe/doctor.c")
MIN_VERSIONS = {"pyOpenSSL": (24, 3), "cryptography": (42, 0)}
ROOT_HINT = "run as root (sudo), or grant CAP_NET_ADMIN, CAP_BPF and CAP_SYS_ADMIN"

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
_CAP_NAMES = {
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_BPF: "CAP_BPF",
}
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2
ETH_P_PYSTEER_PROBE = 0x88B5  # IEEE local experimental ethertype


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str
    hint: str = ""
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.status == "fail" and self.required

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _guard(name: str, hint: str) -> Callable[[Callable[..., Check]], Callable[..., Check]]:
    """Turn an unexpected exception inside a check into a failed ``Check``."""

    def wrap(fn: Callable[..., Check]) -> Callable[..., Check]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Check:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                return Check(name, "fail", f"{type(exc).__name__}: {exc}", hint)

        return run

    return wrap


def _errno_hint(err: int | None, default: str) -> str:
    return ROOT_HINT if err in (errno.EPERM, errno.EACCES) else default


# --- privileges ---
def effective_caps(status_text: str | None = None) -> int:
    """The CapEff bitmask of this process (from /proc/self/status)."""
    text = status_text if status_text is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise ValueError("no CapEff line in /proc/self/status")


@_guard("privileges", ROOT_HINT)
def privileges(caps: int | None = None, euid: int | None = None) -> Check:
    caps = effective_caps() if caps is None else caps
    euid = os.geteuid() if euid is None else euid
    have = [n for bit, n in _CAP_NAMES.items() if caps >> bit & 1]
    missing = []
    if not caps >> CAP_NET_ADMIN & 1:
        missing.append("CAP_NET_ADMIN")
    if not (caps >> CAP_BPF & 1 or caps >> CAP_SYS_ADMIN & 1):
        missing.append("CAP_BPF (or CAP_SYS_ADMIN)")
    who = "root" if euid == 0 else f"uid {euid}"
    if missing:
        return Check(
            "privileges",
            "fail",
            f"{who} lacks {', '.join(missing)} (have: {', '.join(have) or 'none'})",
            ROOT_HINT,
        )
    return Check("privileges", "ok", f"{who} with {', '.join(have)}")


# --- bpf() ---
class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    ]


@_guard("bpf-syscall", ROOT_HINT)
def bpf_syscall(machine: str | None = None) -> Check:
    machine = machine or platform.machine()
    nr = NR_BPF.get(machine)
    if nr is None:
        return Check(
            "bpf-syscall",
            "fail",
            f"unknown bpf() syscall number on {machine}",
            "pysteer supports x86_64, aarch64, riscv64, ppc64le and s390x",
        )
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _MapCreateAttr(BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0)
    fd = libc.syscall(nr, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        hint = "the kernel needs CONFIG_BPF_SYSCALL" if err == errno.ENOSYS else ROOT_HINT
        return Check(
            "bpf-syscall",
            "fail",
            f"bpf(BPF_MAP_CREATE) failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})",
            hint,
        )
    os.close(fd)
    return Check("bpf-syscall", "ok", "bpf(BPF_MAP_CREATE) made an array map")


# --- BCC ---
BCC_IMPORT_HINT = (
    "install Debian's python3-bpfcc (scripts/setup does) and run pysteer from the venv it "
    "makes (--system-site-packages); the PyPI package named 'bcc' is unrelated"
)
HEADERS_HINT = "run scripts/setup: it installs kernel headers and links them under /lib/modules"


@functools.lru_cache(maxsize=4)
def _probe(source: Path) -> tuple[Any, Any, Any]:
    """Compile and load the doctor's XDP and tc programs once per process."""
    from bcc import BPF  # noqa: PLC0415 - bcc is optional until a BPF check runs

    bpf = compile_file(source)
    return bpf, load_func(bpf, "doctor_xdp", BPF.XDP), load_func(bpf, "doctor_tc", BPF.SCHED_CLS)


def _bcc_version() -> str:
    import bcc  # noqa: PLC0415 - bcc is optional until a BPF check runs

    try:
        return metadata.version("bcc")
    except metadata.PackageNotFoundError:
        return getattr(bcc, "__version__", "unknown version")


@_guard("bcc", BCC_IMPORT_HINT)
def bcc_programs(source: Path | None = None) -> Check:
    source = source or bpf_dir() / PROBE_SOURCE
    try:
        import bcc  # noqa: F401, PLC0415
    except ImportError as exc:
        return Check("bcc", "fail", f"cannot import bcc: {exc}", BCC_IMPORT_HINT)
    try:
        _probe(source)
    except BpfBuildError as exc:
        # BCC creates maps while compiling, so EPERM can come from either step.
        hint = ROOT_HINT if "Operation not permitted" in str(exc) else HEADERS_HINT
        return Check("bcc", "fail", f"BCC {_bcc_version()}: {exc}", hint)
    return Check(
        "bcc", "ok", f"BCC {_bcc_version()} compiled {source.name} and loaded XDP and tc programs"
    )


# --- kernel headers ---
FALLBACK_MARKER = ".pysteer-fallback"


@_guard("kernel-headers", HEADERS_HINT)
def kernel_headers(release: str | None = None, modules: Path = Path("/lib/modules")) -> Check:
    release = release or platform.release()
    build = modules / release / "build"
    resolved = build.resolve()
    config = [resolved / "include/generated/autoconf.h", resolved / "include/config/auto.conf"]
    if not build.exists() or not any(p.exists() for p in config):
        return Check("kernel-headers", "fail", f"no usable kernel headers at {build}", HEADERS_HINT)
    marker = modules / release / FALLBACK_MARKER
    if marker.exists():
        used = marker.read_text().strip()
        return Check(
            "kernel-headers",
            "warn",
            f"kernel {release} has no headers package; using Debian's {used} headers "
            f"({resolved}). Safe: pysteer's BPF programs use only stable UAPI structs",
            required=False,
        )
    return Check("kernel-headers", "ok", f"{resolved} for kernel {release}")


# --- TCP_REPAIR ---
@_guard("tcp-repair", ROOT_HINT)
def tcp_repair() -> Check:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    try:
        try:
            server.setsockopt(socket.IPPROTO_TCP, tc.TCP_REPAIR, 1)
        except OSError as exc:
            return Check(
                "tcp-repair",
                "fail",
                f"setsockopt(TCP_REPAIR): {exc.strerror}",
                _errno_hint(exc.errno, "the kernel lacks TCP_REPAIR"),
            )
        server.setsockopt(socket.IPPROTO_TCP, tc.TCP_REPAIR_QUEUE, tc.TCP_SEND_QUEUE)
        seq = struct.unpack("I", server.getsockopt(socket.IPPROTO_TCP, tc.TCP_QUEUE_SEQ, 4))[0]
        window = server.getsockopt(socket.IPPROTO_TCP, tc.TCP_REPAIR_WINDOW, 20)
        return Check(
            "tcp-repair",
            "ok",
            f"repair mode on a loopback pair: send seq {seq}, {len(window)}-byte TCP_REPAIR_WINDOW",
        )
    finally:
        server.close()  # still in repair mode: closes silently, no FIN or RST
        client.close()
        listener.close()


# --- network namespaces ---
def _scratch_netns(tag: str) -> str:
    return f"pysteer-doctor-{os.getpid()}-{tag}"


@_guard("netns", ROOT_HINT)
def netns_create() -> Check:
    name = _scratch_netns("ns")
    try:
        pr_netns.create(name)
    except OSError as exc:
        return Check(
            "netns",
            "fail",
            f"cannot create network namespace {name}: {exc.strerror or exc}",
            _errno_hint(exc.errno, "needs a writable /run/netns and CAP_SYS_ADMIN"),
        )
    try:
        inside = netns.call_in(name, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        if inside != netns.inode(name):
            return Check(
                "netns",
                "fail",
                "entered the namespace but the thread did not move",
                "setns(2) is not working as expected",
            )
    finally:
        pr_netns.remove(name)
    return Check("netns", "ok", "created, entered and removed a named network namespace")


# --- attach to a veth ---
def _attach_in_scratch(tc_fd: int, xdp_fd: int, counter: Any) -> str:
    with IPRoute() as ipr:
        ipr.link("add", ifname="probe0", kind="veth", peer={"ifname": "probe1"})
        idx = ipr.link_lookup(ifname="probe0")[0]
        peer = ipr.link_lookup(ifname="probe1")[0]
        for i in (idx, peer):
            ipr.link("set", index=i, state="up")
        ipr.tc("add", "clsact", idx)
        ipr.tc(
            "add-filter",
            "bpf",
            idx,
            ":1",
            fd=tc_fd,
            name="doctor_tc",
            parent="ffff:fff2",
            classid=1,
            direct_action=True,
        )
        ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", xdp_fd), ("IFLA_XDP_FLAGS", 2)]})
        mode = dict(ipr.get_links(idx)[0].get_attr("IFLA_XDP")["attrs"]).get("IFLA_XDP_ATTACHED")
        if mode != "xdpgeneric":
            raise RuntimeError(f"XDP reported as {mode!r}, wanted xdpgeneric")
        # One frame into probe0's ingress must run both programs.
        before = counter[ctypes.c_int(0)].value
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind(("probe1", 0))
            frame = (
                b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETH_P_PYSTEER_PROBE)
            )
            raw.send(frame + b"pysteer doctor".ljust(46, b"\0"))
        seen = 0
        for _ in range(100):
            seen = counter[ctypes.c_int(0)].value - before
            if seen >= 2:
                break
            threading.Event().wait(0.01)
        if seen < 2:
            raise RuntimeError(f"a probe frame ran {seen} of the 2 attached programs")
        ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", 2)]})
        return mode


@_guard("attach", ROOT_HINT)
def attach_veth(source: Path | None = None) -> Check:
    source = source or bpf_dir() / PROBE_SOURCE
    try:
        bpf, xdp_fn, tc_fn = _probe(source)
    except (ImportError, BpfBuildError) as exc:
        return Check("attach", "fail", f"no programs to attach ({exc})", "fix the bcc check first")
    name = _scratch_netns("veth")
    try:
        pr_netns.create(name)
    except OSError as exc:
        return Check(
            "attach",
            "fail",
            f"no scratch namespace ({exc.strerror or exc})",
            "fix the netns check first",
        )
    try:
        netns.call_in(name, _attach_in_scratch, tc_fn.fd, xdp_fn.fd, bpf[b"doctor_seen"])
    finally:
        pr_netns.remove(name)
    return Check(
        "attach",
        "ok",
        "clsact + cls_bpf (direct-action) and generic XDP attached to a veth; "
        "a probe frame ran both",
    )


# --- TLS libraries ---
def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@_guard("tls-libraries", "pip install -e '.[test]' in the venv (scripts/setup does)")
def tls_libraries(versions: dict[str, str] | None = None) -> Check:
    if versions is None:
        versions = {name: metadata.version(name) for name in MIN_VERSIONS}
    old = [
        f"{name} {versions[name]} < {'.'.join(map(str, minimum))}"
        for name, minimum in MIN_VERSIONS.items()
        if _parse_version(versions[name]) < minimum
    ]
    found = ", ".join(f"{n} {v}" for n, v in versions.items())
    if old:
        return Check(
            "tls-libraries",
            "fail",
            f"too old: {'; '.join(old)}",
            "run scripts/setup (pip install -e '.[test]') in the venv",
        )
    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    return Check("tls-libraries", "ok", f"{found}; {openssl}")


# --- bpffs ---
@_guard("bpffs", ROOT_HINT)
def bpffs(path: Path = BPFFS) -> Check:
    """Pinned maps need bpffs; pysteer mounts it at /sys/fs/bpf when it is missing."""
    if is_bpffs(path):
        return Check("bpffs", "ok", f"bpffs mounted at {path}")
    return Check(
        "bpffs",
        "warn",
        f"no bpffs at {path}: the steering node mounts it on first use",
        "mount -t bpf bpf /sys/fs/bpf",
        required=False,
    )


ALL_CHECKS: tuple[Callable[[], Check], ...] = (
    privileges,
    bpf_syscall,
    bcc_programs,
    kernel_headers,
    tcp_repair,
    netns_create,
    attach_veth,
    bpffs,
    tls_libraries,
)


def run_all() -> list[Check]:
    return [check() for check in ALL_CHECKS]
