"""HandleCSR over real gRPC on loopback: who may get which certificate."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store
from google.rpc import code_pb2

from istio.ca import pki
from istio.ca.authority import CertificateAuthority
from istio.ca.storage import CA_KEY

from .conftest import NOW, OTHER, WORKLOAD, StartCA, make_csr, new_authority, verify


async def bootstrap(ca, identity=WORKLOAD):  # type: ignore[no-untyped-def]
    """A node's first certificate, by join token: (key PEM, cert chain PEM)."""
    token = ca.tokens.create(identity, 3600)
    key, csr_pem = make_csr(identity)
    response = await ca.csr(csr_pem, token=token)
    assert response.is_approved, response.status.message
    return pki.key_pem(key), response.signed_cert + response.cert_chain


async def test_a_join_token_gets_its_identity_once(start_ca: StartCA) -> None:
    ca = await start_ca()
    token = ca.tokens.create(WORKLOAD, 3600)
    _, csr_pem = make_csr(WORKLOAD)
    response = await ca.csr(csr_pem, token=token)
    assert response.is_approved
    assert response.status.code == code_pb2.OK
    leaf = verify(response.signed_cert + response.cert_chain, ca.authority.material.root)
    assert pki.identity_of(leaf) == WORKLOAD

    reused = await ca.csr(make_csr(WORKLOAD)[1], token=token)
    assert not reused.is_approved
    assert reused.status.code == code_pb2.UNAUTHENTICATED
    assert "already used" in reused.status.message
    assert [e["decision"] for e in ca.audit()] == ["approved", "denied"]


async def test_a_token_for_one_identity_cannot_get_another(start_ca: StartCA) -> None:
    ca = await start_ca()
    token = ca.tokens.create(WORKLOAD, 3600)
    response = await ca.csr(make_csr(OTHER)[1], token=token)
    assert not response.is_approved
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert f"the join token is for {WORKLOAD}, not {OTHER}" in response.status.message
    (entry,) = ca.audit()
    assert entry["decision"] == "denied"
    assert entry["identity"] == str(OTHER)
    assert entry["caller"].startswith("join-token:")
    assert "not" in entry["reason"]


async def test_unknown_and_expired_tokens_are_denied(start_ca: StartCA) -> None:
    ca = await start_ca()
    assert not (await ca.csr(make_csr(WORKLOAD)[1], token="made-up")).is_approved
    expired = ca.tokens.create(WORKLOAD, 60, now=0)
    response = await ca.csr(make_csr(WORKLOAD)[1], token=expired)
    assert not response.is_approved
    assert "expired" in response.status.message


