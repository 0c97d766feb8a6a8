"""The sealed migration blob, its fencing, and `pysteer certs init`."""

import math
import os
import ssl
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from helpers.blobs import RECV, SECRET, blob

from pysteer.agent.ledger import Ledger, LedgerError
from pysteer.tls.state import TlsState
from pysteer.transfer import (
    MAX_BLOB_AGE,
    MAX_CLOCK_SKEW,
    BlobError,
    new_migration_id,
    open_sealed,
    seal,
)
from pysteer.transfer import blob as blob_module

KEY = os.urandom(32)
AB = {"source": "a", "target": "b"}  # the move most tests seal for: a -> b


def seal_wire(wire: dict, mid: bytes, version: int | None = None) -> bytes:
    """Any plaintext map sealed for a -> b: it passes the AEAD and reaches decoding.
    ``version``: an envelope of that version's layout instead (1: no node names)."""
    plain, nonce = msgpack.packb(wire), os.urandom(12)
    if version is None:
        header = blob_module._header(mid, nonce, "a", "b")
    else:
        header = blob_module._HEADER.pack(b"PSMB", version, mid, nonce)
    return header + ChaCha20Poly1305(KEY).encrypt(nonce, plain, header)


def import_once(ledger: Ledger, sealed: bytes, source: str = "a", target: str = "b") -> None:
    """What the agent's prepare does before restoring anything: open, then claim."""
    opened = open_sealed(sealed, KEY, source=source, target=target)
    ledger.claim(opened.id, sealed_at=opened.t)


def test_seal_and_open_round_trip() -> None:
    b = blob()
    sealed = seal(b, KEY, **AB)
    assert SECRET not in sealed
    assert RECV[:24] not in sealed  # nothing of the state is readable (24 bytes: no chance hit)
    opened = open_sealed(sealed, KEY, expect_id=b.id, **AB)
    assert opened.to_wire() == b.to_wire()
    assert isinstance(opened.tls, TlsState)  # decoded and checked once, keys derived once
    assert "SECRET" not in repr(opened)
    assert SECRET.hex() not in repr(opened)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "failed authentication"),
        (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "failed authentication"),
        (lambda d: b"XXXX" + d[4:], "not a pysteer migration blob"),
        (lambda d: d[:4] + b"\x09" + d[5:], "unknown blob version 9"),
        (lambda d: d[:10], "too short"),
    ],
    ids=["tampered-body", "tampered-ciphertext", "magic", "version", "short"],
)
def test_bad_blobs_are_refused(mangle, message: str) -> None:
    sealed = seal(blob(), KEY, **AB)
    with pytest.raises(BlobError, match=message) as info:
        open_sealed(mangle(sealed), KEY, **AB)
    assert SECRET.hex() not in str(info.value)


def test_wrong_key_and_wrong_id() -> None:
    b = blob()
    sealed = seal(b, KEY, **AB)
    with pytest.raises(BlobError, match="another key"):
        open_sealed(sealed, os.urandom(32), **AB)
    with pytest.raises(BlobError, match="for another migration"):
        open_sealed(sealed, KEY, expect_id=new_migration_id(), **AB)
    # The id is authenticated: moving a blob under another id's envelope fails too.
    forged = sealed[:5] + new_migration_id() + sealed[21:]
    with pytest.raises(BlobError, match="failed authentication"):
        open_sealed(forged, KEY, **AB)
    with pytest.raises(BlobError, match="must be 32 bytes"):
        seal(b, b"short", **AB)


def test_invalid_contents_inside_a_valid_seal() -> None:
    b = blob()
    wire = b.to_wire()
    wire["tcp"]["recv_len"] = 99
    with pytest.raises(BlobError, match=r"invalid blob: .*recv_len says 99 bytes"):
        open_sealed(seal_wire(wire, b.id), KEY, **AB)


# --- the blob's time (review issue 12, item 6) ---------------------------------------------
@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_blob_time_must_be_finite(t: float) -> None:
    b = blob()
    with pytest.raises(BlobError, match="finite"):
        open_sealed(seal_wire(b.to_wire() | {"t": t}, b.id), KEY, **AB)


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (-(MAX_BLOB_AGE + 1), r"stale blob \(61 s old"),
        (MAX_CLOCK_SKEW + 1, r"6 s in the future"),
        (59.0, r"59 s in the future"),  # passed the old symmetric 60 s test
    ],
    ids=["older-than-60s", "beyond-the-skew", "59s-ahead"],
)
def test_blob_time_bounds_are_asymmetric(offset: float, message: str) -> None:
    now = 1.75e9
    sealed = seal(replace(blob(), t=now + offset), KEY, **AB)
    with pytest.raises(BlobError, match=message):
        open_sealed(sealed, KEY, now=now, **AB)


@pytest.mark.parametrize("offset", [-(MAX_BLOB_AGE - 1), 0.0, MAX_CLOCK_SKEW - 1])
def test_blob_time_within_bounds_is_accepted(offset: float) -> None:
    now, b = 1.75e9, blob()
    sealed = seal(replace(b, t=now + offset), KEY, **AB)
    assert open_sealed(sealed, KEY, now=now, **AB).id == b.id


