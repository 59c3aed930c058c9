"""TLS contexts for mesh traffic and reading the peer's identity from its certificate.

Certificates are swapped into the live contexts with ``load_cert_chain``: OpenSSL copies a context's certificate
into each connection when the connection is created (under the GIL here), so handshakes in flight keep theirs,
new ones get the new certificate, and open connections are untouched.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .spiffe import SpiffeId


def client_context() -> ssl.SSLContext:
    """Verifies the server against the mesh roots and by hostname (``<service>.<ns>.mesh``), presents our cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def server_context(require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@lru_cache(maxsize=4096)
def identity_from_der(der: bytes) -> SpiffeId | None:
    """The mesh SPIFFE ID in a certificate's URI SANs, or None (no SAN, not a mesh ID)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            try:
                return SpiffeId.parse(uri)
            except ValueError:
                return None
    return None


def identity_from_pem(pem: str | bytes) -> SpiffeId | None:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        der = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    except ValueError:
        return None
    return identity_from_der(der)


def tls_scope_extension(ssl_object: Any) -> dict[str, Any]:
    """The ASGI TLS extension (``scope["extensions"]["tls"]``) for a finished handshake, plus the peer's SPIFFE
    ID parsed once per connection under ``mesh.peer_identity``."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    chain = []
    name = None
    identity = None
    if der:
        cert = x509.load_der_x509_certificate(der)
        chain = [cert.public_bytes(serialization.Encoding.PEM).decode()]
        name = cert.subject.rfc4514_string()
        identity = identity_from_der(der)
    version = ssl_object.version() if ssl_object is not None else None
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}.get(version or ""),
        "cipher_suite": None,
        "mesh.peer_identity": identity,
    }
