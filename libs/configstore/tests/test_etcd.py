"""What only the etcd store does: its key layout, values others wrote, long watch streams,
and a server that is not there. The shared behaviour is in test_conformance.py."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import pytest

from istio.config import Config, ConfigError, parse_object, to_object
from istio.configstore import ConfigEvent, EventType, open_store
from istio.configstore.etcd import EtcdStore
from istio.configstore.store import ConfigStore
from istio.testing.etcd import EtcdServer, EtcdServerError

pytestmark = pytest.mark.etcd

PREFIX = "/istio/config"
ROUTE_RULES = f"{PREFIX}/config.istio.io/v1alpha2/routerules"


def route_rule(name: str = "reviews-default", **meta: Any) -> Config:
    return parse_object(
        {
            "kind": "RouteRule",
            "metadata": {"name": name, **meta},
            "spec": {"destination": {"name": "reviews"}, "route": [{"labels": {"version": "v1"}}]},
        }
    )


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    async with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[EtcdStore]:
    etcd_store = open_store(f"etcd://{etcd.host}:{etcd.port}{PREFIX}")
    assert isinstance(etcd_store, EtcdStore)
    yield etcd_store
    await etcd_store.close()


@pytest.fixture
async def raw(etcd: EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A plain etcd client, as etcdctl would be."""
    async with aetcd.Client(etcd.host, etcd.port, timeout=10) as client:
        yield client


async def next_event(events: AsyncIterator[ConfigEvent]) -> ConfigEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


def test_etcd_store_is_a_config_store() -> None:
    store: ConfigStore = EtcdStore("127.0.0.1", 2379)
    assert store.registry is not None


async def test_key_layout_and_value(store: EtcdStore, raw: aetcd.Client) -> None:
    created = await store.create(route_rule(namespace="books", labels={"team": "books"}))
    handler = parse_object(
        {
            "kind": "denier",
            "metadata": {"name": "handler", "namespace": "istio-system"},
            "spec": {"status": {"code": 7}},
        }
    )
    await store.create(handler)

    stored = await raw.get(f"{ROUTE_RULES}/books/reviews-default".encode())
    assert stored is not None
    assert created.meta.resource_version == str(stored.mod_revision)
    assert created.meta.creation_timestamp is not None
    expected = to_object(created, with_status_fields=False)
    expected["metadata"]["creationTimestamp"] = created.meta.creation_timestamp.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert json.loads(stored.value) == expected
    keys = [kv.key.decode() for kv in await raw.get_prefix(f"{PREFIX}/".encode())]
    assert keys == [
        f"{PREFIX}/config.istio.io/v1alpha2/deniers/istio-system/handler",
        f"{ROUTE_RULES}/books/reviews-default",
    ]
    assert store.key("RouteRule", "books", "reviews-default") == keys[1]


async def test_update_keeps_creation_time_and_bumps_revision(store: EtcdStore) -> None:
    created = await store.create(route_rule())
    updated = await store.update(route_rule(labels={"v": "2"}))
    assert int(updated.meta.resource_version) > int(created.meta.resource_version)
    assert updated.meta.creation_timestamp == created.meta.creation_timestamp


async def test_values_that_are_not_objects_are_skipped_and_reported(
    store: EtcdStore, raw: aetcd.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="istio.configstore.etcd")
    await raw.put(f"{ROUTE_RULES}/default/not-json".encode(), b"{oops")
    events = aiter(store.watch())
    assert (await next_event(events)).type is EventType.SYNCED
    assert f"{ROUTE_RULES}/default/not-json" in caplog.text

    invalid = route_rule("no-destination")
    invalid_document = to_object(invalid)
    del invalid_document["spec"]["destination"]
    await raw.put(
        f"{ROUTE_RULES}/default/no-destination".encode(), json.dumps(invalid_document).encode()
    )
    await raw.put(
        f"{ROUTE_RULES}/default/wrong-name".encode(), json.dumps(to_object(route_rule())).encode()
    )
    await raw.put(f"{PREFIX}/stray".encode(), b"hello")
    await store.create(route_rule("good"))

    event = await next_event(events)
    assert event.type is EventType.ADDED
    assert event.config is not None
    assert event.config.meta.name == "good"
    for key, reason in [
        (f"{ROUTE_RULES}/default/no-destination", "destination is required"),
        (f"{ROUTE_RULES}/default/wrong-name", "not the key's"),
        (f"{PREFIX}/stray", "not a config key"),
    ]:
        assert any(key in r.getMessage() and reason in r.getMessage() for r in caplog.records)

    assert [c.meta.name for c in await store.list("RouteRule")] == ["good"]
    with pytest.raises(ConfigError, match=f"{ROUTE_RULES}/default/not-json: value is not JSON"):
        await store.get("RouteRule", "not-json")
    # Replacing such a value repairs it.
    repaired = await store.update(route_rule("not-json"))
    event = await next_event(events)
    assert (event.type, event.config) == (EventType.ADDED, repaired)
    await events.aclose()  # type: ignore[attr-defined]


