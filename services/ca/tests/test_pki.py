from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from istio.ca import pki
from istio.ca.authority import CertificateAuthority
from istio.ca.durations import parse_duration

from .conftest import NOW, WORKLOAD, make_csr, new_authority, verify


def test_go_durations() -> None:
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    for bad in ("", "1d", "10", "-1s", "0s"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_workload_certificate_is_a_spiffe_svid(authority: CertificateAuthority) -> None:
    _, csr_pem = make_csr(WORKLOAD)
    csr, identity = authority.parse_csr(csr_pem)
    assert identity == WORKLOAD
    issued = authority.sign(csr, identity)
    leaf = verify(issued.cert_chain_pem, authority.material.root)
    assert pki.identity_of(leaf) == WORKLOAD
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    # Default TTL 1 h, not-before set back for clock skew.
    assert lifetime == datetime.timedelta(hours=1) + pki.CLOCK_SKEW
    assert leaf.not_valid_before_utc < datetime.datetime.now(datetime.UTC)
    assert issued.chain_pem == b""  # the CA is the root: nothing between


def test_ttl_is_configurable_and_callers_may_ask_for_less(tmp_path: Path) -> None:
    authority = new_authority(tmp_path, workload_ttl=datetime.timedelta(minutes=10))
    assert authority.ttl_for(0) == datetime.timedelta(minutes=10)
    assert authority.ttl_for(5) == datetime.timedelta(minutes=5)
    assert authority.ttl_for(600) == datetime.timedelta(minutes=10)


def test_rsa_root_and_keys(tmp_path: Path) -> None:
    key = pki.generate_key(pki.KeyType.RSA)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    root = pki.make_root(key, org="o", ttl=datetime.timedelta(days=1), now=NOW)
    material = pki.check_signing_material(key, root, [], root, now=NOW)
    authority = CertificateAuthority(
        material, trust_domain="cluster.local", key_type=pki.KeyType.RSA
    )
    key_pem, issued = authority.issue(WORKLOAD)
    assert b"PRIVATE KEY" in key_pem
    verify(issued.cert_chain_pem, root)


@pytest.mark.parametrize(
    ("csr_pem", "message"),
    [
        (b"", "empty"),
        (b"not a csr", "not a PEM 'CERTIFICATE REQUEST'"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
    ],
)
def test_malformed_csrs_say_what_is_wrong(
    authority: CertificateAuthority, csr_pem: bytes, message: str
) -> None:
    with pytest.raises(pki.CsrError, match=message):
        authority.parse_csr(csr_pem)


def test_csr_checks(authority: CertificateAuthority) -> None:
    with pytest.raises(pki.CsrError, match="outside this CA's trust domain"):
        authority.parse_csr(make_csr("spiffe://other.domain/ns/a/sa/b")[1])
    with pytest.raises(pki.CsrError, match="not a workload identity"):
        authority.parse_csr(make_csr("spiffe://cluster.local/whatever")[1])
    key = ec.generate_private_key(ec.SECP256R1())
    no_san = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(pki.CsrError, match="no subjectAltName"):
        authority.parse_csr(no_san.public_bytes(pki.serialization.Encoding.PEM))
    two = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(WORKLOAD)), x509.DNSName("evil.example")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(pki.CsrError, match="exactly one spiffe"):
        authority.parse_csr(two.public_bytes(pki.serialization.Encoding.PEM))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(pki.CsrError, match="1024 bits"):
        authority.parse_csr(make_csr(WORKLOAD, small)[1])


def test_material_repr_hides_the_key(authority: CertificateAuthority) -> None:
    body = pki.key_pem(authority.material.key).decode().splitlines()[1]
    assert body not in repr(authority.material)
    assert body not in repr(authority)
    assert "hidden" in repr(authority.material)
