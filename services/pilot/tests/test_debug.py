"""PilotServer's wiring and its HTTP side: readiness only after every source synced, the debug
views, and Prometheus metrics, against a real file store, a fake registry and a grpc.aio ADS
client over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from istio.config import parse_documents
from istio.configstore import ConfigEvent, EventType, open_store
from istio.model import Port, Protocol, Proxy, Service
from istio.pilot.ads import Debounce
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.registry import Change, ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.server import PilotServer
from istio.pilot.xds.resources import CLUSTER, LISTENER, Resources

NODE = "sidecar~10.0.0.1~app-1.default~default.svc.cluster.local"
REVIEWS = Service("reviews.default.svc.cluster.local", (Port("http", 9080, Protocol.HTTP),))
RULE = """
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: reviews-default}
spec:
  destination: {name: reviews}
  precedence: 1
  route:
  - labels: {version: v1}
"""


def generate(snapshot: MeshSnapshot, proxy: Proxy) -> Resources:
    """A cluster per service, and one more per route rule (so config changes show in CDS)."""
    names = [*snapshot.services, *(f"rule-{c.meta.name}" for c in snapshot.of_kind("RouteRule"))]
    return Resources(
        MappingProxyType({CLUSTER: {name: cluster_pb2.Cluster(name=name) for name in names}})
    )


class FakeRegistry:
    """A Registry the test drives: `publish` changes its snapshot and status and tells Pilot."""

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

    async def publish(
        self, services: Collection[Service] = (), *, healthy: bool = True, error: str = ""
    ) -> None:
        await self.running.wait()
        assert self._changed is not None
        self._snapshot = RegistrySnapshot(
            MappingProxyType({s.hostname: s for s in services}), MappingProxyType({})
        )
        self._status = RegistryStatus(
            synced=True, healthy=healthy, last_error=error, last_change=datetime.now(UTC)
        )
        self._changed(Change.SERVICES)

    def lose_source(self, error: str) -> None:
        self._status = replace(self._status, healthy=False, last_error=error)


class FakeAggregate:
    """Its members' services together; runs them all with one callback."""

    def __init__(self, members: Collection[FakeRegistry]) -> None:
        self.members = tuple(members)

    @property
    def name(self) -> str:
        return "aggregate"

    def snapshot(self) -> RegistrySnapshot:
        services = {h: s for m in self.members for h, s in m.snapshot().services.items()}
        return RegistrySnapshot(MappingProxyType(services), MappingProxyType({}))

    @property
    def status(self) -> RegistryStatus:
        return RegistryStatus(synced=all(m.status.synced for m in self.members))

    async def run(self, changed: ChangeCallback) -> None:
        await asyncio.gather(*(m.run(changed) for m in self.members))


