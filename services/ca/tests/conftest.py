"""Shared helpers: CSRs, a CA in a temporary directory, and a running CA with a gRPC client."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from istio.api.auth.v1 import ca_pb2, ca_pb2_grpc
from istio.ca import pki
from istio.ca.audit import AuditLog
from istio.ca.authority import CertificateAuthority
from istio.ca.ratelimit import RateLimiter
from istio.ca.service import CA_SERVER_NAME, CAServer, start_server
from istio.ca.storage import load_or_create_in_directory
from istio.jointokens import JoinTokens
from istio.model.identity import SpiffeId

NOW = datetime.datetime.now(datetime.UTC)
WORKLOAD = SpiffeId("cluster.local", "default", "bookinfo-productpage")
OTHER = SpiffeId("cluster.local", "default", "bookinfo-ratings")


def make_csr(
    identity: SpiffeId | str, key: pki.PrivateKey | None = None
) -> tuple[pki.PrivateKey, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(pki.serialization.Encoding.PEM)


def verify(cert_chain_pem: bytes, root: x509.Certificate) -> x509.Certificate:
    """Check a chain against the root with cryptography's own verifier; the leaf."""
    leaf, *intermediates = x509.load_pem_x509_certificates(cert_chain_pem)
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    verifier.verify(leaf, intermediates)
    return leaf


def new_authority(directory: Path, **kwargs: object) -> CertificateAuthority:
    material, _ = load_or_create_in_directory(
        directory,
        key_type=pki.KeyType.ECDSA,
        org="test",
        root_ttl=datetime.timedelta(days=30),
        now=NOW,
    )
    return CertificateAuthority(material, trust_domain="cluster.local", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return new_authority(tmp_path / "ca")


@dataclass
class RunningCA:
    authority: CertificateAuthority
    server: CAServer
    tokens: JoinTokens
    audit_path: Path

    def audit(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    async def csr(
        self,
        csr_pem: bytes,
        *,
        token: str | None = None,
        cert_chain: bytes | None = None,
        key: bytes | None = None,
        root: bytes | None = None,
    ) -> ca_pb2.CsrResponse:
        root = root or self.authority.root_pem
        if token is not None:
            port = self.server.bootstrap_port
            credentials = grpc.ssl_channel_credentials(root)
            request = ca_pb2.CsrRequest(
                csr_pem=csr_pem, node_agent_credential=token.encode(), credential_type="token"
            )
        else:
            port = self.server.port
            credentials = grpc.ssl_channel_credentials(root, key, cert_chain)
            request = ca_pb2.CsrRequest(csr_pem=csr_pem, credential_type="onprem")
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}",
            credentials,
            options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)],
        ) as channel:
            return await ca_pb2_grpc.IstioCAServiceStub(channel).HandleCSR(request, timeout=10)


StartCA = Callable[..., Awaitable[RunningCA]]


@pytest.fixture
async def start_ca(tmp_path: Path) -> AsyncIterator[StartCA]:
    started: list[CAServer] = []

    async def start(
        authority: CertificateAuthority | None = None, *, rate: float = 100, burst: int = 100
    ) -> RunningCA:
        authority = authority or new_authority(tmp_path / "ca")
        tokens = JoinTokens(tmp_path / "ca" / "join-tokens")
        audit_path = tmp_path / "audit.jsonl"
        server = await start_server(
            authority,
            grpc_addr="127.0.0.1:0",
            bootstrap_addr="127.0.0.1:0",
            limiter=RateLimiter(rate, burst),
            audit=AuditLog(audit_path),
            tokens=tokens,
        )
        started.append(server)
        return RunningCA(authority, server, tokens, audit_path)

    yield start
    await asyncio.gather(*(server.stop(None) for server in started))
