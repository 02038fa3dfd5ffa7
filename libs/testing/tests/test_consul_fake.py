"""The fake Consul answers as Consul does where a catalog client can tell: field names,
headers, blocking queries on the index, a rewound index, datacenters, and going away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from istio.testing.consul import FakeConsul, parse_go_duration

TIMEOUT = 10.0


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any, int]:
    async with session.get(url) as response:
        assert response.headers["X-Consul-Knownleader"] == "true"
        return response.status, await response.json(), int(response.headers["X-Consul-Index"])


async def test_catalog_json_and_index(client: aiohttp.ClientSession) -> None:
    async with FakeConsul() as consul:
        consul.register(
            "reviews", 9080, tags=["version|v1"], node_meta={"protocol": "http"}, weight=5
        )
        status, services, index = await get(client, consul.url + "/v1/catalog/services")
        assert status == 200
        assert services == {"consul": [], "reviews": ["version|v1"]}
        assert index == consul.index == 2
        _, (entry,), service_index = await get(client, consul.url + "/v1/catalog/service/reviews")
        assert service_index == 2
        assert entry["Node"] == "node-1"
        assert entry["Address"] == "10.0.0.1"
        assert entry["Datacenter"] == "dc1"
        assert entry["NodeMeta"] == {"protocol": "http"}
        assert entry["ServiceID"] == "reviews"
        assert entry["ServiceName"] == "reviews"
        assert entry["ServiceTags"] == ["version|v1"]
        assert entry["ServiceAddress"] == ""
        assert entry["ServicePort"] == 9080
        assert entry["ServiceWeights"] == {"Passing": 5, "Warning": 1}
        assert entry["CreateIndex"] == entry["ModifyIndex"] == 2


async def test_blocking_query_waits_for_a_change(client: aiohttp.ClientSession) -> None:
    async with FakeConsul() as consul:
        consul.register("reviews", 9080)
        url = consul.url + f"/v1/catalog/service/reviews?index={consul.index}&wait=1m"
        query = asyncio.create_task(get(client, url))
        await asyncio.wait_for(consul.until_blocked(1), TIMEOUT)
        consul.register("ratings", 9080)  # another service: reviews' query keeps waiting
        await asyncio.wait_for(consul.until_blocked(1), TIMEOUT)
        assert not query.done()
        consul.register("reviews", 9080, node="node-2")
        _, entries, index = await asyncio.wait_for(query, TIMEOUT)
        assert [e["Node"] for e in entries] == ["node-1", "node-2"]
        assert index == consul.index


async def test_blocking_query_returns_when_its_wait_runs_out(
    client: aiohttp.ClientSession,
) -> None:
    async with FakeConsul() as consul:
        url = consul.url + f"/v1/catalog/services?index={consul.index}&wait=10ms"
        _, services, index = await asyncio.wait_for(get(client, url), TIMEOUT)
        assert services == {"consul": []}
        assert index == consul.index  # no change, same index


async def test_rewind_wakes_queries_with_a_lower_index(client: aiohttp.ClientSession) -> None:
    async with FakeConsul() as consul:
        consul.register("reviews", 9080)
        consul.register("reviews", 9081)
        query = asyncio.create_task(
            get(client, consul.url + f"/v1/catalog/services?index={consul.index}")
        )
        await asyncio.wait_for(consul.until_blocked(1), TIMEOUT)
        consul.rewind(1)
        _, _, index = await asyncio.wait_for(query, TIMEOUT)
        assert index == 1


async def test_deregistering_the_last_instance_removes_the_service(
    client: aiohttp.ClientSession,
) -> None:
    async with FakeConsul(include_consul_service=False) as consul:
        consul.register("reviews", 9080)
        async with client.put(
            consul.url + "/v1/catalog/deregister", json={"Node": "node-1", "ServiceID": "reviews"}
        ) as response:
            assert await response.json() is True
        _, services, _ = await get(client, consul.url + "/v1/catalog/services")
        assert services == {}
        _, entries, index = await get(client, consul.url + "/v1/catalog/service/reviews")
        assert entries == []
        assert index == consul.index  # the last extinction


async def test_register_over_http(client: aiohttp.ClientSession) -> None:
    async with FakeConsul() as consul:
        body = {
            "Node": "vm-1",
            "Address": "192.168.0.7",
            "Service": {"ID": "details-1", "Service": "details", "Tags": ["v=1"], "Port": 9080},
        }
        async with client.put(consul.url + "/v1/catalog/register", json=body) as response:
            assert response.status == 200
        (entry,) = consul.catalog_service("details")
        assert (entry["Node"], entry["Address"], entry["ServiceID"]) == (
            "vm-1",
            "192.168.0.7",
            "details-1",
        )


async def test_unknown_datacenter_and_bad_wait(client: aiohttp.ClientSession) -> None:
    async with FakeConsul() as consul:
        async with client.get(consul.url + "/v1/catalog/services?dc=dc9") as response:
            assert response.status == 500
            assert await response.text() == "No path to datacenter"
        async with client.get(consul.url + "/v1/catalog/services?index=1&wait=soon") as response:
            assert response.status == 400


async def test_stop_drops_blocking_queries_and_start_reuses_the_port(
    client: aiohttp.ClientSession,
) -> None:
    async with FakeConsul() as consul:
        query = asyncio.create_task(
            get(client, consul.url + f"/v1/catalog/services?index={consul.index}")
        )
        await asyncio.wait_for(consul.until_blocked(1), TIMEOUT)
        port = consul.port
        await consul.stop()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(query, TIMEOUT)
        await consul.start()
        assert consul.port == port
        status, _, _ = await get(client, consul.url + "/v1/catalog/services")
        assert status == 200


def test_go_durations() -> None:
    assert parse_go_duration("5m") == 300
    assert parse_go_duration("1m30s") == 90
    assert parse_go_duration("250ms") == 0.25
    assert parse_go_duration("0") == 0
    for bad in ("", "5", "m", "5x", "1s2"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_go_duration(bad)