class HeldStore:
    """A config store whose watch lists nothing and says SYNCED only when told to."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[ConfigEvent | None] = asyncio.Queue()

    def sync(self) -> None:
        self.events.put_nowait(ConfigEvent(EventType.SYNCED))

    async def watch(self, kinds: Collection[str] | None = None) -> AsyncIterator[ConfigEvent]:
        while (event := await self.events.get()) is not None:
            yield event

    async def close(self) -> None:
        self.events.put_nowait(None)


class Pilot:
    def __init__(self, server: PilotServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http

    async def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.server.http_port}{path}"
        async with self.http.get(url) as response:
            return response.status, await response.text()

    async def get_json(self, path: str) -> Any:
        status, text = await self.get(path)
        assert status == 200, text
        return yaml.safe_load(text)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.server.metrics.get_sample_value(name, labels)


async def running(store: Any, *registries: FakeRegistry) -> AsyncIterator[Pilot]:
    server = PilotServer(
        FakeAggregate(registries),
        store,
        generate,
        members=registries,
        debounce=Debounce(quiet=0.01, max_delay=1.0),
    )
    await server.start("127.0.0.1:0", "127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as http:
            yield Pilot(server, http)
    finally:
        await server.stop(grace=0)


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry("files:/mesh")


@pytest.fixture
async def held(registry: FakeRegistry) -> AsyncIterator[tuple[Pilot, HeldStore]]:
    store = HeldStore()
    async for pilot in running(store, registry):
        yield pilot, store


@pytest.fixture
async def pilot(registry: FakeRegistry, tmp_path: Path) -> AsyncIterator[Pilot]:
    store = open_store(f"file://{tmp_path / 'config'}")
    (rule,), problems = parse_documents(RULE, "rule.yaml")
    assert not problems
    await store.create(rule)
    async for pilot in running(store, registry):
        await registry.publish([REVIEWS])
        await pilot.server.wait_ready()
        yield pilot


async def test_ready_only_after_registries_and_store_synced(
    held: tuple[Pilot, HeldStore], registry: FakeRegistry
) -> None:
    pilot, store = held
    status, text = await pilot.get("/ready")
    assert status == 503
    assert "registries not synced yet: files:/mesh" in text
    assert "config store not synced yet" in text

    await registry.publish([REVIEWS])
    status, text = await pilot.get("/ready")
    assert status == 503
    assert "registries" not in text
    assert "config store not synced yet" in text
    assert pilot.server.ads.snapshot is None  # nothing half-listed reaches a proxy

    store.sync()
    await pilot.server.wait_ready()
    assert await pilot.get("/ready") == (200, "ready\n")
    snapshot = pilot.server.ads.snapshot
    assert snapshot is not None
    assert list(snapshot.services) == [REVIEWS.hostname]


async def test_ready_waits_for_every_registry() -> None:
    first, second = FakeRegistry("files:/mesh"), FakeRegistry("consul:http://consul:8500")
    store = HeldStore()
    async for pilot in running(store, first, second):
        store.sync()
        await first.publish([REVIEWS])
        status, text = await pilot.get("/ready")
        assert status == 503
        assert text == "not ready: registries not synced yet: consul:http://consul:8500\n"
        await second.publish()
        await pilot.server.wait_ready()
        assert (await pilot.get("/ready"))[0] == 200


async def test_syncz_and_adsz_show_each_proxy(pilot: Pilot) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{pilot.server.grpc_port}")
    try:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
        request.node.id = NODE
        await call.write(request)
        clusters = await asyncio.wait_for(call.read(), 10)
        assert sorted(r.type_url for r in clusters.resources) == [CLUSTER, CLUSTER]
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=CLUSTER, version_info=clusters.version_info, response_nonce=clusters.nonce
            )
        )
        # A first LDS request is answered after the ACK before it has been handled.
        await call.write(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
        await asyncio.wait_for(call.read(), 10)
        await pilot.server.ads.wait_idle()

        (proxy,) = await pilot.get_json("/debug/syncz")
        assert proxy["node"] == NODE
        assert proxy["types"]["cds"]["sent_version"] == clusters.version_info
        assert proxy["types"]["cds"]["acked_version"] == clusters.version_info
        assert proxy["types"]["cds"]["sent_nonce"] == clusters.nonce
        assert proxy["types"]["cds"]["synced"] is True
        assert proxy["types"]["cds"]["last_nack"] is None
        assert proxy["types"]["lds"]["acked_version"] == ""

        (stream,) = await pilot.get_json("/debug/adsz")
        assert stream["node"] == NODE
        assert stream["ip"] == "10.0.0.1"
        assert stream["subscriptions"] == {"cds": "*", "lds": "*"}

        assert pilot.metric("pilot_xds_connected_proxies") == 1
        assert pilot.metric("pilot_xds_pushes_total", type="cds") == 1
        assert pilot.metric("pilot_xds_pushes_total", type="lds") == 1
        status, text = await pilot.get("/metrics")
        assert status == 200
        assert 'pilot_xds_pushes_total{type="cds"} 1.0' in text
        assert 'pilot_xds_nacks_total{type="cds"} 0.0' in text
        assert "pilot_xds_connected_proxies 1.0" in text
        assert "pilot_xds_push_seconds_bucket" in text
        assert 'pilot_registry_healthy{registry="files:/mesh"} 1.0' in text
        call.cancel()
    finally:
        await channel.close()


async def test_config_changes_reach_configz_and_proxies(
    pilot: Pilot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = list(yaml.safe_load_all((await pilot.get("/debug/configz"))[1]))
    assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [
        ("RouteRule", "reviews-default")
    ]
    assert documents[0]["spec"]["destination"] == {"name": "reviews"}
    as_json = await pilot.get_json("/debug/configz?format=json")
    assert as_json[0]["metadata"]["name"] == "reviews-default"
    snapshot = pilot.server.ads.snapshot
    assert snapshot is not None
    assert [c.meta.name for c in snapshot.of_kind("RouteRule")] == ["reviews-default"]

    pushed: asyncio.Queue[MeshSnapshot] = asyncio.Queue()
    push = pilot.server.ads.push

    def recording_push(snapshot: MeshSnapshot, change: Change) -> None:
        push(snapshot, change)
        pushed.put_nowait(snapshot)

    monkeypatch.setattr(pilot.server.ads, "push", recording_push)
    writer = open_store(f"file://{tmp_path / 'config'}")
    try:
        await writer.delete("RouteRule", "reviews-default")
    finally:
        await writer.close()
    # Another process's delete, found by the store's file watch.
    snapshot = await asyncio.wait_for(pushed.get(), 10)
    assert snapshot.of_kind("RouteRule") == ()
    assert (await pilot.get("/debug/configz"))[1] == ""


async def test_a_registry_that_goes_away_keeps_its_snapshot_and_says_so(
    pilot: Pilot, registry: FakeRegistry
) -> None:
    registry.lose_source("connection refused")
    (status,) = await pilot.get_json("/debug/registryz")
    assert status == {
        "name": "files:/mesh",
        "synced": True,
        "healthy": False,
        "last_error": "connection refused",
        "last_change": status["last_change"],
        "services": 1,
        "instances": 0,
    }
    assert pilot.metric("pilot_registry_healthy", registry="files:/mesh") == 0
    assert pilot.metric("pilot_registry_services", registry="files:/mesh") == 1
    assert (await pilot.get("/ready"))[0] == 200
    snapshot = pilot.server.ads.snapshot
    assert snapshot is not None
    assert list(snapshot.services) == [REVIEWS.hostname]
