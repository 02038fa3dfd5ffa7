"""The Consul registry: pure conversion, and the controller against the fake Consul agent."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from istio.model import Labels, Port, Protocol
from istio.pilot.registry import Change, Registry, RegistryStatus
from istio.pilot.registry.consul import Backoff, ConsulRegistry
from istio.pilot.registry.consul.controller import go_duration, next_index
from istio.pilot.registry.consul.conversion import (
    CatalogEntry,
    build_snapshot,
    convert_service,
    entry_protocol,
    parse_catalog_service,
    parse_services,
    service_hostname,
    tag_labels,
)
from istio.testing.consul import FakeConsul

REVIEWS = "reviews.service.consul"
FAST = Backoff(initial=0.01, maximum=0.05)
EVENT_TIMEOUT = 10.0


def entry(**fields: Any) -> CatalogEntry:
    values: dict[str, Any] = {
        "node": "node-1",
        "address": "10.0.0.1",
        "service_id": "reviews-1",
        "service_name": "reviews",
        "service_port": 9080,
    }
    values.update(fields)
    return CatalogEntry(**values)


# -- conversion ----------------------------------------------------------------------------------


def test_hostname_is_consul_dns_name() -> None:
    assert service_hostname("productpage") == "productpage.service.consul"


def test_tags_in_both_forms_become_labels_and_others_are_ignored() -> None:
    labels = tag_labels(
        ["version|v1", "zone=prod", "a=b|c", "plain", "=novalue", "bad key=1", "protocol|grpc"]
    )
    # `a=b|c` splits at its first separator, and its value could not be written in a key.
    assert labels == Labels({"version": "v1", "zone": "prod"})


@pytest.mark.parametrize(
    ("tags", "service_meta", "node_meta", "expected"),
    [
        ((), {}, {}, Protocol.HTTP),  # 0.2's default
        ((), {}, {"protocol": "grpc"}, Protocol.GRPC),  # 0.2's only source
        ((), {"protocol": "http2"}, {"protocol": "grpc"}, Protocol.HTTP2),
        (("protocol|tcp",), {"protocol": "http2"}, {}, Protocol.TCP),
        (("protocol=MONGO",), {}, {}, Protocol.MONGO),
        (("protocol=htcpcp",), {}, {}, Protocol.TCP),  # unknown: not parsed as HTTP
    ],
)
def test_protocol_from_tag_then_service_meta_then_node_meta(
    tags: tuple[str, ...],
    service_meta: dict[str, str],
    node_meta: dict[str, str],
    expected: Protocol,
) -> None:
    found = entry(service_tags=tags, service_meta=Labels(service_meta), node_meta=Labels(node_meta))
    assert entry_protocol(found) is expected


def test_service_ports_named_by_protocol_and_unique() -> None:
    service = convert_service(
        "reviews",
        [
            entry(service_port=9080),
            entry(service_id="r2", service_port=9081),
            entry(service_id="r3", service_port=9443, service_tags=("protocol|https",)),
            entry(service_id="r4", service_port=0),
        ],
    )
    assert service is not None
    assert service.hostname == REVIEWS
    assert service.address == ""
    assert service.ports == (
        Port("http-9080", 9080, Protocol.HTTP),
        Port("http-9081", 9081, Protocol.HTTP),
        Port("https", 9443, Protocol.HTTPS),
    )


def test_first_instance_wins_a_protocol_conflict(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        service = convert_service(
            "reviews",
            [entry(service_tags=("protocol|grpc",)), entry(node="node-2", service_id="x")],
        )
    assert service is not None
    assert service.ports == (Port("grpc", 9080, Protocol.GRPC),)
    assert "disagree" in caplog.text


def test_instances_use_service_address_else_node_address() -> None:
    snapshot = build_snapshot(
        {
            "reviews": [
                entry(service_tags=("version|v1",), weight=3),
                entry(node="node-2", address="10.0.0.2", service_address="172.17.0.9"),
            ],
            "gone": [],
        }
    )
    assert list(snapshot.services) == [REVIEWS]
    instances = snapshot.instances[REVIEWS]
    assert [(i.address, i.port, dict(i.labels), i.weight) for i in instances] == [
        ("10.0.0.1", 9080, {"version": "v1"}, 3),
        ("172.17.0.9", 9080, {}, 1),
    ]
    assert all(i.service_port == Port("http", 9080, Protocol.HTTP) for i in instances)


def test_parse_catalog_json_with_real_field_names() -> None:
    body = [
        {
            "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
            "Node": "foobar",
            "Address": "192.168.10.10",
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": "192.168.10.10", "wan": "10.0.10.10"},
            "NodeMeta": {"protocol": "http2"},
            "ServiceID": "reviews-v2",
            "ServiceName": "reviews",
            "ServiceTags": ["version|v2"],
            "ServiceAddress": "",
            "ServiceWeights": {"Passing": 10, "Warning": 1},
            "ServiceMeta": None,
            "ServicePort": 9080,
            "ServiceEnableTagOverride": False,
            "CreateIndex": 51,
            "ModifyIndex": 51,
        }
    ]
    (parsed,) = parse_catalog_service("reviews", body)
    assert parsed == CatalogEntry(
        node="foobar",
        address="192.168.10.10",
        service_id="reviews-v2",
        service_name="reviews",
        service_port=9080,
        service_tags=("version|v2",),
        node_meta=Labels({"protocol": "http2"}),
        weight=10,
    )
    assert parse_services({"consul": [], "reviews": ["version|v1"]}) == {
        "consul": (),
        "reviews": ("version|v1",),
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Node": "n"}, r"\[0\]\.ServiceName"),
        ({"Node": "n", "ServiceName": "r", "ServicePort": "80"}, r"\[0\]\.ServicePort"),
        ({"Node": "n", "ServiceName": "r", "ServiceTags": "v1"}, r"\[0\]\.ServiceTags"),
        ({"Node": "n", "ServiceName": "r", "NodeMeta": {"a": 1}}, r"\[0\]\.NodeMeta"),
    ],
)
def test_malformed_entries_are_reported_by_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_catalog_service("reviews", [body])


def test_blocking_index_rules() -> None:
    assert next_index(0, 7) == 7
    assert next_index(7, 7) == 7
    assert next_index(7, 3) == 0  # went backwards: start over
    assert next_index(0, 0) == 1  # never block on 0
    assert go_duration(300) == "300s"
    assert go_duration(0.5) == "0.5s"


def test_backoff_grows_and_is_bounded() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0)
    for failures, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (30, 8.0)]:
        assert ceiling / 2 <= backoff.delay(failures) <= ceiling


# -- the controller against the fake -------------------------------------------------------------


def conforms(registry: Registry) -> Registry:
    return registry


def test_conforms_to_the_registry_protocol() -> None:
    registry = conforms(ConsulRegistry("http://127.0.0.1:8500", "dc1"))
    assert registry.name == "consul:http://127.0.0.1:8500?dc=dc1"
    assert registry.status == RegistryStatus()
    assert registry.snapshot().services == {}
    assert inspect.iscoroutinefunction(registry.run)


@dataclass
class Running:
    consul: FakeConsul
    registry: ConsulRegistry
    changes: asyncio.Queue[Change]

    async def change(self) -> Change:
        return await asyncio.wait_for(self.changes.get(), EVENT_TIMEOUT)

    async def status(self, healthy: bool) -> RegistryStatus:
        return await asyncio.wait_for(
            self.registry.wait_status(lambda s: s.healthy is healthy), EVENT_TIMEOUT
        )


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    async with FakeConsul() as consul:
        consul.register("reviews", 9080, tags=["version|v1"], node_meta={"protocol": "http"})
        registry = ConsulRegistry(consul.url, "dc1", backoff=FAST)
        changes: asyncio.Queue[Change] = asyncio.Queue()
        task = asyncio.create_task(registry.run(changes.put_nowait))
        try:
            yield Running(consul, registry, changes)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def test_first_sync_brings_services_and_labels(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    status = running.registry.status
    assert status.synced
    assert status.healthy
    assert status.last_change is not None
    snapshot = running.registry.snapshot()
    assert set(snapshot.services) == {REVIEWS, "consul.service.consul"}
    assert snapshot.services[REVIEWS].ports == (Port("http", 9080, Protocol.HTTP),)
    (instance,) = snapshot.instances[REVIEWS]
    assert (instance.address, instance.port, instance.labels) == (
        "10.0.0.1",
        9080,
        Labels({"version": "v1"}),
    )
    # Then blocking queries (services, consul, reviews), in the registry's datacenter.
    await asyncio.wait_for(running.consul.until_blocked(3), EVENT_TIMEOUT)
    assert any(
        "index=" in r and "wait=300s" in r and "dc=dc1" in r for r in running.consul.requests
    )


async def test_instance_changes_are_endpoint_changes(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    running.consul.register(
        "reviews",
        9080,
        node="node-2",
        address="10.0.0.2",
        tags=["version=v2"],
        node_meta={"protocol": "http"},
    )
    assert await running.change() is Change.ENDPOINTS
    labels = [dict(i.labels) for i in running.registry.snapshot().instances[REVIEWS]]
    assert labels == [{"version": "v1"}, {"version": "v2"}]

    running.consul.deregister("reviews", node="node-2")
    assert await running.change() is Change.ENDPOINTS
    assert len(running.registry.snapshot().instances[REVIEWS]) == 1


async def test_port_and_service_changes_are_service_changes(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    running.consul.register("reviews", 9443, service_id="reviews-tls", tags=["protocol|https"])
    assert await running.change() is Change.SERVICES
    assert [p.port for p in running.registry.snapshot().services[REVIEWS].ports] == [9080, 9443]

    running.consul.register("ratings", 9080, node="node-3", address="10.0.0.3")
    assert await running.change() is Change.SERVICES
    assert "ratings.service.consul" in running.registry.snapshot().services

    running.consul.deregister("ratings", node="node-3")
    assert await running.change() is Change.SERVICES
    assert "ratings.service.consul" not in running.registry.snapshot().services


async def test_outage_keeps_the_last_snapshot_and_recovers(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    before = running.registry.snapshot()

    await running.consul.stop()
    status = await running.status(healthy=False)
    assert status.synced
    assert "Cannot connect" in status.last_error
    assert running.registry.snapshot() is before

    await running.consul.start()
    status = await running.status(healthy=True)
    assert status.last_error == ""
    assert running.registry.snapshot() == before
    assert running.changes.empty()  # nothing changed meanwhile

    await running.consul.stop()
    await running.status(healthy=False)
    running.consul.register(
        "reviews", 9080, node="node-2", address="10.0.0.2", node_meta={"protocol": "http"}
    )
    await running.consul.start()
    assert await running.change() is Change.ENDPOINTS  # what changed during the outage
    assert len(running.registry.snapshot().instances[REVIEWS]) == 2


async def test_index_going_backwards_restarts_from_zero(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    running.consul.register("reviews", 9080, node="node-2", address="10.0.0.2")
    assert await running.change() is Change.ENDPOINTS
    # Wait for the registry's blocking queries: services, consul and reviews.
    await asyncio.wait_for(running.consul.until_blocked(3), EVENT_TIMEOUT)
    previous = running.consul.index
    running.consul.rewind(1)  # a snapshot restore: the queries wake with a lower index
    running.consul.register("ratings", 9080)
    assert running.consul.index < previous
    assert await running.change() is Change.SERVICES
    assert "ratings.service.consul" in running.registry.snapshot().services
    # Had the registry kept blocking on its old, higher index, it would miss this.
    running.consul.deregister("reviews", node="node-2")
    assert await running.change() is Change.ENDPOINTS


async def test_unknown_datacenter_is_unhealthy_with_consuls_error() -> None:
    async with FakeConsul() as consul:
        registry = ConsulRegistry(consul.url, "dc9", backoff=FAST)
        task = asyncio.create_task(registry.run(lambda change: None))
        try:
            status = await asyncio.wait_for(
                registry.wait_status(lambda s: bool(s.last_error)), EVENT_TIMEOUT
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert not status.synced
    assert not status.healthy
    assert "HTTP 500 No path to datacenter" in status.last_error


async def test_run_is_cancellable_while_backing_off() -> None:
    registry = ConsulRegistry("http://127.0.0.1:9", backoff=Backoff(initial=3600, maximum=3600))
    task = asyncio.create_task(registry.run(lambda change: None))
    await asyncio.wait_for(registry.wait_status(lambda s: bool(s.last_error)), EVENT_TIMEOUT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, EVENT_TIMEOUT)
