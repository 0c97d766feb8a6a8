"""The cipher suites pysteer's record layer carries: TLS 1.3 and TLS 1.2 ECDHE with AEAD."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

TLS13, TLS12 = "TLSv1.3", "TLSv1.2"


@dataclass(frozen=True)
class Suite:
    name: str  # IANA name
    version: str
    aead: type  # AESGCM or ChaCha20Poly1305
    key_len: int
    hash: str  # "sha256" or "sha384"

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return hashes.SHA256() if self.hash == "sha256" else hashes.SHA384()

    @property
    def hash_len(self) -> int:
        return 32 if self.hash == "sha256" else 48

    @property
    def fixed_iv_len(self) -> int:
        """TLS 1.2 write IV length: a 4-byte salt for GCM, a 12-byte IV for ChaCha20."""
        return 4 if self.aead is AESGCM and self.version == TLS12 else 12

    @property
    def record_limit(self) -> int:
        """Records per key before RFC 8446 §5.5 wants a new one (we rekey well before)."""
        return 1 << 24 if self.aead is AESGCM else 1 << 60


_ALL = [
    Suite("TLS_AES_128_GCM_SHA256", TLS13, AESGCM, 16, "sha256"),
    Suite("TLS_AES_256_GCM_SHA384", TLS13, AESGCM, 32, "sha384"),
    Suite("TLS_CHACHA20_POLY1305_SHA256", TLS13, ChaCha20Poly1305, 32, "sha256"),
]
# TLS 1.2: OpenSSL name -> (IANA name, AEAD, key length, PRF hash); ECDHE and AEAD only.
_GCM128, _GCM256 = (AESGCM, 16, "sha256"), (AESGCM, 32, "sha384")
_CHACHA = (ChaCha20Poly1305, 32, "sha256")
_TLS12 = {
    "ECDHE-RSA-AES128-GCM-SHA256": ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", *_GCM128),
    "ECDHE-ECDSA-AES128-GCM-SHA256": ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", *_GCM128),
    "ECDHE-RSA-AES256-GCM-SHA384": ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", *_GCM256),
    "ECDHE-ECDSA-AES256-GCM-SHA384": ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", *_GCM256),
    "ECDHE-RSA-CHACHA20-POLY1305": ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", *_CHACHA),
    "ECDHE-ECDSA-CHACHA20-POLY1305": ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", *_CHACHA),
}
_ALL += [Suite(iana, TLS12, aead, klen, h) for iana, aead, klen, h in _TLS12.values()]

BY_NAME: dict[str, Suite] = {s.name: s for s in _ALL}
_BY_OPENSSL = {
    **{s.name: s for s in _ALL if s.version == TLS13},
    **{o: BY_NAME[v[0]] for o, v in _TLS12.items()},
}

#: IANA name -> OpenSSL's name for the TLS 1.2 suites.
OPENSSL_NAMES = {v[0]: o for o, v in _TLS12.items()}

#: OpenSSL configuration strings for exactly these suites.
TLS12_CIPHER_LIST = ":".join(_TLS12)
TLS13_CIPHERSUITES = ":".join(s.name for s in _ALL if s.version == TLS13)


def from_openssl(name: str) -> Suite:
    """The suite OpenSSL negotiated, by OpenSSL's name for it."""
    try:
        return _BY_OPENSSL[name]
    except KeyError:
        raise ValueError(f"cipher suite {name} is not one pysteer carries") from None
