"""Each doctor check's failure message and fix hint, driven by real inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from pysteer.doctor import checks, format_line

CAPS_ALL = (1 << 41) - 1


def test_privileges_ok_and_missing() -> None:
    ok = checks.privileges(caps=CAPS_ALL, euid=0)
    assert ok.status == "ok"
    assert "CAP_NET_ADMIN" in ok.detail
    none = checks.privileges(caps=0, euid=1000)
    assert none.status == "fail"
    assert none.required
    assert none.detail == "uid 1000 lacks CAP_NET_ADMIN, CAP_BPF (or CAP_SYS_ADMIN) (have: none)"
    assert none.hint == checks.ROOT_HINT
    only_net = checks.privileges(caps=1 << checks.CAP_NET_ADMIN, euid=0)
    assert only_net.detail == "root lacks CAP_BPF (or CAP_SYS_ADMIN) (have: CAP_NET_ADMIN)"
    bpf_only = checks.privileges(caps=1 << checks.CAP_BPF, euid=0)
    assert bpf_only.detail == "root lacks CAP_NET_ADMIN (have: CAP_BPF)"


def test_effective_caps_parsing() -> None:
    assert checks.effective_caps("Name:\tx\nCapEff:\t0000000000001000\n") == 1 << 12


def test_bpf_syscall_unknown_machine() -> None:
    c = checks.bpf_syscall(machine="pdp11")
    assert c.status == "fail"
    assert c.detail == "unknown bpf() syscall number on pdp11"
    assert "x86_64" in c.hint


def test_kernel_headers_missing(tmp_path: Path) -> None:
    c = checks.kernel_headers(release="9.9.9-test", modules=tmp_path)
    assert c.status == "fail"
    assert c.detail == f"no usable kernel headers at {tmp_path}/9.9.9-test/build"
    assert c.hint == checks.HEADERS_HINT


def _fake_headers(tmp_path: Path, release: str) -> Path:
    tree = tmp_path / "src" / "linux-headers-6.1.0-1-amd64"
    (tree / "include/generated").mkdir(parents=True)
    (tree / "include/generated/autoconf.h").write_text("")
    (tmp_path / release).mkdir()
    (tmp_path / release / "build").symlink_to(tree)
    return tree


def test_kernel_headers_real_and_fallback(tmp_path: Path) -> None:
    tree = _fake_headers(tmp_path, "6.1.0-1-amd64")
    c = checks.kernel_headers(release="6.1.0-1-amd64", modules=tmp_path)
    assert (c.status, c.detail) == ("ok", f"{tree} for kernel 6.1.0-1-amd64")
    (tmp_path / "6.1.0-1-amd64" / checks.FALLBACK_MARKER).write_text("6.1.0-1-amd64\n")
    w = checks.kernel_headers(release="6.1.0-1-amd64", modules=tmp_path)
    assert w.status == "warn"
    assert not w.required
    assert not w.failed
    assert "using Debian's 6.1.0-1-amd64 headers" in w.detail
    assert "stable UAPI" in w.detail


def test_kernel_headers_dangling_link(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "build").symlink_to(tmp_path / "gone")
    c = checks.kernel_headers(release="r", modules=tmp_path)
    assert c.status == "fail"
    assert "no usable kernel headers" in c.detail


def test_tls_libraries_too_old() -> None:
    c = checks.tls_libraries({"pyOpenSSL": "23.0.0", "cryptography": "41.0.7"})
    assert c.status == "fail"
    assert c.detail == "too old: pyOpenSSL 23.0.0 < 24.3; cryptography 41.0.7 < 42.0"
    assert "pip install" in c.hint
    fine = checks.tls_libraries({"pyOpenSSL": "26.4.0", "cryptography": "50.0.2"})
    assert fine.status == "ok"
    assert fine.detail.startswith("pyOpenSSL 26.4.0, cryptography 50.0.2; OpenSSL ")


def test_guard_turns_exceptions_into_failures() -> None:
    c = checks.tls_libraries({"pyOpenSSL": "26.0"})  # cryptography missing: KeyError
    assert c.status == "fail"
    assert c.detail == "KeyError: 'cryptography'"


def test_bcc_import_failure(tmp_path: Path) -> None:
    """A venv without Debian's bcc: the check names the fix instead of crashing."""
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named bcc (test)')\n")
    code = (
        "import json; from pysteer.doctor import checks; "
        "print(json.dumps(checks.bcc_programs().to_dict()))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["status"] == "fail"
    assert result["detail"] == "cannot import bcc: No module named bcc (test)"
    assert result["hint"] == checks.BCC_IMPORT_HINT


def test_format_line_has_fix_only_on_failure() -> None:
    bad = checks.Check("netns", "fail", "cannot create", "run as root")
    assert format_line(bad) == "FAIL  netns           cannot create  -> fix: run as root"
    good = checks.Check("netns", "ok", "fine", "unused hint")
    assert format_line(good) == "  ok  netns           fine"


def test_bpffs_check(tmp_path: Path) -> None:
    c = checks.bpffs(tmp_path)  # a plain directory, not bpffs
    assert (c.status, c.required) == ("warn", False)
    assert c.detail == f"no bpffs at {tmp_path}: the steering node mounts it on first use"
    assert c.hint == "mount -t bpf bpf /sys/fs/bpf"
