"""Key schedules: TLS 1.3 HKDF-Expand-Label (RFC 8446 §7) and the TLS 1.2 PRF (RFC 5246 §5)."""

from __future__ import annotations

import hmac
import struct

from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from pysteer.tls.suites import Suite


def hkdf_expand_label(suite: Suite, secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"  # empty context
    return HKDFExpand(suite.hash_algorithm, length, info).derive(secret)


def traffic_key_iv(suite: Suite, secret: bytes) -> tuple[bytes, bytes]:
    """TLS 1.3 write key and IV from a traffic secret."""
    return (
        hkdf_expand_label(suite, secret, b"key", suite.key_len),
        hkdf_expand_label(suite, secret, b"iv", 12),
    )


def next_traffic_secret(suite: Suite, secret: bytes) -> bytes:
    """application_traffic_secret_N+1, after a KeyUpdate (RFC 8446 §7.2)."""
    return hkdf_expand_label(suite, secret, b"traffic upd", suite.hash_len)


def prf12(suite: Suite, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.2 PRF: P_hash(secret, label + seed) with the suite's hash."""
    digest, seed = suite.hash, label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.digest(secret, a, digest)
        out += hmac.digest(secret, a + seed, digest)
    return out[:length]


def key_block12(
    suite: Suite, master: bytes, client_random: bytes, server_random: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    """(client key, server key, client IV, server IV) of a TLS 1.2 AEAD suite."""
    klen, ivlen = suite.key_len, suite.fixed_iv_len
    block = prf12(
        suite, master, b"key expansion", server_random + client_random, 2 * (klen + ivlen)
    )
    return (
        block[:klen],
        block[klen : 2 * klen],
        block[2 * klen : 2 * klen + ivlen],
        block[2 * klen + ivlen :],
    )
