"""The ServiceEntry registry end to end: real files in a real directory, changes found through
filesystem notifications, reported as Changes."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from istio.model import AuthPolicy
from istio.pilot.registry import Change
from istio.pilot.registry.serviceentry import ServiceEntryRegistry

REVIEWS = "reviews.default.svc.cluster.local"


def reviews(*addresses: str, port: int = 9080, auth: str = "") -> str:
    endpoints = "\n".join(
        f"""  - address: {address}
    labels: {{app: reviews, version: v{index}}}
    serviceAccount: bookinfo-reviews
    locality: us-east/a"""
        for index, address in enumerate(addresses, 1)
    )
    return f"""\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: reviews{f"{chr(10)}  annotations: {{auth.istio.io/{port}: {auth}}}" if auth else ""}
spec:
  hosts: [{REVIEWS}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {port}, protocol: HTTP, name: http}}
  endpoints:
{endpoints}
"""


RATINGS = """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: ratings}
spec:
  hosts: [ratings.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, protocol: HTTP, name: http}]
  endpoints: [{address: 127.0.0.7, labels: {app: ratings, version: v1}}]
"""

BAD_ADDRESS = """\
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: details}
spec:
  hosts: [details.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, protocol: HTTP, name: http}]
  endpoints: [{address: not-an-ip}]