async def test_a_malformed_csr_gets_a_clear_error(start_ca: StartCA) -> None:
    ca = await start_ca()
    token = ca.tokens.create(WORKLOAD, 3600)
    response = await ca.csr(b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n", token=token)
    assert not response.is_approved
    assert response.status.code == code_pb2.INVALID_ARGUMENT
    assert response.status.message == "malformed CSR: the CSR is not a PEM 'CERTIFICATE REQUEST'"
    assert ca.audit()[0]["decision"] == "invalid"
    # The token was not spent on a request the CA could not read.
    assert (await ca.csr(make_csr(WORKLOAD)[1], token=token)).is_approved


async def test_a_node_renews_its_own_identity_with_its_certificate(start_ca: StartCA) -> None:
    ca = await start_ca()
    key, chain = await bootstrap(ca)
    response = await ca.csr(make_csr(WORKLOAD)[1], cert_chain=chain, key=key)
    assert response.is_approved, response.status.message
    entry = ca.audit()[-1]
    assert entry == entry | {
        "caller": str(WORKLOAD),
        "identity": str(WORKLOAD),
        "decision": "approved",
    }


async def test_a_node_cannot_get_another_identity_with_its_certificate(start_ca: StartCA) -> None:
    ca = await start_ca()
    key, chain = await bootstrap(ca)
    response = await ca.csr(make_csr(OTHER)[1], cert_chain=chain, key=key)
    assert not response.is_approved
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert (
        response.status.message == f"{WORKLOAD} may only get certificates for itself, not {OTHER}"
    )
    entry = ca.audit()[-1]
    assert entry == entry | {"caller": str(WORKLOAD), "identity": str(OTHER), "decision": "denied"}


async def test_a_certificate_from_another_ca_is_refused_at_the_tls_layer(
    start_ca: StartCA, tmp_path: Path
) -> None:
    ca = await start_ca()
    stranger = new_authority(tmp_path / "stranger")
    key, issued = stranger.issue(WORKLOAD)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ca.csr(make_csr(WORKLOAD)[1], cert_chain=issued.cert_chain_pem, key=key)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ca.audit_path.exists() is False  # never reached the service


async def test_no_client_certificate_is_refused_at_the_csr_address(start_ca: StartCA) -> None:
    ca = await start_ca()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ca.csr(make_csr(WORKLOAD)[1])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_expired_client_certificate_is_refused(start_ca: StartCA, tmp_path: Path) -> None:
    key = pki.generate_key(pki.KeyType.ECDSA)
    root = pki.make_root(
        key, org="o", ttl=datetime.timedelta(days=30), now=NOW - datetime.timedelta(days=1)
    )
    material = pki.SigningMaterial(key, root, (), root)
    ca = await start_ca(CertificateAuthority(material, trust_domain="cluster.local"))
    past = CertificateAuthority(
        material,
        trust_domain="cluster.local",
        workload_ttl=datetime.timedelta(minutes=10),
        clock=lambda: NOW - datetime.timedelta(hours=2),
    )
    key, issued = past.issue(WORKLOAD)
    assert issued.cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ca.csr(make_csr(WORKLOAD)[1], cert_chain=issued.cert_chain_pem, key=key)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_ca_serves_its_own_identity_signed_by_the_root(
    start_ca: StartCA, tmp_path: Path
) -> None:
    ca = await start_ca()
    stranger = new_authority(tmp_path / "stranger")
    with pytest.raises(grpc.aio.AioRpcError):  # a client that trusts another root cannot connect
        await ca.csr(make_csr(WORKLOAD)[1], token="t", root=stranger.root_pem)
    _key, chain = ca.authority.serving_credentials(["istio-ca"])
    leaf, *rest = x509.load_pem_x509_certificates(chain)
    verifier = PolicyBuilder().store(Store([ca.authority.material.root]))
    verifier.build_server_verifier(DNSName("istio-ca")).verify(leaf, rest)
    assert (
        str(pki.identity_of(leaf))
        == "spiffe://cluster.local/ns/istio-system/sa/istio-ca-service-account"
    )


async def test_callers_are_rate_limited(start_ca: StartCA) -> None:
    ca = await start_ca(rate=0.001, burst=2)
    key, chain = await bootstrap(ca)  # one from the token caller's bucket
    answers = [await ca.csr(make_csr(WORKLOAD)[1], cert_chain=chain, key=key) for _ in range(3)]
    assert [a.is_approved for a in answers] == [True, True, False]
    assert answers[2].status.code == code_pb2.RESOURCE_EXHAUSTED
    assert ca.audit()[-1]["decision"] == "rate_limited"


async def test_the_ca_key_never_appears_in_logs(
    start_ca: StartCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ca = await start_ca()
    key, chain = await bootstrap(ca)
    await ca.csr(make_csr(OTHER)[1], cert_chain=chain, key=key)
    await ca.csr(b"garbage", token="nope")
    secret_lines = (tmp_path / "ca" / CA_KEY).read_text().splitlines()[1:-1]
    text = caplog.text + ca.audit_path.read_text() + repr(ca.authority) + repr(ca.server)
    assert caplog.records, "the audit trail is logged"
    for line in secret_lines:
        assert line not in text
