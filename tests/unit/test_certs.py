"""`pysteer certs`: keys written only where nobody else can reach them, certificates that
say what they are for, one host's bundle, and the identity check every link makes.

The attacks are the ones a review reproduced: a local user (uid 65534) who pre-creates
the predictable directory with 0666 ``*.tmp`` files, or plants symlinks, before root runs
``certs init``. They are run as that user, for real.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from pysteer.certs import CertificateAuthority
from pysteer.identity import IdentityError, certificate_node, client_context, server_context

NOBODY = 65534
INIT = [sys.executable, "-m", "pysteer", "certs", "init"]
NODES = ["--node", "a=a,10.0.0.2", "--node", "b", "--node", "steer"]


def pysteer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pysteer", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def as_nobody(script: str) -> None:
    """Run ``script`` as uid 65534 (the system's Python: the venv may sit under a directory
    that user cannot enter)."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    subprocess.run(
        [python, "-c", script], user=NOBODY, group=NOBODY, extra_groups=[], check=True, timeout=30
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh name in /tmp (world-writable, sticky), as the README's old path was."""
    path = Path("/tmp") / f"pysteer-certs-{uuid.uuid4().hex[:12]}"
    yield path
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in directory.iterdir()}


def test_init_writes_private_files(tmp_path: Path) -> None:
    d = tmp_path / "new" / "cluster"
    out = pysteer("certs", "init", "--dir", str(d), *NODES, "--service-name", "vip,10.0.0.100")
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert modes(d) == {
        "ca.pem": 0o644,
        "ca.key": 0o600,
        "a.pem": 0o644,
        "a.key": 0o600,
        "b.pem": 0o644,
        "b.key": 0o600,
        "steer.pem": 0o644,
        "steer.key": 0o600,
        "cluster.key": 0o600,
        "service-ca.pem": 0o644,
        "service.pem": 0o644,
        "service.key": 0o600,
    }
    assert {p.stat().st_uid for p in d.iterdir()} == {os.geteuid()}


def test_attack_precreated_directory_and_tmp_files(shared_tmp: Path) -> None:
    # The user makes the directory and empty, world-writable *.tmp files for every key.
    names = ["ca.pem", "ca.key", "a.pem", "a.key", "cluster.key"]
    as_nobody(
        f"import os; os.mkdir({str(shared_tmp)!r}, 0o777); os.chmod({str(shared_tmp)!r}, "
        f"0o777)\nfor n in {names!r}:\n    p = os.path.join({str(shared_tmp)!r}, n + "
        f"'.tmp'); open(p, 'w').close(); os.chmod(p, 0o666)"
    )
    out = pysteer("certs", "init", "--dir", str(shared_tmp), *NODES)
    assert out.returncode == 2
    assert f"{shared_tmp} is owned by uid {NOBODY}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    # Nothing was written: every file there is still the user's empty one.
    assert sorted(p.name for p in shared_tmp.iterdir()) == sorted(n + ".tmp" for n in names)
    assert all(p.stat().st_size == 0 and p.stat().st_uid == NOBODY for p in shared_tmp.iterdir())


def test_attack_directory_writable_by_others(tmp_path: Path) -> None:
    d = tmp_path / "cluster"
    d.mkdir()
    d.chmod(0o777)  # root's, but anyone may swap files in it
    out = pysteer("certs", "init", "--dir", str(d), *NODES)
    assert out.returncode == 2
    assert "writable by its group or by others (mode 0777)" in out.stderr, out.stderr
    assert list(d.iterdir()) == []
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # no sticky bit: our directory could be renamed away
    out = pysteer("certs", "init", "--dir", str(parent / "cluster"), *NODES)
    assert out.returncode == 2
    assert "is writable by others (mode 0777), so they could replace" in out.stderr, out.stderr
    assert not (parent / "cluster").exists()


