"""The mesh CA: an EC P-256 root kept in the control plane's state directory (or a root/intermediate the user
brings), issuing short-lived leaf certificates from CSRs. Private keys of instances never come here."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigurationError
from ..files import write_atomic
from ..settings import validate_service_name
from .spiffe import SCRAPE_SERVER_NAME, SpiffeId

MAX_LEAF_LIFETIME = dt.timedelta(days=7)
DEFAULT_LEAF_LIFETIME = dt.timedelta(hours=24)
ROOT_LIFETIME = dt.timedelta(days=3650)
CLOCK_SKEW = dt.timedelta(minutes=1)


class CsrError(ValueError):
    """The CSR is malformed, badly signed, or asks for something it may not have."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """A private key, readable by its owner only (0600), written atomically (``files.write_atomic``)."""
    write_atomic(path, data, private=True)


#: Curves accepted in CSRs; with RSA, at least MIN_RSA_BITS.
ACCEPTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
MIN_RSA_BITS = 2048


def check_key_strength(public_key: object) -> None:
    """CsrError unless the key is EC P-256/P-384/P-521 or RSA of at least 2048 bits."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ACCEPTED_CURVES:
            raise CsrError(f"EC curve {public_key.curve.name} is too weak or unsupported: use P-256, P-384 or P-521")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CsrError(f"RSA key of {public_key.key_size} bits is too weak: use at least {MIN_RSA_BITS} bits")
    else:
        raise CsrError("only EC and RSA keys are accepted")


def load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigurationError(f"{source}: not a PEM certificate ({exc})") from None
    if not certs:
        raise ConfigurationError(f"{source}: no certificate found")
    return certs


def load_private_key(data: bytes, source: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigurationError(f"{source}: only EC and RSA keys are supported")
    return key


@dataclass
class IssuedCertificate:
    certificate: x509.Certificate
    chain: list[x509.Certificate]  # intermediates up to (not including) the root

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


class CertificateAuthority:
    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        roots: list[x509.Certificate],
        chain: list[x509.Certificate],
        trust_domain: str = "mesh.local",
    ) -> None:
        self.cert = cert
        self.key = key
        self.roots = roots
        self.chain = chain  # the CA's own chain above it, when it is an intermediate
        self.trust_domain = trust_domain
        if cert.not_valid_after_utc <= _now():
            raise ConfigurationError("the CA certificate has expired")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise ConfigurationError("the CA certificate is not a CA (basicConstraints CA:TRUE is missing)")

    # -- creating and loading -----------------------------------------------------------------------

    @classmethod
    def init(cls, state_dir: str | Path, trust_domain: str = "mesh.local") -> CertificateAuthority:
        """Create a new root in ``state_dir`` (ca.crt, ca.key); refuses to overwrite an existing one."""
        state = Path(state_dir)
        if (state / "ca.key").exists():
            raise ConfigurationError(f"{state / 'ca.key'} exists already: the CA is initialised")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshlib root CA ({trust_domain})"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(
            state / "ca.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        (state / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (state / "trust-domain").write_text(trust_domain)
        return cls(cert, key, [cert], [], trust_domain)

    @classmethod
    def load(cls, state_dir: str | Path) -> CertificateAuthority:
        state = Path(state_dir)
        trust_domain_file = state / "trust-domain"
        trust_domain = trust_domain_file.read_text().strip() if trust_domain_file.exists() else "mesh.local"
        return cls.from_files(state / "ca.crt", state / "ca.key", None, trust_domain)

    @classmethod
    def from_files(
        cls,
        cert_file: str | Path,
        key_file: str | Path,
        bundle_file: str | Path | None,
        trust_domain: str = "mesh.local",
    ) -> CertificateAuthority:
        """Bring your own CA: a root, or an intermediate with its chain (in ``cert_file`` after the CA cert, or in
        ``bundle_file`` with the roots)."""
        try:
            certs = load_certificates(Path(cert_file).read_bytes(), str(cert_file))
            key = load_private_key(Path(key_file).read_bytes(), str(key_file))
        except OSError as exc:
            raise ConfigurationError(f"cannot read the CA: {exc}") from None
        cert, above = certs[0], certs[1:]
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ConfigurationError(f"{key_file} is not the private key of {cert_file}")
        extra: list[x509.Certificate] = []
        if bundle_file is not None:
            try:
                extra = load_certificates(Path(bundle_file).read_bytes(), str(bundle_file))
            except OSError as exc:
                raise ConfigurationError(f"cannot read {bundle_file}: {exc}") from None
        everything = [*above, *extra]
        roots = [c for c in everything if c.issuer == c.subject] or ([cert] if cert.issuer == cert.subject else [])
        if not roots:
            raise ConfigurationError(f"{cert_file} is an intermediate: give its root in the bundle file")
        chain = [c for c in above if c.issuer != c.subject]
        return cls(cert, key, roots, chain, trust_domain)

    # -- issuing ------------------------------------------------------------------------------------

    def roots_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    def sign_csr(
        self, csr_pem: bytes, service: str, namespace: str = "default", lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME
    ) -> IssuedCertificate:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrError(f"not a PEM certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify")
        try:
            validate_service_name(service)
            validate_service_name(namespace)
        except ConfigurationError as exc:
            raise CsrError(str(exc)) from None
        public_key = csr.public_key()
        check_key_strength(public_key)
        assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        return self.issue(public_key, service, namespace, lifetime)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        service: str,
        namespace: str = "default",
        lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME,
    ) -> IssuedCertificate:
        identity = SpiffeId(self.trust_domain, namespace, service)
        now = _now()
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                        x509.NameAttribute(NameOID.COMMON_NAME, service),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(identity.uri),
                        x509.DNSName(identity.dns_name),
                        x509.DNSName(SCRAPE_SERVER_NAME),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(self.key, hashes.SHA256())
        chain = [self.cert] if self.cert.issuer != self.cert.subject else []
        return IssuedCertificate(cert, [*chain, *self.chain])


def issue_server_certificate(
    ca: CertificateAuthority, names: list[str], lifetime: dt.timedelta = dt.timedelta(days=30)
) -> tuple[bytes, bytes]:
    """A TLS server certificate for the control plane itself (DNS and IP SANs), signed by the mesh CA, so that
    instances can reach it over https:// and verify it against the mesh root. Returns (cert chain PEM, key PEM)."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "control-plane")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + lifetime, ca.cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    chain = [ca.cert] if ca.cert.issuer != ca.cert.subject else []
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain, *ca.chain])
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain_pem, key_pem


def verify_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False
