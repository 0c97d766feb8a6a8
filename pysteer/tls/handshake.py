"""The handshake half of the kernel-TLS model: OpenSSL on memory BIOs, fed record by record.

OpenSSL gets exactly the records of the handshake, one at a time, and nothing after the
record that completes it: whatever follows in the same segment (Python ssl and s_client
send application data with their Finished) belongs to pysteer's record layer. The
key-log callback hands us the traffic secrets (TLS 1.3) or the master secret (TLS 1.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from OpenSSL import SSL, crypto

from pysteer.tls.config import ServerConfig
from pysteer.tls.record import APPLICATION_DATA
from pysteer.tls.secret import Secret
from pysteer.tls.suites import TLS13, Suite, from_openssl

try:  # pyOpenSSL has no session_reused(); its cffi binding exposes OpenSSL's
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover
    _lib = None

_HEADER = struct.Struct("!BHH")


class HandshakeError(Exception):
    """The handshake failed; ``output`` holds what OpenSSL sent (an alert, usually)."""

    def __init__(self, reason: str, output: bytes) -> None:
        super().__init__(reason)
        self.output = output


@dataclass(frozen=True)
class HandshakeResult:
    version: str
    suite: Suite
    secrets: dict[str, Secret] = field(repr=False)  # key-log label -> secret
    client_random: bytes = field(repr=False)
    server_random: bytes = field(repr=False)
    sni: str | None
    alpn: str | None
    resumed: bool
    peer_chain: tuple[bytes, ...] = field(repr=False)
    tickets_sent: int  # TLS 1.3 records (NewSessionTickets) sent after the Finished
    client_hellos: int  # 2 after a HelloRetryRequest


def count_records(data: bytes, content_type: int) -> int:
    """How many whole records of ``content_type`` ``data`` holds."""
    count, pos = 0, 0
    while pos + 5 <= len(data):
        ctype, _version, length = _HEADER.unpack_from(data, pos)
        count += ctype == content_type
        pos += 5 + length
    return count


class OpenSSLHandshake:
    def __init__(self, config: ServerConfig) -> None:
        self._ssl = SSL.Connection(config.context, None)
        self._ssl.set_accept_state()
        self._ssl.set_app_data(self)
        self._secrets: dict[str, Secret] = {}
        self.client_hellos = 0

    def on_keylog(self, line: bytes) -> None:
        parts = line.split()
        if len(parts) == 3:
            self._secrets[parts[0].decode()] = Secret(bytes.fromhex(parts[2].decode()))

    def _drain(self) -> bytes:
        out = bytearray()
        while True:
            try:
                out += self._ssl.bio_read(65536)
            except SSL.WantReadError:
                return bytes(out)

    def feed(self, record: bytes) -> tuple[bool, bytes]:
        """Give OpenSSL one record; returns (handshake complete, bytes to send)."""
        if record[:1] == b"\x16" and record[5:6] == b"\x01":  # a plaintext ClientHello
            self.client_hellos += 1
        self._ssl.bio_write(record)
        try:
            self._ssl.do_handshake()
        except SSL.WantReadError:
            return False, self._drain()
        except SSL.Error as exc:
            reasons = [r[2] for r in exc.args[0] if len(r) == 3] if exc.args else []
            raise HandshakeError(
                "; ".join(str(r) for r in reasons) or "handshake failed", self._drain()
            ) from None
        return True, self._drain()

    def result(self, final_output: bytes) -> HandshakeResult:
        ssl = self._ssl
        version = ssl.get_protocol_version_name()
        suite = from_openssl(ssl.get_cipher_name() or "")
        if suite.version != version:
            raise HandshakeError(f"{suite.name} negotiated with {version}", b"")
        chain: list[bytes] = []
        leaf = ssl.get_peer_certificate()
        for cert in ([leaf] if leaf else []) + list(ssl.get_peer_cert_chain() or []):
            der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
            if der not in chain:
                chain.append(der)
        alpn = ssl.get_alpn_proto_negotiated()
        sni = ssl.get_servername()
        resumed = bool(_lib.SSL_session_reused(ssl._ssl)) if _lib else False
        result = HandshakeResult(
            version=version,
            suite=suite,
            secrets=dict(self._secrets),
            client_random=ssl.client_random() or b"",
            server_random=ssl.server_random() or b"",
            sni=sni.decode() if sni else None,
            alpn=alpn.decode() if alpn else None,
            resumed=resumed,
            peer_chain=tuple(chain),
            tickets_sent=count_records(final_output, APPLICATION_DATA) if version == TLS13 else 0,
            client_hellos=self.client_hellos,
        )
        if version != TLS13 and "CLIENT_RANDOM" not in result.secrets:
            master = ssl.master_key()
            if master:
                result.secrets["CLIENT_RANDOM"] = Secret(master)
        # OpenSSL is never used again for this connection.
        ssl.set_app_data(None)
        self._secrets.clear()
        return result