def test_attack_symlinks_are_not_followed(tmp_path: Path, shared_tmp: Path) -> None:
    victim = tmp_path / "root-only"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    # The directory itself a symlink, planted by the user in /tmp.
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    as_nobody(f"import os; os.symlink({str(target)!r}, {str(shared_tmp)!r})")
    out = pysteer("certs", "init", "--dir", str(shared_tmp), *NODES)
    assert out.returncode == 2
    assert "is a symlink" in out.stderr, out.stderr
    assert list(target.iterdir()) == []
    # Symlinks inside a directory that is ours (left over, or planted earlier): the old
    # temporary name and the final names are never followed.
    d = tmp_path / "cluster"
    d.mkdir(mode=0o700)
    for name in ("ca.pem.tmp", "ca.pem", "cluster.key.tmp", "a.key"):
        (d / name).symlink_to(victim)
    out = pysteer("certs", "init", "--dir", str(d), *NODES)
    assert out.returncode == 0, out.stderr
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    for name in ("ca.pem", "a.key"):  # replaced by regular files, not written through
        assert stat.S_ISREG((d / name).lstat().st_mode)
    assert (d / "ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")


def test_certificates_say_what_they_are_for(tmp_path: Path) -> None:
    out = pysteer(
        "certs",
        "init",
        "--dir",
        str(tmp_path / "c"),
        *NODES,
        "--kind",
        "rsa",
        "--service-name",
        "vip,10.0.0.100",
    )
    assert out.returncode == 0, out.stderr
    d = tmp_path / "c"
    leaf, ca = x509.load_pem_x509_certificates((d / "a.pem").read_bytes())
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    # The service certificate: serverAuth only, under a CA that is not the cluster's.
    service, service_ca = x509.load_pem_x509_certificates((d / "service.pem").read_bytes())
    eku = service.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert service.issuer == service_ca.subject != ca.subject
    assert (d / "service-ca.pem").read_bytes() == service_ca.public_bytes(Encoding.PEM)
    # A client trusting the service CA accepts the VIP; one trusting the cluster CA does not.
    good = ssl.create_default_context(cafile=str(d / "service-ca.pem"))
    bad = ssl.create_default_context(cafile=str(d / "ca.pem"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "service.pem", d / "service.key")
    assert handshake(server, good, "vip") is None
    assert "CERTIFICATE_VERIFY_FAILED" in str(handshake(server, bad, "vip"))


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> Exception | None:
    """One TLS handshake over memory BIOs; the client's error, if any."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    for _ in range(10):
        for obj in (c, s):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if obj is c:
                    return exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return None


def test_operator_service_certificate(tmp_path: Path) -> None:
    theirs = CertificateAuthority("operator's CA")
    issued = theirs.issue("www.example.test", names=["www.example.test"])
    other = theirs.issue("other.example.test")
    client_only = theirs.issue("c.example.test", usage="client")
    for name, data in [
        ("svc.pem", issued.chain_pem),
        ("svc.key", issued.key_pem),
        ("other.key", other.key_pem),
        ("client.pem", client_only.chain_pem),
        ("client.key", client_only.key_pem),
    ]:
        (tmp_path / name).write_bytes(data)
    run = ["certs", "init", *NODES, "--dir"]
    out = pysteer(
        *run,
        str(tmp_path / "ok"),
        "--service-cert",
        str(tmp_path / "svc.pem"),
        "--service-key",
        str(tmp_path / "svc.key"),
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ok" / "service.pem").read_bytes() == issued.chain_pem
    assert (tmp_path / "ok" / "service.key").read_bytes() == issued.key_pem
    assert not (tmp_path / "ok" / "service-ca.pem").exists()
    out = pysteer(
        *run,
        str(tmp_path / "mismatch"),
        "--service-cert",
        str(tmp_path / "svc.pem"),
        "--service-key",
        str(tmp_path / "other.key"),
    )
    assert out.returncode == 2 and "is not the key of" in out.stderr, out.stderr
    out = pysteer(
        *run,
        str(tmp_path / "client"),
        "--service-cert",
        str(tmp_path / "client.pem"),
        "--service-key",
        str(tmp_path / "client.key"),
    )
    assert out.returncode == 2 and "not a server certificate" in out.stderr, out.stderr
    out = pysteer(*run, str(tmp_path / "half"), "--service-cert", str(tmp_path / "svc.pem"))
    assert out.returncode == 2 and "go together" in out.stderr, out.stderr


def test_bundle_holds_one_hosts_files(tmp_path: Path) -> None:
    d = tmp_path / "cluster"
    assert (
        pysteer("certs", "init", "--dir", str(d), *NODES, "--service-name", "vip").returncode == 0
    )
    (d / "cluster.toml").write_text('[steer]\nname = "steer"\n[nodes.a]\n[nodes.b]\n')
    out = pysteer("certs", "bundle", "--dir", str(d), "--node", "a", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    assert modes(tmp_path / "a") == {
        "ca.pem": 0o644,
        "a.pem": 0o644,
        "a.key": 0o600,
        "cluster.key": 0o600,
        "service.pem": 0o644,
        "service.key": 0o600,
        "cluster.toml": 0o644,
    }
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    for name in ("a.key", "cluster.key", "ca.pem"):
        assert (tmp_path / "a" / name).read_bytes() == (d / name).read_bytes()
    # The steering node (cluster.toml says so) gets no cluster key and no service key.
    out = pysteer(
        "certs", "bundle", "--dir", str(d), "--node", "steer", "--out", str(tmp_path / "s")
    )
    assert out.returncode == 0, out.stderr
    assert sorted(modes(tmp_path / "s")) == ["ca.pem", "cluster.toml", "steer.key", "steer.pem"]
    again = pysteer("certs", "bundle", "--dir", str(d), "--node", "a", "--out", str(tmp_path / "a"))
    assert again.returncode == 2 and "already holds" in again.stderr
    for bad, message in [
        (["--node", "zz"], "no key for node 'zz'"),
        (["--node", "../ca"], "invalid node name"),
        (["--node", "ca"], "invalid node name"),
    ]:
        out = pysteer("certs", "bundle", "--dir", str(d), *bad, "--out", str(tmp_path / "x"))
        assert out.returncode == 2 and message in out.stderr, out.stderr
    out = pysteer(
        "certs",
        "bundle",
        "--dir",
        str(tmp_path / "none"),
        "--node",
        "a",
        "--out",
        str(tmp_path / "y"),
    )
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_issue_renews_one_node(tmp_path: Path) -> None:
    d = tmp_path / "cluster"
    assert pysteer("certs", "init", "--dir", str(d), *NODES).returncode == 0
    before = {n: (d / n).read_bytes() for n in ("a.key", "b.key", "ca.key")}
    out = pysteer("certs", "issue", "--dir", str(d), "--node", "a=a,10.0.0.9")
    assert out.returncode == 0, out.stderr
    assert (d / "a.key").read_bytes() != before["a.key"]
    assert (d / "b.key").read_bytes() == before["b.key"]
    assert (d / "ca.key").read_bytes() == before["ca.key"]
    leaf, ca = x509.load_pem_x509_certificates((d / "a.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert certificate_node(leaf, {"a", "b"}) == "a"
    bundle = tmp_path / "b-only"
    out = pysteer("certs", "bundle", "--dir", str(d), "--node", "b", "--out", str(bundle))
    assert out.returncode == 2 and "give --role host or --role steer" in out.stderr  # no guess
    assert (
        pysteer(
            "certs",
            "bundle",
            "--dir",
            str(d),
            "--node",
            "b",
            "--role",
            "host",
            "--out",
            str(bundle),
        ).returncode
        == 0
    )
    out = pysteer("certs", "issue", "--dir", str(bundle), "--node", "c")
    assert out.returncode == 2 and "no CA key" in out.stderr  # a host cannot mint nodes


# --- the identity check -----------------------------------------------------------------
CA = CertificateAuthority("cluster CA")


def leaf(cn: str, *, names: list[str] | None = None, usage: str = "node") -> x509.Certificate:
    return CA.issue(cn, names=names or [cn], usage=usage).cert


@pytest.mark.parametrize(
    ("cert", "expect", "error"),
    [
        (leaf("a"), None, None),
        (leaf("a"), "a", None),
        (leaf("a", names=["a", "a.example.com", "10.0.0.2"]), "a", None),
        (
            leaf("vip", names=["vip", "10.0.0.100"], usage="server"),
            None,
            "not a node's: no clientAuth (it allows: serverAuth)",
        ),
        (leaf("a", usage="server"), None, "no clientAuth"),
        (leaf("a", usage="server"), "a", "no clientAuth"),  # not even as a server
        (leaf("a", usage="client"), None, "no serverAuth"),
        (leaf("a", usage="any"), None, "no extendedKeyUsage"),
        (leaf("a", names=["b"]), None, "'a' is not among the certificate's DNS names"),
        (leaf("a", names=["a", "b"]), None, "also names b"),
        (leaf("a", names=["a", "b"]), "a", "also names b"),  # dialling a: b is still known
        (leaf("a"), "b", "certificate is 'a''s, not 'b''s"),
        (leaf("vip", names=["vip"]), None, "'vip' is not an identity allowed here"),
        (leaf("a", names=["10.0.0.2"]), None, "not among the certificate's DNS names"),
    ],
)
def test_identity(cert: x509.Certificate, expect: str | None, error: str | None) -> None:
    if error is None:
        assert certificate_node(cert, {"a", "b"}, expect) == "a"
    else:
        with pytest.raises(IdentityError, match=re.escape(error)):
            certificate_node(cert, {"a", "b"}, expect)


def test_control_contexts_ignore_sslkeylogfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent started with SSLKEYLOGFILE set wrote its control-link secrets to a file."""
    d = tmp_path / "c"
    assert pysteer("certs", "init", "--dir", str(d), *NODES).returncode == 0
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    server = server_context(d / "a.pem", d / "a.key", d / "ca.pem")
    client = client_context(d / "b.pem", d / "b.key", d / "ca.pem")
    assert server.keylog_filename is None and client.keylog_filename is None
    assert handshake(server, client, "a") is None
    assert not keylog.exists() or keylog.read_bytes() == b""
    # The test can fail: Python's default context does log with the variable set.
    assert ssl.create_default_context().keylog_filename == str(keylog)


def test_attack_through_a_parent(tmp_path: Path, shared_tmp: Path) -> None:
    """A symlink or a directory of the user's anywhere above the key directory: the user
    could point it elsewhere, or swap our directory for theirs, after root wrote."""
    as_nobody(f"import os; os.mkdir({str(shared_tmp)!r}, 0o755)")  # the user's own
    out = pysteer("certs", "init", "--dir", str(shared_tmp / "keys"), *NODES)
    assert out.returncode == 2, out.stdout
    assert f"{shared_tmp} is owned by uid {NOBODY}, who could replace" in out.stderr
    assert not (shared_tmp / "keys").exists()
    target = tmp_path / "root-only"
    target.mkdir(mode=0o700)
    link = shared_tmp / "evil"
    as_nobody(f"import os; os.symlink({str(target)!r}, {str(link)!r})")
    out = pysteer("certs", "init", "--dir", str(link / "certs"), *NODES)
    assert out.returncode == 2
    assert "owned by uid 65534" in out.stderr or "is a symlink" in out.stderr, out.stderr
    assert list(target.iterdir()) == []
    # The same symlink, under a parent that is safe: still never followed.
    safe_link = tmp_path / "link"
    safe_link.symlink_to(target)
    out = pysteer("certs", "init", "--dir", str(safe_link / "certs"), *NODES)
    assert out.returncode == 2 and f"{safe_link} is a symlink" in out.stderr, out.stderr
    assert list(target.iterdir()) == []


def test_file_errors_are_one_clear_line(tmp_path: Path) -> None:
    d = tmp_path / "cluster"
    assert pysteer("certs", "init", "--dir", str(d), *NODES).returncode == 0
    (tmp_path / "file").write_text("x")
    (d / "b.pem").unlink()  # a key without its certificate
    cases = [
        (["init", "--dir", str(tmp_path / "file" / "sub"), *NODES], "Not a directory"),
        (
            [
                "bundle",
                "--dir",
                str(d),
                "--node",
                "b",
                "--role",
                "host",
                "--out",
                str(tmp_path / "b"),
            ],
            "b.pem: No such file or directory",
        ),
        (
            ["bundle", "--dir", str(d), "--node", "a", "--role", "host", "--out", "/proc/x/y"],
            "/proc",
        ),
        (
            ["bundle", "--dir", str(d), "--node", "a", "--out", str(tmp_path / "a")],
            "cluster.toml: is a symlink",
        ),
    ]
    for args, message in cases:
        if "is a symlink" in message:  # an operator's link to the config: never followed
            (d / "cluster.toml").symlink_to(tmp_path / "file")
        out = pysteer("certs", *args)
        assert out.returncode == 2, (args, out.stdout)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_force_leaves_no_earlier_service_files(tmp_path: Path) -> None:
    d = tmp_path / "cluster"
    assert (
        pysteer("certs", "init", "--dir", str(d), *NODES, "--service-name", "vip").returncode == 0
    )
    old_ca = (d / "ca.pem").read_bytes()
    out = pysteer("certs", "init", "--dir", str(d), *NODES, "--force")
    assert out.returncode == 0, out.stderr
    assert (d / "ca.pem").read_bytes() != old_ca
    assert not any((d / n).exists() for n in ("service.pem", "service.key", "service-ca.pem"))
    out = pysteer("certs", "init", "--dir", str(d), "--node", "a=b", "--node", "b", "--force")
    assert out.returncode == 2 and "cannot also be named b" in out.stderr, out.stderr


def test_init_killed_midway_leaves_only_whole_files(tmp_path: Path) -> None:
    """kill -9 at any point of `certs init`: every key and certificate there is whole
    (each written fresh, then renamed), and a new run with --force completes."""
    rng = random.Random(11)  # noqa: S311 - a seeded schedule for the kills, not a secret
    d = tmp_path / "cluster"
    many = [arg for i in range(40) for arg in ("--node", f"n{i}")]
    for _ in range(6):
        proc = subprocess.Popen(
            [*INIT, "--dir", str(d), *many, "--force"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.2, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for path in d.iterdir() if d.exists() else ():
            if path.name.endswith(".tmp"):
                continue  # a temporary the kill left: never read, never a key's name
            data = path.read_bytes()
            if path.name == "cluster.key":
                assert len(data) == 32
            elif path.suffix == ".key":
                serialization.load_pem_private_key(data, password=None)
            else:
                assert x509.load_pem_x509_certificates(data), path
    out = subprocess.run(
        [*INIT, "--dir", str(d), *many, "--force"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert all((d / f"n{i}.key").exists() for i in range(40))
    assert [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []  # cleared


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("a=10.0.0.1,[fd00::1],a.example.com", ["10.0.0.1", "fd00::1", "a.example.com"]),
        ("b=*.example.com,node-1", ["*.example.com", "node-1"]),
        ("c", []),
    ],
)
def test_node_names_are_addresses_or_dns_names(spec: str, names: list[str]) -> None:
    from pysteer.certs_cli import parse_nodes  # noqa: PLC0415

    assert list(parse_nodes([spec]).values()) == [names]


@pytest.mark.parametrize("bad", ["not an address!!", "-a.example", "a..b", "x" * 64, "a_b", "*"])
def test_a_name_that_is_neither_is_refused(bad: str) -> None:
    from pysteer.certs_cli import parse_nodes  # noqa: PLC0415
    from pysteer.errors import UsageError  # noqa: PLC0415

    with pytest.raises(UsageError) as info:
        parse_nodes([f"a=10.0.0.1,{bad}"])
    assert str(info.value) == (
        f"node a: {bad!r} is neither an IP address nor a DNS name (letters, digits and "
        "hyphens, in labels joined by dots)"
    )
