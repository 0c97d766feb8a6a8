"""Fixtures for the TLS tests: one CA, ECDSA and RSA server certificates, a client cert."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from pysteer.certs import CertificateAuthority, Issued


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    ca_file: Path
    servers: dict[str, Issued]  # key kind -> server certificate for localhost
    client: Issued
    client_cert_file: Path
    client_key_file: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority()
    servers = {
        kind: ca.issue("localhost", names=["localhost", "127.0.0.1"], kind=kind)
        for kind in ("ecdsa", "rsa", "ed25519")
    }
    client = ca.issue("client-7", kind="ecdsa", usage="client")
    (tmp / "ca.pem").write_bytes(ca.cert_pem)
    (tmp / "client.pem").write_bytes(client.cert_pem)
    (tmp / "client.key").write_bytes(client.key_pem)
    (tmp / "client.key").chmod(0o600)
    return Pki(ca, tmp / "ca.pem", servers, client, tmp / "client.pem", tmp / "client.key")
