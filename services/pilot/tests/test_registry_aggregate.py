"""The aggregate registry: members run together, one merged view, one status."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest

from istio.model import Port, Protocol, Service, ServiceInstance
from istio.pilot.registry import Change, ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.aggregate import AggregateRegistry
from istio.pilot.registry.kube import KubeRegistry
from istio.pilot.registry.serviceentry import ServiceEntryRegistry
from istio.testing.kube import FakeKubeAPI

HTTP = Port("http", 9080, Protocol.HTTP)


def service(host: str, address: str = "") -> Service:
    return Service(host, (HTTP,), address=address)


def snapshot(*entries: tuple[Service, tuple[str, ...]]) -> RegistrySnapshot:
    return RegistrySnapshot(
        MappingProxyType({s.hostname: s for s, _ in entries}),
        MappingProxyType(
            {
                s.hostname: tuple(ServiceInstance(s, HTTP, a, 9080) for a in ips)
                for s, ips in entries
            }
        ),
    )


class StubRegistry:
    """A registry whose snapshots and status the test sets."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._snapshot = RegistrySnapshot()
        self._status = RegistryStatus()
        self._changed: ChangeCallback | None = None
        self.running = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    @property
    def status(self) -> RegistryStatus:
        return self._status

    async def run(self, changed: ChangeCallback) -> None:
        self._changed = changed
        self.running.set()
        await asyncio.Event().wait()

    def publish(
        self, new: RegistrySnapshot, change: Change, *, healthy: bool = True, error: str = ""
    ) -> None:
        self._snapshot = new
        self._status = RegistryStatus(True, healthy, error)
        assert self._changed is not None
        self._changed(change)


@dataclass
class Running:
    aggregate: AggregateRegistry
    first: StubRegistry
    second: StubRegistry
    changes: asyncio.Queue[Change]

    async def change(self) -> Change:
        return await asyncio.wait_for(self.changes.get(), timeout=10)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    first, second = StubRegistry("files:/mesh"), StubRegistry("kubernetes")
    aggregate = AggregateRegistry([first, second])
    changes: asyncio.Queue[Change] = asyncio.Queue()
    task = asyncio.create_task(aggregate.run(changes.put_nowait))
    await first.running.wait()
    await second.running.wait()
    yield Running(aggregate, first, second, changes)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


REVIEWS = service("reviews.default.svc.cluster.local", "10.0.0.12")
RATINGS = service("ratings.default.svc.cluster.local", "10.0.0.13")
DETAILS = service("details.default.svc.cluster.local", "10.0.0.11")


async def test_merged_view_and_status(running: Running) -> None:
    assert running.aggregate.members == (running.first, running.second)
    assert running.aggregate.name == "aggregate"
    running.first.publish(snapshot((REVIEWS, ("127.0.0.4",))), Change.SERVICES)
    assert await running.change() is Change.SERVICES
    status = running.aggregate.status
    assert not status.synced  # kubernetes has not synced yet
    assert not status.healthy

    running.second.publish(snapshot((DETAILS, ("10.1.0.3",))), Change.SERVICES)
    assert await running.change() is Change.SERVICES
    merged = running.aggregate.snapshot()
    assert set(merged.services) == {REVIEWS.hostname, DETAILS.hostname}
    assert [i.address for i in merged.instances[DETAILS.hostname]] == ["10.1.0.3"]
    status = running.aggregate.status
    assert status.synced
    assert status.healthy
    assert status.last_error == ""
    assert status.last_change is not None

    running.second.publish(
        snapshot((DETAILS, ("10.1.0.3",))), Change.SERVICES, healthy=False, error="gone"
    )
    status = running.aggregate.status
    assert status.synced
    assert not status.healthy
    assert status.last_error == "kubernetes: gone"
    assert running.changes.empty()  # nothing changed in the merged view


async def test_the_first_registry_wins_a_clash(running: Running) -> None:
    running.first.publish(snapshot((REVIEWS, ("127.0.0.4",))), Change.SERVICES)
    assert await running.change() is Change.SERVICES
    other_reviews = service(REVIEWS.hostname, "10.96.0.12")
    running.second.publish(snapshot((other_reviews, ("10.1.0.4",)), (RATINGS, ())), Change.SERVICES)
    assert await running.change() is Change.SERVICES
    merged = running.aggregate.snapshot()
    assert merged.services[REVIEWS.hostname].address == "10.0.0.12"
    assert [i.address for i in merged.instances[REVIEWS.hostname]] == ["127.0.0.4"]
    assert RATINGS.hostname in merged.services
    assert running.aggregate.status.last_error == (
        f"host {REVIEWS.hostname} is defined by files:/mesh and kubernetes; files:/mesh's is used"
    )
    # A change hidden behind the winner's definition changes nothing.
    running.second.publish(
        snapshot((other_reviews, ("10.1.0.5",)), (RATINGS, ())), Change.ENDPOINTS
    )
    running.first.publish(snapshot((REVIEWS, ("127.0.0.4", "127.0.0.5"))), Change.ENDPOINTS)
    assert await running.change() is Change.ENDPOINTS
    assert running.changes.empty()


async def test_changes_are_forwarded_by_kind(running: Running) -> None:
    running.first.publish(snapshot((REVIEWS, ("127.0.0.4",))), Change.SERVICES)
    running.second.publish(snapshot(), Change.SERVICES)  # syncing counts as a change
    assert [await running.change(), await running.change()] == [Change.SERVICES] * 2
    running.first.publish(snapshot((REVIEWS, ("127.0.0.4", "127.0.0.5"))), Change.ENDPOINTS)
    assert await running.change() is Change.ENDPOINTS
    running.second.publish(snapshot((RATINGS, ())), Change.SERVICES)
    assert await running.change() is Change.SERVICES
    before = running.aggregate.snapshot()
    running.second.publish(snapshot(), Change.SERVICES)
    assert await running.change() is Change.SERVICES
    assert RATINGS.hostname in before.services  # snapshots never change once returned


def test_member_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="repeated: kubernetes"):
        AggregateRegistry([StubRegistry("kubernetes"), StubRegistry("kubernetes")])


async def test_files_and_kubernetes_together(tmp_path: Path) -> None:
    """Mesh expansion: a VM's ServiceEntry beside a cluster's services."""
    entries = tmp_path / "entries"
    entries.mkdir()
    descriptor, temporary = tempfile.mkstemp(prefix=".", dir=entries)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(
            """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: legacy-db}
spec:
  hosts: [legacy-db.vms.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 3306, protocol: TCP, name: tcp-mysql}]
  endpoints: [{address: 10.240.0.7, labels: {app: legacy-db}, serviceAccount: legacy}]
"""
        )
    os.replace(temporary, entries / "legacy-db.yaml")
    async with FakeKubeAPI() as api:
        api.create_object(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "productpage", "namespace": "default"},
                "spec": {"clusterIP": "10.0.0.10", "ports": [{"name": "http", "port": 9080}]},
            }
        )
        aggregate = AggregateRegistry(
            [
                ServiceEntryRegistry(entries),
                KubeRegistry(api.write_kubeconfig(tmp_path / "kubeconfig")),
            ]
        )
        changes: asyncio.Queue[Change] = asyncio.Queue()
        task = asyncio.create_task(aggregate.run(changes.put_nowait))
        while not aggregate.status.synced:
            await asyncio.wait_for(changes.get(), timeout=10)
        assert aggregate.status.healthy
        assert set(aggregate.snapshot().services) == {
            "legacy-db.vms.internal",
            "productpage.default.svc.cluster.local",
        }
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
