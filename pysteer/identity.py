"""Who is on the other end of a control link: TLS contexts and the peer identity check.

Chaining to the cluster CA only says a certificate was issued by it. That CA may have
issued certificates for other purposes, and a chain alone says nothing about *which*
member is calling. So every control-plane link, on both ends, also checks that the peer's
certificate

- is a node's: its extendedKeyUsage allows both serverAuth and clientAuth, as every
  node certificate does (a node is a server to its peers and a client of them). So the
  service certificate (serverAuth only), a client-only certificate, and one without the
  extension ("any purpose" to OpenSSL) are all refused, on either end;
- names exactly one identity: its common name, which must also be one of its DNS
  subjectAltNames (so CN and SAN cannot disagree), and no other allowed name in the SAN;
- is one the caller allows: a node of the cluster and, on a link we opened, the one node
  we meant to reach.

Contexts never log keys: Python's ``create_default_context`` honours ``SSLKEYLOGFILE``,
which would write the control links' secrets to a file, so it is not used here.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


class IdentityError(ssl.SSLError):
    """A verified certificate that is not an allowed identity here; the message says why
    (it names the certificate's subject, which is public, never anything secret)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "identity refused"


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """mTLS for a listener: clients need a certificate from ``ca`` (then ``peer_node``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.keylog_filename = None
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """mTLS for a link we open: the server's name is checked by OpenSSL, then by
    ``peer_node`` against the one node we meant to reach."""
    # Not create_default_context: it honours SSLKEYLOGFILE (and creates that file).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    ctx.keylog_filename = None
    ctx.load_verify_locations(ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    return ctx


def certificate_node(
    cert: x509.Certificate, allowed: Collection[str], expect: str | None = None
) -> str:
    """The one allowed identity ``cert`` names (``expect``, if given: the node we meant
    to reach). Any problem is an IdentityError."""
    try:
        return _certificate_node(cert, allowed, expect)
    except IdentityError:
        raise
    except Exception as exc:  # a malformed extension: cryptography raises several kinds
        raise IdentityError(f"certificate cannot be read ({type(exc).__name__})") from None


def _certificate_node(cert: x509.Certificate, allowed: Collection[str], expect: str | None) -> str:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no extendedKeyUsage (any purpose)") from None
    missing = [name for oid, name in _EKU_NAMES.items() if oid not in usages]
    if missing:
        have = ", ".join(_EKU_NAMES.get(u, u.dotted_string) for u in usages) or "none"
        raise IdentityError(
            f"certificate is not a node's: no {' or '.join(missing)} (it allows: {have})"
        )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise IdentityError("certificate must have exactly one common name")
    cn = cns[0].value
    try:
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = dns.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if cn not in names:
        raise IdentityError(f"common name {cn!r} is not among the certificate's DNS names")
    if cn not in allowed:
        raise IdentityError(f"{cn!r} is not an identity allowed here")
    others = sorted(set(names) & set(allowed) - {cn})
    if others:
        raise IdentityError(f"certificate {cn!r} also names {', '.join(others)}")
    if expect is not None and cn != expect:
        raise IdentityError(f"certificate is {cn!r}'s, not {expect!r}'s")
    return cn


def peer_node(
    tls: ssl.SSLObject | ssl.SSLSocket, allowed: Collection[str], expect: str | None = None
) -> str:
    """The identity of the verified peer of ``tls``: one of ``allowed`` (all the cluster's
    names), and ``expect`` when we dialled a particular node."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("the peer sent no certificate")
    return certificate_node(x509.load_der_x509_certificate(der), allowed, expect)
