"""The fake Eureka serves its documented JSON, quirks included, under both API prefixes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from istio.testing.eureka import FakeEureka

JSON_ONLY = {"Accept": "application/json"}


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=JSON_ONLY) as session:
        yield session


async def apps(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200
        return (await response.json())["applications"]


async def test_one_instance_is_an_object_and_ports_are_eurekas(
    client: aiohttp.ClientSession,
) -> None:
    async with FakeEureka() as eureka:
        eureka.register("reviews", "reviews.local", "10.0.0.1", 9080, instance_id="r1")
        body = await apps(client, eureka.url + "/eureka/v2/apps")
        assert body["apps__hashcode"] == "UP_1_"
        application = body["application"]
        assert application["name"] == "REVIEWS"
        instance = application["instance"]
        assert instance["instanceId"] == "r1"
        assert instance["hostName"] == "reviews.local"
        assert instance["ipAddr"] == "10.0.0.1"
        assert instance["status"] == "UP"
        assert instance["port"] == {"$": 9080, "@enabled": "true"}
        assert instance["securePort"] == {"$": 7002, "@enabled": "false"}
        assert instance["metadata"] == {"@class": "java.util.Collections$EmptyMap"}


async def test_lists_when_several_or_asked_to(client: aiohttp.ClientSession) -> None:
    async with FakeEureka(single_as_object=False) as eureka:
        assert (await apps(client, eureka.url + "/eureka/apps"))["application"] == []
        eureka.register("reviews", "reviews.local", "10.0.0.1", 9080)
        body = await apps(client, eureka.url + "/eureka/apps")
        assert isinstance(body["application"], list)
        assert isinstance(body["application"][0]["instance"], list)


async def test_register_status_and_delete_over_http(client: aiohttp.ClientSession) -> None:
    async with FakeEureka() as eureka:
        base = eureka.url + "/eureka/v2/apps/RATINGS"
        instance = {
            "instanceId": "ratings-1",
            "hostName": "ratings.local",
            "app": "RATINGS",
            "ipAddr": "10.0.0.2",
            "status": "UP",
            "port": {"$": 9080, "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "metadata": {"version": "v1"},
        }
        async with client.post(base, json={"instance": instance}) as response:
            assert response.status == 204
        async with client.put(base + "/ratings-1/status?value=OUT_OF_SERVICE") as response:
            assert response.status == 200
        async with client.get(base) as response:
            found = (await response.json())["application"]["instance"]
        assert found["status"] == "OUT_OF_SERVICE"
        assert found["metadata"] == {"version": "v1"}
        async with client.delete(base + "/ratings-1") as response:
            assert response.status == 200
        async with client.get(base) as response:
            assert response.status == 404


async def test_json_only() -> None:
    async with FakeEureka() as eureka, aiohttp.ClientSession() as session:
        headers = {"Accept": "application/xml"}
        async with session.get(eureka.url + "/eureka/v2/apps", headers=headers) as response:
            assert response.status == 406
        assert eureka.requests == [("GET", "/eureka/v2/apps", "application/xml")]