async def test_watch_delivers_a_burst_of_writes_in_order(store: EtcdStore) -> None:
    events = aiter(store.watch(["RouteRule"]))
    assert (await next_event(events)).type is EventType.SYNCED
    await store.create(route_rule(annotations={"step": "0"}))
    for step in range(1, 51):
        await store.update(route_rule(annotations={"step": str(step)}))
    await store.delete("RouteRule", "reviews-default")

    seen = [await next_event(events) for _ in range(52)]
    assert [e.type for e in seen] == [
        EventType.ADDED,
        *[EventType.UPDATED] * 50,
        EventType.DELETED,
    ]
    configs = [e.config for e in seen if e.config is not None]
    assert [c.meta.annotations["step"] for c in configs] == [*map(str, range(51)), "50"]
    versions = [int(c.meta.resource_version) for c in configs[:-1]]
    assert versions == sorted(set(versions))
    await events.aclose()  # type: ignore[attr-defined]


async def test_concurrent_unconditional_updates_all_apply_in_revision_order(
    store: EtcdStore,
) -> None:
    await store.create(route_rule())
    events = aiter(store.watch())
    assert (await next_event(events)).type is EventType.ADDED
    assert (await next_event(events)).type is EventType.SYNCED
    results = await asyncio.gather(
        *(store.update(route_rule(annotations={"writer": str(i)})) for i in range(20))
    )
    seen = [await next_event(events) for _ in range(20)]
    assert all(e.type is EventType.UPDATED for e in seen)
    versions = [int(e.config.meta.resource_version) for e in seen if e.config is not None]
    assert versions == sorted(int(r.meta.resource_version) for r in results)
    await events.aclose()  # type: ignore[attr-defined]


async def test_close_ends_watches(store: EtcdStore) -> None:
    events = aiter(store.watch())
    assert (await next_event(events)).type is EventType.SYNCED
    pending = asyncio.ensure_future(anext(events))
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, timeout=10)
    with pytest.raises(ConfigError, match="closed"):
        await store.list("RouteRule")


async def test_watch_ends_with_a_clear_error_when_etcd_goes_away(tmp_path: Path) -> None:
    async with EtcdServer(tmp_path) as etcd:
        store = EtcdStore(etcd.host, etcd.port)
        events = aiter(store.watch())
        assert (await next_event(events)).type is EventType.SYNCED
    try:
        with pytest.raises(ConfigError, match=f"etcd at {etcd.host}:{etcd.port}"):
            await next_event(events)
    finally:
        await store.close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_unreachable_etcd_is_a_clear_error() -> None:
    port = unused_port()
    store = open_store(f"etcd://127.0.0.1:{port}/istio/config")
    try:
        with pytest.raises(ConfigError, match=f"cannot reach etcd at 127.0.0.1:{port}"):
            await store.list("RouteRule")
        with pytest.raises(ConfigError, match=f"cannot reach etcd at 127.0.0.1:{port}"):
            await store.create(route_rule())
        with pytest.raises(ConfigError, match=f"cannot reach etcd at 127.0.0.1:{port}"):
            await anext(aiter(store.watch()))
    finally:
        await store.close()


async def test_server_stops_on_exit(tmp_path: Path) -> None:
    async with EtcdServer(tmp_path) as etcd:
        process = etcd._process
        assert process is not None
        assert etcd.url == f"http://127.0.0.1:{etcd.port}"
    assert process.returncode is not None


async def test_server_that_never_comes_up_reports_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-etcd"
    fake.write_text("#!/bin/sh\necho 'member failed to start: disk on fire' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(EtcdServerError, match="disk on fire"):
        async with EtcdServer(tmp_path / "data", binary=str(fake)):
            pass


async def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(EtcdServerError, match="make setup"):
        async with EtcdServer(tmp_path, binary=str(tmp_path / "no-etcd")):
            pass
