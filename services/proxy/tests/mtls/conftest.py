"""Certificates for the mTLS tests, made with istio-ca's own code (istio.ca.pki): a mesh root,
another CA's root, workload certificates for any SPIFFE id (in or out of the trust domain,
in date or expired), written as the node agent writes them. In-process tests run on both
event loops the proxy may use: asyncio's and uvloop's (pilot-agent runs on uvloop)."""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from istio.ca import pki
from istio.model.identity import SpiffeId

NOW = datetime.datetime.now(datetime.UTC)
HOUR = datetime.timedelta(hours=1)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name != "test_tls.py":
        return {"asyncio": asyncio.new_event_loop}  # the proxy runs in its own processes
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@dataclass
class Authority:
    """A root CA: signs workload certificates for whatever identity a test needs."""

    key: pki.PrivateKey
    root: pki.x509.Certificate

    @property
    def root_pem(self) -> bytes:
        return pki.cert_pem(self.root)

    def issue(
        self,
        identity: str,
        *,
        now: datetime.datetime = NOW,
        ttl: datetime.timedelta = HOUR,
    ) -> tuple[bytes, bytes]:
        """A fresh key and its certificate (PEM) for a SPIFFE id."""
        key = pki.generate_key(pki.KeyType.ECDSA)
        signer = pki.SigningMaterial(self.key, self.root, (), self.root)
        cert = pki.sign_workload(
            key.public_key(), SpiffeId.parse(identity), signer, org="test", ttl=ttl, now=now
        )
        return pki.key_pem(key), pki.cert_pem(cert)

    def write(
        self,
        directory: Path,
        identity: str,
        *,
        root: bytes | None = None,
        now: datetime.datetime = NOW,
        ttl: datetime.timedelta = HOUR,
    ) -> Path:
        """cert-chain.pem, key.pem (0600) and root-cert.pem in `directory`, each replaced
        atomically, the key before the chain, as the node agent writes them."""
        key, cert = self.issue(identity, now=now, ttl=ttl)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data, mode in (
            ("root-cert.pem", root or self.root_pem, 0o644),
            ("key.pem", key, 0o600),
            ("cert-chain.pem", cert, 0o644),
        ):
            temporary = directory / f".{name}.tmp"
            temporary.write_bytes(data)
            os.chmod(temporary, mode)
            os.replace(temporary, directory / name)
        return directory


def new_authority(org: str = "test") -> Authority:
    key = pki.generate_key(pki.KeyType.ECDSA)
    root = pki.make_root(key, org=org, ttl=datetime.timedelta(days=2), now=NOW - 3 * HOUR)
    return Authority(key, root)


@pytest.fixture(scope="session")
def mesh_ca() -> Authority:
    return new_authority("mesh")


@pytest.fixture(scope="session")
def other_ca() -> Authority:
    return new_authority("other")
