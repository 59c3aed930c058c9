"""Certificates for the benchmarks: a meshlib CA and one certificate per service, written as PEM files."""

from __future__ import annotations

from pathlib import Path


def issue_files(tmp: Path, services: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``{service: {"cert": ..., "key": ..., "ca": ...}}``: paths of each service's chain, key and the CA roots."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from meshlib.security.ca import CertificateAuthority

    ca = CertificateAuthority.init(tmp / "ca")
    files: dict[str, dict[str, str]] = {}
    for service in services:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = ca.issue(key.public_key(), service)
        paths = {"cert": tmp / f"{service}.crt", "key": tmp / f"{service}.key", "ca": tmp / "ca.crt"}
        paths["cert"].write_bytes(issued.pem() + issued.chain_pem())
        paths["key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        paths["ca"].write_bytes(ca.roots_pem())
        files[service] = {k: str(v) for k, v in paths.items()}
    return files