# --- the blob is bound to its source and target (item 7) -----------------------------------
def test_blob_sealed_for_b_is_refused_by_c() -> None:
    sealed = seal(blob(), KEY, **AB)
    with pytest.raises(BlobError, match="the blob is sealed for b, not c"):
        open_sealed(sealed, KEY, source="a", target="c")
    # The names are authenticated: rewriting the target in the envelope breaks the seal.
    at = sealed.index(b"\x01b", 33)
    forged = sealed[:at] + b"\x01c" + sealed[at + 2 :]
    with pytest.raises(BlobError, match="failed authentication"):
        open_sealed(forged, KEY, source="a", target="c")


def test_blob_claiming_source_a_delivered_by_c_is_refused() -> None:
    sealed = seal(blob(), KEY, **AB)
    with pytest.raises(BlobError, match="sealed by a but delivered by c"):
        open_sealed(sealed, KEY, source="c", target="b")


def test_old_blob_version_is_refused_clearly() -> None:
    b = blob()
    v1 = seal_wire(b.to_wire() | {"v": 1}, b.id, version=1)  # what the previous pysteer sent
    with pytest.raises(BlobError, match=r"blob version 1 is from an older pysteer.*upgrade"):
        open_sealed(v1, KEY, **AB)


@pytest.mark.parametrize("name", ["", "Bad_Name", "c\n", "x" * 64, None])
def test_only_node_names_are_sealed(name: str | None) -> None:
    with pytest.raises(BlobError, match="must be a node name"):
        seal(blob(), KEY, source="a", target=name)  # type: ignore[arg-type]
    with pytest.raises(BlobError, match="must be a node name"):
        open_sealed(seal(blob(), KEY, **AB), KEY, source=name, target="b")  # type: ignore[arg-type]


# --- the ledger: replays across a restart and a reboot (item 7) ----------------------------
def test_ledger_refuses_a_second_import() -> None:
    ledger, mid = Ledger(), new_migration_id()
    ledger.claim(mid, sealed_at=time.time())
    with pytest.raises(LedgerError, match="already imported"):
        ledger.claim(mid, sealed_at=time.time())
    ledger.claim(new_migration_id(), sealed_at=time.time())


def test_blob_imported_once_is_refused_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger-b.log"
    ledger = Ledger(path)
    sealed = seal(blob(), KEY, **AB)
    import_once(ledger, sealed)
    epoch = ledger.epoch
    ledger.close()
    restarted = Ledger(path)  # the agent restarted; the machine did not (same file)
    assert restarted.epoch == epoch
    assert path.read_text().splitlines()[0] == f"epoch {epoch!r}"
    with pytest.raises(LedgerError, match="already imported"):
        import_once(restarted, sealed)
    restarted.close()


def test_blob_sealed_before_the_ledger_epoch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger-b.log"
    ledger = Ledger(path)
    sealed = seal(blob(), KEY, **AB)
    import_once(ledger, sealed)
    ledger.close()
    path.unlink()  # a reboot: /run is tmpfs, the ledger is gone
    time.sleep(0.01)  # (a real reboot takes longer than the clocks' skew)
    rebooted = Ledger(path)
    with pytest.raises(LedgerError, match="sealed before this node's import ledger started"):
        import_once(rebooted, sealed)  # within 60 s, and unknown to the new ledger
    import_once(rebooted, seal(blob(), KEY, **AB))  # a blob sealed since is fine
    with pytest.raises(LedgerError, match="sealed before"):
        rebooted.claim(new_migration_id(), sealed_at=math.nan)
    rebooted.close()


def test_ledger_file_without_an_epoch_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "ledger-b.log"
    mid = new_migration_id()
    path.write_text(f"{mid.hex()} committed {time.time():.3f}\n")  # an older pysteer's file
    before = time.time()
    ledger = Ledger(path)
    assert ledger.epoch >= before and ledger.outcome(mid) == "committed"
    with pytest.raises(LedgerError, match="sealed before"):
        ledger.claim(new_migration_id(), sealed_at=before - 1)
    ledger.close()


def test_certs_init(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "pysteer", "certs", "init", "--dir", str(tmp_path)]
    out = subprocess.run(
        [*run, "--node", "a=a,10.0.0.2", "--node", "steer"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for key in ("ca.key", "a.key", "steer.key", "cluster.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    assert len((tmp_path / "cluster.key").read_bytes()) == 32
    leaf, ca = x509.load_pem_x509_certificates((tmp_path / "a.pem").read_bytes())
    assert leaf.issuer == ca.subject
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["a", "10.0.0.2"]
    # The pair works for mutual TLS, as server and as client.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "a.pem", tmp_path / "a.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(tmp_path / "steer.pem", tmp_path / "steer.key")
    again = subprocess.run([*run, "--node", "a"], capture_output=True, text=True, check=False)
    assert again.returncode == 2
    assert "already holds a cluster" in again.stderr
    bad = subprocess.run(
        [*run, "--node", "Bad_Name", "--force"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2
    assert "invalid node name 'Bad_Name'" in bad.stderr
