"""The CA's certificate work, pure (no I/O): keys, the self-signed root, CSR checks, signing
workload certificates, and checking a brought-in chain.

Workload certificates follow SPIFFE's X.509-SVID: one URI SAN (the identity), not a CA,
digitalSignature + keyEncipherment, server and client auth. Their not-before is set back a little
so that a peer whose clock runs behind accepts them at once, and their not-after never passes the
signing certificate's.
"""

from __future__ import annotations

import datetime
import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from istio.model.identity import SpiffeId

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
DEFAULT_ORG = "k8s.cluster.local"
ROOT_COMMON_NAME = "Istio CA root"
CLOCK_SKEW = datetime.timedelta(minutes=5)
MIN_RSA_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)


class KeyType(enum.Enum):
    ECDSA = "ecdsa"  # P-256
    RSA = "rsa"  # 2048 bits


class CsrError(ValueError):
    """A CSR the CA will not sign; the message says why."""


class ChainError(ValueError):
    """Brought-in CA files that do not form a valid chain; the message says which and why."""


def generate_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_key(pem: bytes, source: str) -> PrivateKey:
    """ChainError naming `source` when the PEM is not an unencrypted EC or RSA key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        # The library's message never quotes the key; keep it that way by not adding more.
        raise ChainError(f"{source}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ChainError(f"{source}: only EC and RSA keys are supported")
    return key


def load_certs(pem: bytes, source: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise ChainError(f"{source}: not PEM certificates ({error})") from None
    return certs


def same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    der = serialization.Encoding.DER
    info = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, info) == cert.public_key().public_bytes(der, info)


def make_root(
    key: PrivateKey, *, org: str, ttl: datetime.timedelta, now: datetime.datetime
) -> x509.Certificate:
    """A self-signed root, as 0.2's: O=org, a CA that signs certificates. Its CN sets it apart
    from the certificates it signs (subject O=org), which would otherwise look self-signed."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, ROOT_COMMON_NAME),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True, slots=True)
class SigningMaterial:
    """What the CA signs with: its key and certificate, the certificates between that one and the
    root (empty when the CA is the root), and the root. Its repr never shows the key."""

    key: PrivateKey
    cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    root: x509.Certificate

    def __repr__(self) -> str:
        return (
            f"SigningMaterial(cert={self.cert.subject.rfc4514_string()!r}, "
            f"root={self.root.subject.rfc4514_string()!r}, key=<hidden>)"
        )

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The certificates a workload sends after its own: up to, not including, the root."""
        if self.cert == self.root:
            return ()
        return (self.cert, *self.intermediates)


def check_signing_material(
    key: PrivateKey,
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    *,
    now: datetime.datetime,
) -> SigningMaterial:
    """The material when `cert` is a CA certificate for `key` that chains through `chain` (which
    may or may not start with `cert` and end with `root`) to the self-signed `root`, every one
    in date; ChainError saying what does not hold."""
    if not same_public_key(key, cert):
        raise ChainError("ca-key.pem is not the key of ca-cert.pem")
    links = [c for c in chain if c != cert and c != root]
    path = [cert, *links, root]
    for cert_, issuer in itertools.pairwise(path):
        try:
            cert_.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise ChainError(
                f"{_name(cert_)} is not signed by {_name(issuer)}: cert-chain.pem must lead "
                "from ca-cert.pem to root-cert.pem"
            ) from None
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise ChainError(f"root-cert.pem ({_name(root)}) is not a self-signed root") from None
    for cert_ in path:
        if not cert_.not_valid_before_utc <= now <= cert_.not_valid_after_utc:
            raise ChainError(
                f"{_name(cert_)} is not valid now (valid {cert_.not_valid_before_utc:%Y-%m-%d} "
                f"to {cert_.not_valid_after_utc:%Y-%m-%d})"
            )
        if not _is_ca(cert_):
            raise ChainError(f"{_name(cert_)} is not a CA certificate (basicConstraints CA:TRUE)")
    return SigningMaterial(key, cert, tuple(links), root)


def parse_csr(pem: bytes, trust_domain: str) -> tuple[x509.CertificateSigningRequest, SpiffeId]:
    """The CSR and the identity it asks for (its one URI SAN); CsrError saying what is wrong."""
    if not pem.strip():
        raise CsrError("the CSR is empty: send a PEM 'CERTIFICATE REQUEST'")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise CsrError("the CSR is not a PEM 'CERTIFICATE REQUEST'") from None
    try:
        valid = csr.is_signature_valid
    except Exception:
        valid = False
    if not valid:
        raise CsrError("the CSR's signature does not verify with its public key")
    public_key = csr.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CsrError(f"the CSR's RSA key has {public_key.key_size} bits; at least 2048")
    elif not (
        isinstance(public_key, ec.EllipticCurvePublicKey)
        and isinstance(public_key.curve, _EC_CURVES)
    ):
        raise CsrError("the CSR's key must be ECDSA P-256/P-384 or RSA >= 2048 bits")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError("the CSR has no subjectAltName: it must name one spiffe:// URI") from None
    except ValueError as error:
        raise CsrError(f"the CSR's extensions cannot be read ({error})") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(san)) != 1:
        raise CsrError("the CSR's subjectAltName must hold exactly one spiffe:// URI")
    try:
        identity = SpiffeId.parse(uris[0])
    except ValueError as error:
        raise CsrError(str(error)) from None
    if identity.trust_domain != trust_domain:
        raise CsrError(f"{identity} is outside this CA's trust domain {trust_domain!r}")
    return csr, identity


def sign_workload(
    public_key: PublicKey,
    identity: SpiffeId,
    signer: SigningMaterial,
    *,
    org: str,
    ttl: datetime.timedelta,
    now: datetime.datetime,
    backdate: datetime.timedelta = CLOCK_SKEW,
) -> x509.Certificate:
    """A workload certificate for `identity` and `public_key`, valid from `now - backdate` for
    `ttl`, cut short at the signer's own expiry."""
    not_after = min(now + ttl, signer.cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]))
        .issuer_name(signer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - backdate, signer.cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
            critical=False,
        )
        .sign(signer.key, hashes.SHA256())
    )


def identity_of(cert: x509.Certificate) -> SpiffeId | None:
    """The SPIFFE id a workload certificate carries, if exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except ValueError:
        return None


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _name(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string() or "<empty subject>")
