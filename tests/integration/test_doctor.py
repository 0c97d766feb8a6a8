"""`pysteer doctor` on this machine: it passes as root and names each failure without caps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pysteer.doctor import checks

PYSTEER = [sys.executable, "-m", "pysteer"]
EXPECTED = [
    "privileges",
    "bpf-syscall",
    "bcc",
    "kernel-headers",
    "tcp-repair",
    "netns",
    "attach",
    "bpffs",
    "tls-libraries",
]


def doctor(*prefix: str) -> tuple[int, dict]:
    out = subprocess.run(
        [*prefix, *PYSTEER, "doctor", "--json"], capture_output=True, text=True, check=False
    )
    return out.returncode, json.loads(out.stdout)


def test_doctor_passes_here() -> None:
    rc, report = doctor()
    assert [c["name"] for c in report["checks"]] == EXPECTED
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert failed == []
    assert report["ok"] is True
    assert rc == 0
    by_name = {c["name"]: c for c in report["checks"]}
    assert "loaded XDP and tc programs" in by_name["bcc"]["detail"]
    assert "a probe frame ran both" in by_name["attach"]["detail"]


def test_doctor_human_output_one_line_per_check() -> None:
    out = subprocess.run([*PYSTEER, "doctor"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert len(lines) == len(EXPECTED) + 1
    assert lines[-1] == "all required checks passed"


def test_doctor_without_capabilities_names_every_failure() -> None:
    """Root with every capability dropped: the privileged checks fail, each with its fix."""
    rc, report = doctor("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    assert rc == 1
    assert report["ok"] is False
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["privileges"]["status"] == "fail"
    assert by_name["privileges"]["detail"].startswith("root lacks CAP_NET_ADMIN")
    assert by_name["bpf-syscall"]["detail"] == (
        "bpf(BPF_MAP_CREATE) failed: EPERM (Operation not permitted)"
    )
    assert "Operation not permitted" in by_name["bcc"]["detail"]
    assert by_name["tcp-repair"]["detail"] == "setsockopt(TCP_REPAIR): Operation not permitted"
    assert by_name["netns"]["detail"].startswith("cannot create network namespace")
    assert by_name["attach"]["hint"] == "fix the bcc check first"
    for name in ("privileges", "bpf-syscall", "bcc", "tcp-repair", "netns"):
        assert by_name[name]["status"] == "fail", name
        assert by_name[name]["hint"] == checks.ROOT_HINT, name
    # What needs no privilege still passes.
    assert by_name["tls-libraries"]["status"] == "ok"
    assert by_name["kernel-headers"]["status"] in ("ok", "warn")


def test_bcc_compile_error_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "broken.c"
    bad.write_text("int doctor_xdp(struct xdp_md *ctx) { return no_such_symbol; }\n")
    c = checks.bcc_programs(bad)
    assert c.status == "fail"
    assert "broken.c" in c.detail
    assert "no_such_symbol" in c.detail
    assert c.hint == checks.HEADERS_HINT


def test_bcc_missing_source(tmp_path: Path) -> None:
    c = checks.bcc_programs(tmp_path / "absent.c")
    assert c.status == "fail"
    assert c.detail.endswith(f"BPF source {tmp_path / 'absent.c'} does not exist")


@pytest.mark.parametrize("check", [checks.netns_create, checks.attach_veth])
def test_scratch_namespaces_are_removed(check) -> None:
    assert check().status == "ok"
    leftovers = [p.name for p in Path("/run/netns").glob("pysteer-doctor-*")]
    assert leftovers == []


def test_attach_fails_clearly_without_net_admin() -> None:
    """With CAP_BPF and CAP_SYS_ADMIN but not CAP_NET_ADMIN, programs load but cannot attach."""
    rc, report = doctor("setpriv", "--bounding-set=-net_admin", "--inh-caps=-all")
    by_name = {c["name"]: c for c in report["checks"]}
    assert rc == 1
    assert by_name["bcc"]["status"] == "ok"
    assert by_name["attach"]["status"] == "fail"
    assert "Operation not permitted" in by_name["attach"]["detail"]
    assert by_name["attach"]["hint"] == checks.ROOT_HINT
    assert by_name["privileges"]["detail"].startswith("root lacks CAP_NET_ADMIN (have: ")
