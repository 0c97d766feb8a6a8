"""The sealed migration blob, its fencing, and `pysteer certs init`."""

import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from helpers.blobs import RECV, SECRET, blob

from pysteer.transfer import (
    BlobError,
    ImportLedger,
    new_migration_id,
    open_sealed,
    seal,
)
from pysteer.transfer import blob as blob_module

KEY = os.urandom(32)


def test_seal_and_open_round_trip() -> None:
    b = blob()
    sealed = seal(b, KEY)
    assert SECRET not in sealed
    assert RECV[:24] not in sealed  # nothing of the state is readable (24 bytes: no chance hit)
    opened = open_sealed(sealed, KEY, expect_id=b.id)
    assert opened == b
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
    sealed = seal(blob(), KEY)
    with pytest.raises(BlobError, match=message) as info:
        open_sealed(mangle(sealed), KEY)
    assert SECRET.hex() not in str(info.value)


def test_wrong_key_and_wrong_id() -> None:
    b = blob()
    sealed = seal(b, KEY)
    with pytest.raises(BlobError, match="another key"):
        open_sealed(sealed, os.urandom(32))
    with pytest.raises(BlobError, match="for another migration"):
        open_sealed(sealed, KEY, expect_id=new_migration_id())
    # The id is authenticated: moving a blob under another id's envelope fails too.
    forged = sealed[:5] + new_migration_id() + sealed[21:]
    with pytest.raises(BlobError, match="failed authentication"):
        open_sealed(forged, KEY)
    with pytest.raises(BlobError, match="must be 32 bytes"):
        seal(b, b"short")


def test_invalid_contents_inside_a_valid_seal() -> None:
    b = blob()
    wire = b.to_wire()
    wire["tcp"]["recv_len"] = 99
    plain = msgpack.packb(wire)
    nonce = os.urandom(12)
    header = blob_module._HEADER.pack(b"PSMB", 1, b.id, nonce)

    sealed = header + ChaCha20Poly1305(KEY).encrypt(nonce, plain, header)
    with pytest.raises(BlobError, match=r"invalid blob: .*recv_len says 99 bytes"):
        open_sealed(sealed, KEY)


def test_ledger_refuses_a_second_import() -> None:
    ledger, mid = ImportLedger(), new_migration_id()
    ledger.claim(mid)
    with pytest.raises(BlobError, match="already imported"):
        ledger.claim(mid)
    ledger.claim(new_migration_id())


def test_certs_init(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "pysteer", "certs", "init", "--dir", str(tmp_path)]
    out = subprocess.run([*run, "--node", "a=a,10.0.0.2", "--node", "steer"],
                         capture_output=True, text=True, check=False)  # fmt: skip
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
    bad = subprocess.run([*run, "--node", "Bad_Name", "--force"], capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert bad.returncode == 2
    assert "invalid node name 'Bad_Name'" in bad.stderr
