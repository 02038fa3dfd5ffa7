"""Kubernetes mode against the fake API server: istio.<sa> secrets follow service accounts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from istio.ca import pki
from istio.ca.authority import CertificateAuthority
from istio.ca.kubesecrets import SECRETS, SecretController
from istio.kube import KubeClient, load_cluster_access
from istio.model.identity import SpiffeId
from istio.testing.kube import FakeKubeAPI

from .conftest import new_authority, verify


@dataclass
class Running:
    api: FakeKubeAPI
    controller: SecretController
    task: asyncio.Task[None]
    kubeconfig: Path

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def secret(self, namespace: str, account: str) -> dict[str, Any] | None:
        return self.api.get_object("v1", "Secret", f"istio.{account}", namespace)

    async def until(self, predicate: Callable[[], object]) -> None:
        """Follow the secrets until `predicate` holds (checked after each change)."""
        client = KubeClient(load_cluster_access(self.kubeconfig))
        try:
            async with asyncio.timeout(10), contextlib.aclosing(client.watch([SECRETS])) as events:
                async for _ in events:
                    if predicate():
                        return
        finally:
            await client.close()


def account(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace},
    }


def leaf_of(secret: dict[str, Any]) -> x509.Certificate:
    return x509.load_pem_x509_certificates(base64.b64decode(secret["data"]["cert-chain.pem"]))[0]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[[CertificateAuthority], Any]]:
    tasks: list[asyncio.Task[None]] = []
    clients: list[KubeClient] = []
    api = FakeKubeAPI()
    await api.start()

    async def start_controller(authority: CertificateAuthority, refresh: float = 60) -> Running:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        client = KubeClient(load_cluster_access(kubeconfig))
        clients.append(client)
        controller = SecretController(client, authority, refresh_interval=refresh)
        task = asyncio.create_task(controller.run())
        tasks.append(task)
        await asyncio.wait_for(controller.synced.wait(), 10)
        return Running(api, controller, task, kubeconfig)

    api.create_object(account("default", "bookinfo-productpage"))
    yield start_controller
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    await api.stop()


async def test_every_service_account_gets_a_secret(start: Any, tmp_path: Path) -> None:
    authority = new_authority(tmp_path / "ca")
    running: Running = await start(authority)
    await running.until(lambda: running.secret("default", "bookinfo-productpage"))
    secret = running.secret("default", "bookinfo-productpage")
    assert secret is not None
    assert secret["type"] == "istio.io/key-and-cert"
    assert set(secret["data"]) == {"cert-chain.pem", "key.pem", "root-cert.pem"}
    assert base64.b64decode(secret["data"]["root-cert.pem"]) == authority.root_pem
    chain = base64.b64decode(secret["data"]["cert-chain.pem"])
    leaf = verify(chain, authority.material.root)
    assert pki.identity_of(leaf) == SpiffeId("cluster.local", "default", "bookinfo-productpage")
    key = pki.load_key(base64.b64decode(secret["data"]["key.pem"]), "key.pem")
    assert pki.same_public_key(key, leaf)

    running.api.create_object(account("team-a", "reviews"))
    await running.until(lambda: running.secret("team-a", "reviews"))

    # Deleted by someone: made again. Account gone: secret gone.
    running.api.delete_object("v1", "Secret", "istio.reviews", "team-a")
    await running.until(lambda: running.secret("team-a", "reviews"))
    running.api.delete_object("v1", "ServiceAccount", "reviews", "team-a")
    await running.until(lambda: running.secret("team-a", "reviews") is None)


async def test_secrets_are_reissued_before_expiry(start: Any, tmp_path: Path) -> None:
    authority = new_authority(tmp_path / "ca", workload_ttl=datetime.timedelta(seconds=2))
    running: Running = await start(authority, refresh=0.2)
    await running.until(lambda: running.secret("default", "bookinfo-productpage"))
    first = leaf_of(running.secret("default", "bookinfo-productpage") or {})
    await running.until(
        lambda: (
            leaf_of(running.secret("default", "bookinfo-productpage") or {}).serial_number
            != first.serial_number
        )
    )


async def test_secrets_are_reissued_when_the_root_changes(start: Any, tmp_path: Path) -> None:
    old = new_authority(tmp_path / "old")
    first: Running = await start(old)
    await first.until(lambda: first.secret("default", "bookinfo-productpage"))
    await first.stop()  # the CA restarts with another root
    new = new_authority(tmp_path / "new")
    second: Running = await start(new)

    def has_new_root() -> bool:
        secret = second.secret("default", "bookinfo-productpage") or {"data": {}}
        return base64.b64decode(secret["data"].get("root-cert.pem", "")) == new.root_pem

    await second.until(has_new_root)
