"""Certificates made with ``cryptography``: a CA, and the leaf certificates it signs.

Used by ``pysteer certs init`` and by the tests. Keys are RSA-2048, ECDSA P-256 or
Ed25519. Every leaf says what it may do, so a certificate cannot serve as another kind:
``usage`` is ``"server"`` (serverAuth only: the service certificate clients see),
``"client"`` (clientAuth only) or ``"node"`` (both: a cluster member is a server to its
peers and a client of them); ``"any"`` leaves the extendedKeyUsage out, as many older
certificates do, and exists so that tests can show pysteer's links refuse it. keyUsage
allows signatures only (key encipherment too for RSA, whose TLS 1.2 key exchange needs it).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_KINDS = ("rsa", "ecdsa", "ed25519")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded; ``chain_pem`` adds the issuer."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    chain_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"key kind must be one of {', '.join(KEY_KINDS)}, not {kind!r}")


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _sign_hash(key) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_usage(*, certs: bool, encipher: bool = False) -> x509.KeyUsage:
    """Signatures; certificate and CRL signing for a CA (``certs``); key encipherment for
    an RSA leaf (``encipher``: TLS 1.2's RSA key exchange needs it)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certs,
        crl_sign=certs,
        encipher_only=False,
        decipher_only=False,
    )


def key_matches(key, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private key of ``cert``."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


USAGES = {
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "node": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    "any": [],
}


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str = "pysteer test CA", kind: str = "ecdsa", days: int = 30) -> None:
        self._key = _key(kind)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(certs=True), critical=True)
            .sign(self._key, _sign_hash(self._key))
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        """An existing CA (``certs issue`` adds or renews one node with it)."""
        ca = cls.__new__(cls)
        ca.cert = x509.load_pem_x509_certificate(cert_pem)
        ca._key = serialization.load_pem_private_key(key_pem, password=None)
        if not key_matches(ca._key, ca.cert):
            raise ValueError("the CA key does not belong to the CA certificate")
        ca.cert_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
        return ca

    def key_pem(self) -> bytes:
        """The CA's private key, PEM. Whoever holds it can mint cluster members."""
        return _pem_key(self._key)

    def issue(
        self,
        common_name: str,
        *,
        names: Sequence[str] = (),
        kind: str = "ecdsa",
        usage: str = "server",
        days: int = 30,
    ) -> Issued:
        """A leaf certificate for ``usage`` (server, client or node): DNS names and IP
        addresses in ``names`` go into the SAN."""
        key = _key(kind)
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = []
        for name in names or [common_name]:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        if usage not in USAGES:
            raise ValueError(f"usage must be one of {', '.join(USAGES)}, not {usage!r}")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                _key_usage(certs=False, encipher=isinstance(key, rsa.RSAPrivateKey)), critical=True
            )
        )
        if USAGES[usage]:
            builder = builder.add_extension(x509.ExtendedKeyUsage(USAGES[usage]), critical=False)
        cert = builder.sign(self._key, _sign_hash(self._key))
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        return Issued(cert_pem=cert_pem, key_pem=_pem_key(key), chain_pem=cert_pem + self.cert_pem)
