"""A non-editable install (a wheel of the checkout) runs without the checkout: its BPF
sources ship inside the package, where ``bpf_dir()`` finds them and BCC compiles them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pysteer.paths import repo_root

CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import pysteer
    from pysteer.paths import bpf_dir
    site = Path(sys.argv[1])
    assert Path(pysteer.__file__).is_relative_to(site), pysteer.__file__
    assert bpf_dir() == site / "pysteer" / "bpf_sources", bpf_dir()
    from pysteer.bpfload import compile_file
    compile_file(bpf_dir() / "xdp_pass.c").cleanup()
    print("ok")
    """
)


def test_a_wheel_carries_and_compiles_its_bpf_sources(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([*pip, "wheel", "--no-deps", "-w", wheels, repo_root()], check=True)
    (wheel,) = wheels.glob("pysteer-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    shipped = site / "pysteer" / "bpf_sources"
    sources = sorted(p.relative_to(repo_root() / "bpf") for p in (repo_root() / "bpf").rglob("*"))
    for rel in sources:
        if (repo_root() / "bpf" / rel).is_file():
            assert (shipped / rel).read_bytes() == (repo_root() / "bpf" / rel).read_bytes(), rel
    env = {k: v for k, v in os.environ.items() if k != "PYSTEER_BPF_DIR"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-c", CHECK, site],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr
    version = subprocess.run(
        [sys.executable, "-m", "pysteer", "-V"],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert version.stdout == "pysteer 0.1.0\n"
