"""The certificate authority: signing material plus policy (trust domain, lifetimes)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from istio.ca import pki
from istio.ca.pki import KeyType, SigningMaterial
from istio.model.identity import SpiffeId

DEFAULT_WORKLOAD_TTL = datetime.timedelta(hours=1)
SERVICE_ACCOUNT = "istio-ca-service-account"

Clock = Callable[[], datetime.datetime]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True, slots=True)
class Issued:
    """A signed workload certificate: the certificate and the chain to send after it (PEM)."""

    cert: x509.Certificate
    cert_pem: bytes
    chain_pem: bytes

    @property
    def cert_chain_pem(self) -> bytes:
        """What a workload's cert-chain.pem holds: its certificate, then the chain."""
        return self.cert_pem + self.chain_pem


class CertificateAuthority:
    def __init__(
        self,
        material: SigningMaterial,
        *,
        trust_domain: str,
        org: str = pki.DEFAULT_ORG,
        workload_ttl: datetime.timedelta = DEFAULT_WORKLOAD_TTL,
        key_type: KeyType = KeyType.ECDSA,
        clock: Clock = utcnow,
    ) -> None:
        self.material = material
        self.trust_domain = trust_domain
        self.org = org
        self.workload_ttl = workload_ttl
        self.key_type = key_type
        self.clock = clock
        self.root_pem = pki.cert_pem(material.root)

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.trust_domain!r}, {self.material!r})"

    def parse_csr(self, csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, SpiffeId]:
        return pki.parse_csr(csr_pem, self.trust_domain)

    def ttl_for(self, requested_minutes: int) -> datetime.timedelta:
        """The CA's TTL, or a shorter one when the caller asks for less."""
        if requested_minutes > 0:
            return min(self.workload_ttl, datetime.timedelta(minutes=requested_minutes))
        return self.workload_ttl

    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        identity: SpiffeId,
        ttl: datetime.timedelta | None = None,
    ) -> Issued:
        public_key = csr.public_key()
        if not isinstance(public_key, pki.PublicKey):
            raise pki.CsrError("the CSR's key must be ECDSA or RSA")
        cert = pki.sign_workload(
            public_key,
            identity,
            self.material,
            org=self.org,
            ttl=ttl or self.workload_ttl,
            now=self.clock(),
        )
        return Issued(cert, pki.cert_pem(cert), pki.cert_pem(*self.material.chain))

    def issue(self, identity: SpiffeId) -> tuple[bytes, Issued]:
        """A new key and its certificate for `identity` (for a Kubernetes secret): key PEM, cert."""
        key = pki.generate_key(self.key_type)
        public_key = key.public_key()
        cert = pki.sign_workload(
            public_key,
            identity,
            self.material,
            org=self.org,
            ttl=self.workload_ttl,
            now=self.clock(),
        )
        return pki.key_pem(key), Issued(
            cert, pki.cert_pem(cert), pki.cert_pem(*self.material.chain)
        )

    def serving_credentials(self, hosts: Sequence[str]) -> tuple[bytes, bytes]:
        """A key and certificate chain (PEM) for the CA's own gRPC server: its SPIFFE id
        (istio-system/istio-ca-service-account) and the DNS names and IPs in `hosts`."""
        key = pki.generate_key(self.key_type)
        identity = SpiffeId(self.trust_domain, "istio-system", SERVICE_ACCOUNT)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = self.clock()
        signer = self.material
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.org)]))
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - pki.CLOCK_SKEW, signer.cert.not_valid_before_utc))
            .not_valid_after(
                min(now + datetime.timedelta(days=365), signer.cert.not_valid_after_utc)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
                critical=False,
            )
            .sign(signer.key, hashes.SHA256())
        )
        return pki.key_pem(key), pki.cert_pem(cert, *signer.chain)
