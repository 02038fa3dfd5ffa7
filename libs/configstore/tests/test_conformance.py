"""One behaviour for every store: CRUD, optimistic concurrency, watch order, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from istio.config import AlreadyExists, Config, ConfigError, Conflict, NotFound, parse_object
from istio.configstore import ConfigEvent, ConfigStore, EventType


def route_rule(name: str = "reviews-default", weight_v1: int = 100, **meta: Any) -> Config:
    routes = [{"labels": {"version": "v1"}, "weight": weight_v1}]
    if weight_v1 != 100:
        routes.append({"labels": {"version": "v3"}, "weight": 100 - weight_v1})
    return parse_object(
        {
            "apiVersion": "config.istio.io/v1alpha2",
            "kind": "RouteRule",
            "metadata": {"name": name, **meta},
            "spec": {
                "destination": {"name": "reviews"},
                "precedence": 1,
                "route": routes,
                "httpReqTimeout": {"simpleTimeout": {"timeout": "500ms"}},
            },
        }
    )


async def next_event(events: AsyncIterator[ConfigEvent]) -> ConfigEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


async def test_create_get_list_round_trip(store: ConfigStore) -> None:
    created = await store.create(route_rule(labels={"team": "books"}))
    assert created.meta.resource_version
    fetched = await store.get("RouteRule", "reviews-default")
    assert fetched is not None
    assert fetched.same_content(route_rule(labels={"team": "books"}))
    assert fetched.meta.resource_version == created.meta.resource_version
    assert fetched.meta.creation_timestamp is not None
    assert [c.meta.name for c in await store.list("RouteRule")] == ["reviews-default"]
    assert await store.list("DestinationPolicy") == []
    assert await store.get("RouteRule", "missing") is None


async def test_namespaces_are_separate(store: ConfigStore) -> None:
    await store.create(route_rule(namespace="default"))
    await store.create(route_rule(namespace="books"))
    assert len(await store.list("RouteRule")) == 2
    assert [c.meta.namespace for c in await store.list("RouteRule", "books")] == ["books"]
    await store.delete("RouteRule", "reviews-default", "books")
    assert [c.meta.namespace for c in await store.list("RouteRule")] == ["default"]


async def test_create_twice_is_rejected_and_changes_nothing(store: ConfigStore) -> None:
    first = await store.create(route_rule())
    with pytest.raises(AlreadyExists, match="reviews-default"):
        await store.create(route_rule(weight_v1=50))
    current = await store.get("RouteRule", "reviews-default")
    assert current is not None
    assert current.spec == first.spec


async def test_update_with_current_version(store: ConfigStore) -> None:
    created = await store.create(route_rule())
    updated = await store.update(
        route_rule(weight_v1=50).with_meta(resource_version=created.meta.resource_version)
    )
    assert updated.meta.resource_version != created.meta.resource_version
    current = await store.get("RouteRule", "reviews-default")
    assert current is not None
    assert current.spec == route_rule(weight_v1=50).spec


async def test_update_with_stale_version_conflicts(store: ConfigStore) -> None:
    created = await store.create(route_rule())
    await store.update(route_rule(weight_v1=75))
    with pytest.raises(Conflict):
        await store.update(
            route_rule(weight_v1=50).with_meta(resource_version=created.meta.resource_version)
        )
    current = await store.get("RouteRule", "reviews-default")
    assert current is not None
    assert current.spec == route_rule(weight_v1=75).spec
    with pytest.raises(Conflict):
        await store.delete(
            "RouteRule", "reviews-default", resource_version=created.meta.resource_version
        )
    assert await store.get("RouteRule", "reviews-default") is not None


async def test_missing_objects(store: ConfigStore) -> None:
    with pytest.raises(NotFound, match="reviews-default"):
        await store.update(route_rule())
    with pytest.raises(NotFound, match="reviews-default"):
        await store.delete("RouteRule", "reviews-default")
    assert await store.list("RouteRule") == []


async def test_invalid_writes_are_rejected_and_change_nothing(store: ConfigStore) -> None:
    good = await store.create(route_rule())
    bad = Config(good.meta, type(good.spec)())  # no destination: invalid
    with pytest.raises(ConfigError, match="destination is required"):
        await store.update(bad)
    with pytest.raises(ConfigError, match="destination is required"):
        await store.create(bad.with_meta(name="other"))
    assert [c.meta.name for c in await store.list("RouteRule")] == ["reviews-default"]
    current = await store.get("RouteRule", "reviews-default")
    assert current is not None
    assert current.spec == good.spec


async def test_watch_sees_existing_then_changes_in_order(store: ConfigStore) -> None:
    await store.create(route_rule("existing"))
    events = aiter(store.watch())
    first = await next_event(events)
    assert (first.type, first.config and first.config.meta.name) == (EventType.ADDED, "existing")
    assert (await next_event(events)).type is EventType.SYNCED

    created = await store.create(route_rule())
    await store.update(
        route_rule(weight_v1=50).with_meta(resource_version=created.meta.resource_version)
    )
    await store.delete("RouteRule", "reviews-default")
    seen = [await next_event(events) for _ in range(3)]
    assert [e.type for e in seen] == [EventType.ADDED, EventType.UPDATED, EventType.DELETED]
    assert all(e.config is not None and e.config.meta.name == "reviews-default" for e in seen)
    assert seen[1].config is not None
    assert seen[1].config.spec == route_rule(weight_v1=50).spec
    await events.aclose()  # type: ignore[attr-defined]


async def test_watch_filters_kinds(store: ConfigStore) -> None:
    events = aiter(store.watch(["DestinationPolicy"]))
    assert (await next_event(events)).type is EventType.SYNCED
    await store.create(route_rule())
    policy = parse_object(
        {
            "kind": "DestinationPolicy",
            "metadata": {"name": "reviews-lb"},
            "spec": {"destination": {"name": "reviews"}, "loadBalancing": {"name": "RANDOM"}},
        }
    )
    await store.create(policy)
    event = await next_event(events)
    assert event.type is EventType.ADDED
    assert event.config is not None
    assert event.config.meta.kind == "DestinationPolicy"
    await events.aclose()  # type: ignore[attr-defined]


async def test_every_kind_round_trips(store: ConfigStore) -> None:
    """Mixer kinds are stored too, with their typed or free-form specs."""
    handler = parse_object(
        {
            "kind": "denier",
            "metadata": {"name": "handler", "namespace": "istio-system"},
            "spec": {"status": {"code": 7, "message": "Not allowed"}},
        }
    )
    rule = parse_object(
        {
            "kind": "rule",
            "metadata": {"name": "denyreviewsv3", "namespace": "istio-system"},
            "spec": {
                "match": 'destination.labels["app"] == "ratings"',
                "actions": [
                    {"handler": "handler.denier", "instances": ["denyrequest.checknothing"]}
                ],
            },
        }
    )
    for config in (handler, rule):
        await store.create(config)
        stored = await store.get(config.meta.kind, config.meta.name, "istio-system")
        assert stored is not None
        assert stored.same_content(config)