"""


def write(path: Path, text: str) -> None:
    """Write as editors and the local platform do: a hidden temporary file, then a rename, so
    that the registry never reads half a file."""
    descriptor, temporary = tempfile.mkstemp(prefix=".", dir=path.parent)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


@dataclass
class Running:
    registry: ServiceEntryRegistry
    changes: asyncio.Queue[Change]
    directory: Path

    async def change(self) -> Change:
        return await asyncio.wait_for(self.changes.get(), timeout=10)

    def addresses(self, host: str = REVIEWS) -> list[str]:
        return [i.address for i in self.registry.snapshot().instances.get(host, ())]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    directory = tmp_path / "registry"
    directory.mkdir()
    write(directory / "reviews.yaml", reviews("127.0.0.4", "127.0.0.5"))
    registry = ServiceEntryRegistry(directory)
    changes: asyncio.Queue[Change] = asyncio.Queue()
    task = asyncio.create_task(registry.run(changes.put_nowait))
    yield Running(registry, changes, directory)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_serves_the_files_at_start(running: Running) -> None:
    assert await running.change() is Change.SERVICES  # the first sync
    registry = running.registry
    assert registry.name == f"files:{running.directory}"
    status = registry.status
    assert status.synced
    assert status.healthy
    assert status.last_error == ""
    assert status.last_change is not None
    service = registry.snapshot().services[REVIEWS]
    assert (service.namespace, service.ports[0].port) == ("default", 9080)
    found = registry.snapshot().instances[REVIEWS]
    assert [(i.address, i.labels["version"], i.service_account, i.locality) for i in found] == [
        ("127.0.0.4", "v1", "bookinfo-reviews", "us-east/a"),
        ("127.0.0.5", "v2", "bookinfo-reviews", "us-east/a"),
    ]


async def test_endpoint_changes_are_endpoints_changes(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    first = running.registry.snapshot()
    write(running.directory / "reviews.yaml", reviews("127.0.0.4", "127.0.0.5", "127.0.0.6"))
    assert await running.change() is Change.ENDPOINTS
    assert running.addresses() == ["127.0.0.4", "127.0.0.5", "127.0.0.6"]
    assert first.instances[REVIEWS] != running.registry.snapshot().instances[REVIEWS]
    assert len(first.instances[REVIEWS]) == 2  # a snapshot never changes once returned


async def test_port_changes_are_service_changes(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    write(running.directory / "reviews.yaml", reviews("127.0.0.4", "127.0.0.5", port=9081))
    assert await running.change() is Change.SERVICES
    assert running.registry.snapshot().services[REVIEWS].ports[0].port == 9081


async def test_files_come_and_go(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    (running.directory / "vms").mkdir()  # a new directory, its first file written at once
    write(running.directory / "vms" / "ratings.yml", RATINGS)
    assert await running.change() is Change.SERVICES
    assert running.addresses("ratings.default.svc.cluster.local") == ["127.0.0.7"]
    (running.directory / "vms" / "ratings.yml").unlink()
    assert await running.change() is Change.SERVICES
    assert "ratings.default.svc.cluster.local" not in running.registry.snapshot().services


async def test_a_malformed_file_is_reported_and_the_rest_served(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    write(running.directory / "details.yaml", BAD_ADDRESS)
    status = await running.registry.wait_status(lambda s: "details.yaml" in s.last_error)
    assert "ServiceEntry default/details: spec.endpoints[0].address" in status.last_error
    assert "'not-an-ip' is not an IP address" in status.last_error
    assert status.healthy
    assert set(running.registry.snapshot().services) == {REVIEWS}

    write(running.directory / "ratings.yaml", RATINGS)  # the others still go on
    assert await running.change() is Change.SERVICES
    assert "ratings.default.svc.cluster.local" in running.registry.snapshot().services
    assert "details.yaml" in running.registry.status.last_error

    write(running.directory / "details.yaml", BAD_ADDRESS.replace("not-an-ip", "127.0.0.3"))
    assert await running.change() is Change.SERVICES
    assert "details.default.svc.cluster.local" in running.registry.snapshot().services
    status = await running.registry.wait_status(lambda s: s.last_error == "")


async def test_a_file_that_turns_bad_keeps_its_last_good_entries(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    write(running.directory / "reviews.yaml", reviews("127.0.0.4", "127.0.0.5") + "  bogus: 1\n")
    status = await running.registry.wait_status(lambda s: "reviews.yaml" in s.last_error)
    assert "spec.bogus: unknown field 'bogus'" in status.last_error
    assert running.addresses() == ["127.0.0.4", "127.0.0.5"]

    write(running.directory / "reviews.yaml", reviews("127.0.0.4"))
    assert await running.change() is Change.ENDPOINTS
    assert running.addresses() == ["127.0.0.4"]
    await running.registry.wait_status(lambda s: s.last_error == "")


async def test_conflicting_hosts_are_reported(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    other = reviews("127.0.0.9", port=9090).replace("name: reviews", "name: reviews-other")
    write(running.directory / "other.yaml", other)
    status = await running.registry.wait_status(lambda s: "reviews-other" in s.last_error)
    assert f"host {REVIEWS} is defined differently by default/reviews" in status.last_error
    assert running.registry.snapshot().services[REVIEWS].ports[0].port == 9080


async def test_auth_annotations_are_service_changes(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    assert await running.change() is Change.SERVICES
    write(running.directory / "reviews.yaml", reviews("127.0.0.4", "127.0.0.5", auth="NONE"))
    assert await running.change() is Change.SERVICES
    snapshot = running.registry.snapshot()
    assert snapshot.services[REVIEWS].ports[0].auth_policy is AuthPolicy.NONE
    assert {i.service_port.auth_policy for i in snapshot.instances[REVIEWS]} == {AuthPolicy.NONE}
    # A bad value: ignored (the mesh's policy), logged once and shown in the status.
    with caplog.at_level(logging.WARNING, logger="istio.pilot.registry.serviceentry.controller"):
        write(running.directory / "reviews.yaml", reviews("127.0.0.4", auth="SOMETIMES"))
        assert await running.change() is Change.SERVICES
        # Re-read with other endpoints, the same annotation is not warned about again.
        write(
            running.directory / "reviews.yaml",
            reviews("127.0.0.4", "127.0.0.6", auth="SOMETIMES"),
        )
        assert await running.change() is Change.ENDPOINTS
    assert running.registry.snapshot().services[REVIEWS].ports[0].auth_policy is None
    problem = (
        "ServiceEntry default/reviews: annotation auth.istio.io/9080: 'SOMETIMES' is not NONE "
        "or MUTUAL_TLS; the mesh's authPolicy applies to the port"
    )
    warned = [r.getMessage() for r in caplog.records if "auth.istio.io" in r.getMessage()]
    assert warned == [f"files:{running.directory}: {problem}"]
    assert running.registry.status.last_error == problem


async def test_a_missing_directory_is_created(tmp_path: Path) -> None:
    directory = tmp_path / "not" / "yet"
    registry = ServiceEntryRegistry(directory)
    changes: asyncio.Queue[Change] = asyncio.Queue()
    task = asyncio.create_task(registry.run(changes.put_nowait))
    assert await asyncio.wait_for(changes.get(), timeout=10) is Change.SERVICES
    assert registry.snapshot().services == {}
    write(directory / "ratings.yaml", RATINGS)
    assert await asyncio.wait_for(changes.get(), timeout=10) is Change.SERVICES
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_unusable_directory_is_an_error_in_the_status(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "entries"
    not_a_directory.write_text("")
    registry = ServiceEntryRegistry(not_a_directory)
    task = asyncio.create_task(registry.run(lambda change: None))
    status = await asyncio.wait_for(registry.wait_status(lambda s: bool(s.last_error)), 10)
    assert status.last_error.startswith(f"cannot watch {not_a_directory}: ")
    assert not status.healthy
    assert not status.synced
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
