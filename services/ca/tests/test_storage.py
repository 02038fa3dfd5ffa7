from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from istio.ca import pki, storage
from istio.ca.authority import CertificateAuthority
from istio.ca.pki import KeyType
from istio.kube import KubeClient, load_cluster_access
from istio.testing.kube import FakeKubeAPI

from .conftest import NOW, WORKLOAD, make_csr, verify

DAY = datetime.timedelta(days=1)


def load_dir(
    directory: Path, key_type: KeyType = KeyType.ECDSA
) -> tuple[pki.SigningMaterial, bool]:
    return storage.load_or_create_in_directory(
        directory, key_type=key_type, org="o", root_ttl=DAY, now=NOW
    )


def test_a_restart_keeps_the_same_root(tmp_path: Path) -> None:
    first, made = load_dir(tmp_path / "ca")
    assert made
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600
    again, made = load_dir(tmp_path / "ca")
    assert not made
    assert again.root == first.root
    assert pki.key_pem(again.key) == pki.key_pem(first.key)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_readable_by_others_is_refused_saying_why(tmp_path: Path, mode: int) -> None:
    load_dir(tmp_path / "ca")
    key = tmp_path / "ca" / "ca-key.pem"
    os.chmod(key, mode)
    with pytest.raises(
        storage.StorageError, match=rf"group or others \(mode {mode:04o}\).*chmod 600"
    ):
        load_dir(tmp_path / "ca")


def test_a_damaged_root_is_refused(tmp_path: Path) -> None:
    load_dir(tmp_path / "ca")
    (tmp_path / "ca" / "ca-cert.pem").write_text("junk")
    with pytest.raises(storage.StorageError, match="not PEM certificates"):
        load_dir(tmp_path / "ca")
    other, _ = load_dir(tmp_path / "other")
    (tmp_path / "ca" / "ca-cert.pem").write_bytes(pki.cert_pem(other.root))
    with pytest.raises(storage.StorageError, match=r"is not the key of ca-cert\.pem"):
        load_dir(tmp_path / "ca")


def _intermediate(root: pki.SigningMaterial, key: pki.PrivateKey) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )


def write_cacerts(tmp_path: Path) -> tuple[Path, pki.SigningMaterial]:
    """An organisation's root and an intermediate for the mesh, in the cacerts layout."""
    root, _ = load_dir(tmp_path / "org-root")
    key = pki.generate_key(KeyType.ECDSA)
    cert = _intermediate(root, key)
    cacerts = tmp_path / "cacerts"
    cacerts.mkdir()
    storage.write_private(cacerts / "ca-key.pem", pki.key_pem(key))
    (cacerts / "ca-cert.pem").write_bytes(pki.cert_pem(cert))
    (cacerts / "root-cert.pem").write_bytes(pki.cert_pem(root.root))
    (cacerts / "cert-chain.pem").write_bytes(pki.cert_pem(cert, root.root))
    return cacerts, root


def test_byo_ca_issues_certificates_that_verify_against_the_provided_root(tmp_path: Path) -> None:
    cacerts, org = write_cacerts(tmp_path)
    material = storage.load_cacerts(cacerts, now=NOW)
    assert material.root == org.root
    authority = CertificateAuthority(material, trust_domain="cluster.local")
    csr, identity = authority.parse_csr(make_csr(WORKLOAD)[1])
    issued = authority.sign(csr, identity)
    assert len(x509.load_pem_x509_certificates(issued.chain_pem)) == 1  # the intermediate
    leaf = verify(issued.cert_chain_pem, org.root)
    assert leaf.issuer == material.cert.subject
    assert authority.root_pem == pki.cert_pem(org.root)


def test_byo_ca_with_a_broken_chain_is_refused(tmp_path: Path) -> None:
    cacerts, _ = write_cacerts(tmp_path)
    stranger, _ = load_dir(tmp_path / "stranger")
    (cacerts / "root-cert.pem").write_bytes(pki.cert_pem(stranger.root))
    (cacerts / "cert-chain.pem").write_bytes((cacerts / "ca-cert.pem").read_bytes())
    with pytest.raises(storage.StorageError, match="is not signed by"):
        storage.load_cacerts(cacerts, now=NOW)


def test_byo_ca_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    cacerts, _ = write_cacerts(tmp_path)
    os.chmod(cacerts / "ca-key.pem", 0o644)
    with pytest.raises(storage.StorageError, match="accessible by group or others"):
        storage.load_cacerts(cacerts, now=NOW)


def test_byo_ca_that_is_not_a_ca_is_refused(tmp_path: Path) -> None:
    cacerts, org = write_cacerts(tmp_path)
    authority = CertificateAuthority(org, trust_domain="cluster.local")
    key_pem, issued = authority.issue(WORKLOAD)
    storage.write_private(cacerts / "ca-key.pem", key_pem)
    (cacerts / "ca-cert.pem").write_bytes(issued.cert_pem)
    (cacerts / "cert-chain.pem").write_bytes(issued.cert_pem)
    with pytest.raises(storage.StorageError, match="not a CA certificate"):
        storage.load_cacerts(cacerts, now=NOW)


async def test_the_root_in_a_kubernetes_secret_survives_a_restart(tmp_path: Path) -> None:
    async with FakeKubeAPI() as api:
        client = KubeClient(load_cluster_access(api.write_kubeconfig(tmp_path / "kubeconfig")))
        try:
            first, made = await storage.load_or_create_in_secret(
                client, "istio-system", key_type=KeyType.ECDSA, org="o", root_ttl=DAY, now=NOW
            )
            assert made
            secret = api.get_object("v1", "Secret", "istio-ca-secret", "istio-system")
            assert secret is not None
            assert set(secret["data"]) == {"ca-cert.pem", "ca-key.pem"}
            again, made = await storage.load_or_create_in_secret(
                client, "istio-system", key_type=KeyType.RSA, org="o", root_ttl=DAY, now=NOW
            )
            assert not made
            assert again.root == first.root
        finally:
            await client.close()
