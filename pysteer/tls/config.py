"""Server-side TLS configuration, and the OpenSSL context it builds for handshakes.

The context is complete before any connection exists (pyOpenSSL refuses later changes):
certificate chain and key (RSA, ECDSA or Ed25519), optional client-certificate
verification (mTLS), ALPN, minimum version, AEAD-only suites, and the key-log callback
that hands traffic secrets to the connection that owns each handshake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from pysteer.tls.suites import (
    BY_NAME,
    OPENSSL_NAMES,
    TLS12,
    TLS12_CIPHER_LIST,
    TLS13,
    TLS13_CIPHERSUITES,
)


class TlsConfigError(ValueError):
    """The TLS configuration is unusable; the message says which part."""


_VERSIONS = {TLS12: SSL.TLS1_2_VERSION, TLS13: SSL.TLS1_3_VERSION}


def _keylog(conn: SSL.Connection, line: bytes) -> None:
    owner = conn.get_app_data()
    if owner is not None:
        owner.on_keylog(line)


class ServerConfig:
    """What a TLS server needs; ``context`` is shared by all its connections."""

    def __init__(
        self,
        cert_chain_pem: bytes,
        key_pem: bytes,
        *,
        client_ca_pem: bytes | None = None,
        alpn: Sequence[str] = (),
        min_version: str = TLS12,
        suites: Sequence[str] | None = None,
        ecdh_curve: ec.EllipticCurve | None = None,
    ) -> None:
        """``suites``: IANA names to allow (default: every suite pysteer carries).
        ``ecdh_curve``: offer only this key-exchange group (default: OpenSSL's list)."""
        if min_version not in _VERSIONS:
            raise TlsConfigError(f"min_version must be {TLS12} or {TLS13}, not {min_version!r}")
        self.alpn = tuple(alpn)
        self.min_version = min_version
        self.verify_clients = client_ca_pem is not None
        try:
            chain = x509.load_pem_x509_certificates(cert_chain_pem)
        except ValueError:
            raise TlsConfigError("cert_chain_pem holds no PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsConfigError("key_pem is not an unencrypted PEM private key") from None
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(_VERSIONS[min_version])
        _set_suites(ctx, suites, min_version)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        try:
            ctx.check_privatekey()
        except SSL.Error:
            raise TlsConfigError("the private key does not match the certificate") from None
        if ecdh_curve is not None:
            ctx.set_tmp_ecdh(ecdh_curve)
        if client_ca_pem is not None:
            _verify_clients(ctx, client_ca_pem)
        if self.alpn:
            ctx.set_alpn_select_callback(self._select_alpn)
        ctx.set_session_id(b"pysteer")  # TLS 1.2 session-ID resumption; tickets are on too
        ctx.set_keylog_callback(_keylog)
        self.context = ctx

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> Any:
        for proto in self.alpn:
            if proto.encode() in offered:
                return proto.encode()
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def __repr__(self) -> str:
        mtls = self.verify_clients
        return f"ServerConfig(min_version={self.min_version}, alpn={self.alpn}, mtls={mtls})"


def _verify_clients(ctx: SSL.Context, client_ca_pem: bytes) -> None:
    """mTLS: require a client certificate signed by one of these CAs."""
    try:
        cas = x509.load_pem_x509_certificates(client_ca_pem)
    except ValueError:
        raise TlsConfigError("client_ca_pem holds no PEM certificate") from None
    store = ctx.get_cert_store()
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))  # type: ignore[union-attr]
        ctx.add_client_ca(ca)  # type: ignore[arg-type]
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _accept_verified)


def _set_suites(ctx: SSL.Context, suites: Sequence[str] | None, min_version: str) -> None:
    tls12, tls13 = _suite_lists(suites)
    if not tls13 and min_version == TLS13:
        raise TlsConfigError("min_version TLSv1.3 with no TLS 1.3 suite allowed")
    if tls12:
        ctx.set_cipher_list(tls12.encode())
    else:
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    if tls13:
        ctx.set_tls13_ciphersuites(tls13.encode())
    else:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)


def _suite_lists(suites: Sequence[str] | None) -> tuple[str, str]:
    """OpenSSL's TLS 1.2 cipher list and TLS 1.3 ciphersuites string for ``suites``."""
    if suites is None:
        return TLS12_CIPHER_LIST, TLS13_CIPHERSUITES
    unknown = [s for s in suites if s not in BY_NAME]
    if unknown or not suites:
        raise TlsConfigError(f"unknown or no cipher suites: {', '.join(unknown) or 'none given'}")
    tls13 = [s for s in suites if BY_NAME[s].version == TLS13]
    tls12 = [OPENSSL_NAMES[s] for s in suites if BY_NAME[s].version == TLS12]
    return ":".join(tls12), ":".join(tls13)


def _accept_verified(conn: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    return bool(ok)
