"""The Eureka registry: pure conversion, and the controller against the fake Eureka server."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from istio.model import Labels, Port, Protocol
from istio.pilot.registry import Change, Registry, RegistryStatus
from istio.pilot.registry.eureka import Backoff, EurekaRegistry, apps_url
from istio.pilot.registry.eureka.conversion import (
    EurekaInstance,
    build_snapshot,
    instance_labels,
    instance_ports,
    instance_protocol,
    parse_applications,
)
from istio.testing.eureka import FakeEureka

EVENT_TIMEOUT = 10.0
FOO = "foo.bar.local"


def instance(
    host: str = FOO,
    ip: str = "10.0.0.1",
    port: int | None = 5000,
    secure_port: int | None = None,
    status: str = "UP",
    metadata: dict[str, str] | None = None,
) -> EurekaInstance:
    return EurekaInstance(
        app="FOO_BAR_LOCAL",
        host_name=host,
        ip_addr=ip,
        status=status,
        port=port,
        secure_port=secure_port,
        metadata=Labels(metadata or {}),
    )


# -- conversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Protocol.TCP),
        ("", Protocol.TCP),
        ("HTCPCP", Protocol.TCP),
        ("udp", Protocol.UDP),
        ("http", Protocol.HTTP),
        ("HTTP2", Protocol.HTTP2),
        ("https", Protocol.HTTPS),
        ("grpc", Protocol.GRPC),
        ("mongo", Protocol.MONGO),
        ("redis", Protocol.REDIS),
    ],
)
def test_protocol_from_istio_protocol_metadata(value: str | None, expected: Protocol) -> None:
    metadata = {"kit": "kat"} if value is None else {"istio.protocol": value, "kit": "kat"}
    assert instance_protocol(metadata) is expected


def test_metadata_becomes_labels_without_special_keys() -> None:
    metadata = {
        "@class": "java.util.Collections$EmptyMap",
        "istio.protocol": "http2",
        "kit": "kat",
        "spam": "coolaid",
        "bad": "a,b",
    }
    assert instance_labels(metadata) == Labels({"kit": "kat", "spam": "coolaid"})


def test_ports_are_named_by_number_and_secure_port_of_http_is_https() -> None:
    assert instance_ports(
        instance(port=5000, secure_port=5443, metadata={"istio.protocol": "http"})
    ) == (
        Port("5000", 5000, Protocol.HTTP),
        Port("5443", 5443, Protocol.HTTPS),
    )
    assert instance_ports(instance(port=None, secure_port=5443)) == (
        Port("5443", 5443, Protocol.TCP),
    )


def test_services_by_host_name_across_applications_and_only_up() -> None:
    snapshot = build_snapshot(
        [
            instance(ip="10.0.0.1", port=5000, secure_port=5443, metadata={"version": "v1"}),
            instance(ip="10.0.0.2", port=6000, metadata={"version": "v2"}),
            instance(host="FOO.bar.local", ip="10.0.0.3", port=5000),
            instance(host="foo.biz.local", ip="10.0.0.4"),
            instance(host="down.local", ip="10.0.0.5", status="DOWN"),
            instance(host="noports.local", ip="10.0.0.6", port=None),
        ]
    )
    assert list(snapshot.services) == [FOO, "foo.biz.local"]
    assert [p.port for p in snapshot.services[FOO].ports] == [5000, 5443, 6000]
    assert [(i.address, i.port, dict(i.labels)) for i in snapshot.instances[FOO]] == [
        ("10.0.0.1", 5000, {"version": "v1"}),
        ("10.0.0.1", 5443, {"version": "v1"}),
        ("10.0.0.2", 6000, {"version": "v2"}),
        ("10.0.0.3", 5000, {}),
    ]
    assert all(i.service is snapshot.services[FOO] for i in snapshot.instances[FOO])


def test_first_instance_wins_a_protocol_conflict(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        snapshot = build_snapshot(
            [
                instance(ip="10.0.0.1", metadata={"istio.protocol": "grpc"}),
                instance(ip="10.0.0.2", metadata={"istio.protocol": "http"}),
            ]
        )
    assert snapshot.services[FOO].ports == (Port("5000", 5000, Protocol.GRPC),)
    assert "conflicting" in caplog.text


def test_parse_accepts_eurekas_json_quirks() -> None:
    body = {
        "applications": {
            "versions__delta": "1",
            "apps__hashcode": "UP_2_",
            "application": {  # one application: an object, not a list
                "name": "REVIEWS",
                "instance": {  # one instance: an object, not a list
                    "instanceId": "r1",
                    "hostName": "reviews.local",
                    "app": "REVIEWS",
                    "ipAddr": "10.0.0.1",
                    "status": "UP",
                    "port": {"$": "9080", "@enabled": "true"},
                    "securePort": {"$": 7002, "@enabled": False},
                    "metadata": {"@class": "java.util.Collections$EmptyMap"},
                },
            },
        }
    }
    assert parse_applications(body) == (
        EurekaInstance(
            app="REVIEWS",
            host_name="reviews.local",
            ip_addr="10.0.0.1",
            status="UP",
            port=9080,
            metadata=Labels({"@class": "java.util.Collections$EmptyMap"}),
            instance_id="r1",
        ),
    )
    empty = {"applications": {"versions__delta": "1", "apps__hashcode": "", "application": []}}
    assert parse_applications(empty) == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "applications"),
        ({"applications": {"application": [{"instance": [7]}]}}, r"instance\[0\]"),
        (
            {
                "applications": {
                    "application": {"instance": {"port": {"$": "x", "@enabled": "true"}}}
                }
            },
            r"instance\[0\]\.port",
        ),
    ],
)
def test_malformed_json_is_reported_by_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_applications(body)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://eureka:8080", "http://eureka:8080/eureka/v2/apps"),
        ("http://eureka:8080/", "http://eureka:8080/eureka/v2/apps"),
        ("http://eureka:8080/eureka/v2", "http://eureka:8080/eureka/v2/apps"),
        ("http://eureka:8761/eureka/", "http://eureka:8761/eureka/apps"),
    ],
)
def test_apps_url_accepts_root_or_api_base(base: str, expected: str) -> None:
    assert apps_url(base) == expected


def test_backoff_grows_and_is_bounded() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0)
    for failures, ceiling in [(1, 1.0), (2, 2.0), (4, 8.0), (30, 8.0)]:
        assert ceiling / 2 <= backoff.delay(failures) <= ceiling


# -- the controller against the fake -------------------------------------------------------------


def conforms(registry: Registry) -> Registry:
    return registry


def test_conforms_to_the_registry_protocol() -> None:
    registry = conforms(EurekaRegistry("http://eureka:8080"))
    assert registry.name == "eureka:http://eureka:8080"
    assert registry.status == RegistryStatus()
    assert registry.snapshot().services == {}
    assert inspect.iscoroutinefunction(registry.run)


@pytest.fixture
async def eureka() -> AsyncIterator[FakeEureka]:
    async with FakeEureka() as server:
        server.register(
            "reviews",
            "reviews.local",
            "10.0.0.1",
            9080,
            metadata={"version": "v1", "istio.protocol": "http"},
            instance_id="reviews-1",
        )
        yield server


async def test_refresh_brings_up_instances_and_labels(eureka: FakeEureka) -> None:
    eureka.register("reviews", "reviews.local", "10.0.0.9", 9080, status="STARTING")
    registry = EurekaRegistry(eureka.url + "/eureka/v2")
    assert await registry.refresh_now() is Change.SERVICES  # the first sync
    assert registry.status.synced
    assert registry.status.healthy
    snapshot = registry.snapshot()
    assert snapshot.services["reviews.local"].ports == (Port("9080", 9080, Protocol.HTTP),)
    (found,) = snapshot.instances["reviews.local"]
    assert (found.address, found.labels) == ("10.0.0.1", Labels({"version": "v1"}))
    assert eureka.requests[-1] == ("GET", "/eureka/v2/apps", "application/json")
    assert await registry.refresh_now() is None  # nothing changed


async def test_change_kinds(eureka: FakeEureka) -> None:
    registry = EurekaRegistry(eureka.url)
    await registry.refresh_now()
    second = eureka.register(
        "reviews",
        "reviews.local",
        "10.0.0.2",
        9080,
        metadata={"version": "v2", "istio.protocol": "http"},
    )
    assert await registry.refresh_now() is Change.ENDPOINTS
    eureka.set_status("reviews", second, "OUT_OF_SERVICE")
    assert await registry.refresh_now() is Change.ENDPOINTS
    assert len(registry.snapshot().instances["reviews.local"]) == 1
    eureka.register(
        "reviews",
        "reviews.local",
        "10.0.0.3",
        9080,
        secure_port=9443,
        metadata={"istio.protocol": "http"},
    )
    assert await registry.refresh_now() is Change.SERVICES
    eureka.register("ratings", "ratings.local", "10.0.0.4", 9080)
    assert await registry.refresh_now() is Change.SERVICES
    assert set(registry.snapshot().services) == {"reviews.local", "ratings.local"}


async def test_outage_keeps_the_last_snapshot_and_recovers(eureka: FakeEureka) -> None:
    registry = EurekaRegistry(eureka.url)
    await registry.refresh_now()
    before = registry.snapshot()

    await eureka.stop()
    assert await registry.refresh_now() is None
    status = registry.status
    assert status.synced
    assert not status.healthy
    assert "Cannot connect" in status.last_error
    assert registry.snapshot() is before

    eureka.register(
        "reviews", "reviews.local", "10.0.0.2", 9080, metadata={"istio.protocol": "http"}
    )
    await eureka.start()
    assert await registry.refresh_now() is Change.ENDPOINTS
    assert registry.status.healthy
    assert registry.status.last_error == ""


async def test_a_server_answering_otherwise_is_unhealthy(eureka: FakeEureka) -> None:
    registry = EurekaRegistry(eureka.url + "/nothing-here")
    await registry.refresh_now()
    assert not registry.status.healthy
    assert "HTTP 404" in registry.status.last_error


async def test_run_polls_and_reports_changes(eureka: FakeEureka) -> None:
    registry = EurekaRegistry(eureka.url, refresh=3600)
    changes: asyncio.Queue[Change] = asyncio.Queue()
    task = asyncio.create_task(registry.run(changes.put_nowait))
    try:
        assert await asyncio.wait_for(changes.get(), EVENT_TIMEOUT) is Change.SERVICES
        eureka.deregister("reviews", "reviews-1")
        eureka.register(
            "reviews", "reviews.local", "10.0.0.5", 9080, metadata={"istio.protocol": "http"}
        )
        assert await registry.refresh_now() is Change.ENDPOINTS
        assert changes.get_nowait() is Change.ENDPOINTS  # reported to run's callback too
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_refreshes_on_its_own(eureka: FakeEureka) -> None:
    # The poll's sleep is the design under test here; the test itself awaits the change.
    registry = EurekaRegistry(eureka.url, refresh=0.01)
    changes: asyncio.Queue[Change] = asyncio.Queue()
    task = asyncio.create_task(registry.run(changes.put_nowait))
    try:
        assert await asyncio.wait_for(changes.get(), EVENT_TIMEOUT) is Change.SERVICES
        eureka.register("ratings", "ratings.local", "10.0.0.4", 9080)
        assert await asyncio.wait_for(changes.get(), EVENT_TIMEOUT) is Change.SERVICES
        await eureka.stop()
        await asyncio.wait_for(registry.wait_status(lambda s: not s.healthy), EVENT_TIMEOUT)
        await eureka.start()
        await asyncio.wait_for(registry.wait_status(lambda s: s.healthy), EVENT_TIMEOUT)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
