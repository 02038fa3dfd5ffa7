"""The client against the fake API server: requests, paged lists, and watches that survive
closed streams, 410 Gone and outages, telling the reader when they are interrupted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio.kube import (
    AccessError,
    ApiError,
    ClusterAccess,
    EventType,
    KubeClient,
    Resource,
    Unreachable,
    WatchEvent,
    load_cluster_access,
)
from istio.kube import client as kube_client
from istio.testing.kube import FakeKubeAPI

PODS = Resource("", "v1", "pods")
NODES = Resource("", "v1", "nodes", namespaced=False)
RULES = Resource("config.istio.io", "v1alpha2", "routerules")


def pod(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    }


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI() as server:
        yield server


@pytest.fixture
async def client(api: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[KubeClient]:
    opened = KubeClient(load_cluster_access(api.write_kubeconfig(tmp_path / "kubeconfig")))
    yield opened
    await opened.close()


async def next_event(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


async def next_object_event(events: AsyncIterator[WatchEvent]) -> tuple[EventType, str]:
    """The next event about an object, as (type, namespace/name), skipping health events."""
    while True:
        event = await next_event(events)
        if event.object is not None:
            meta = event.object["metadata"]
            return event.type, f"{meta.get('namespace', '')}/{meta['name']}"


async def drain(events: AsyncIterator[WatchEvent]) -> None:
    while True:
        await next_event(events)


async def until(events: AsyncIterator[WatchEvent], wanted: EventType) -> WatchEvent:
    while (event := await next_event(events)).type is not wanted:
        pass
    return event


def test_resource_paths() -> None:
    assert PODS.collection() == "/api/v1/pods"
    assert PODS.collection("default") == "/api/v1/namespaces/default/pods"
    assert NODES.collection("default") == "/api/v1/nodes"
    assert NODES.item(None, "node-1") == "/api/v1/nodes/node-1"
    assert (
        RULES.item("ns", "a b") == "/apis/config.istio.io/v1alpha2/namespaces/ns/routerules/a%20b"
    )
    assert str(RULES) == "routerules.config.istio.io"
    assert str(PODS) == "pods"


async def test_request_and_errors(api: FakeKubeAPI, client: KubeClient) -> None:
    created = await client.request("POST", PODS.collection("default"), pod("a"))
    assert created["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as raised:
        await client.request("GET", PODS.item("default", "missing"))
    assert (raised.value.code, raised.value.reason) == (404, "NotFound")
    assert raised.value.details["name"] == "missing"
    nameless_container = {"metadata": {"name": "x"}, "spec": {"containers": [{"image": "a"}]}}
    with pytest.raises(ApiError, match=r"422 Invalid: .*spec\.containers\[0\]\.name"):
        await client.request("POST", PODS.collection("default"), nameless_container)


async def test_list_reads_every_page(
    api: FakeKubeAPI, client: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_client, "LIST_PAGE", 2)
    for index in range(5):
        api.create_object(pod(f"p{index}", namespace="apps" if index % 2 else "default"))
    listed = await client.list(PODS)
    assert sorted(o["metadata"]["name"] for o in listed.items) == ["p0", "p1", "p2", "p3", "p4"]
    assert listed.resource_version == api.resource_version
    pages = [r for r in api.requests if r.path == "/api/v1/pods"]
    assert len(pages) == 3
    assert [o["metadata"]["name"] for o in (await client.list(PODS, "apps")).items] == ["p1", "p3"]


async def test_watch_lists_then_follows(api: FakeKubeAPI, client: KubeClient) -> None:
    api.create_object(pod("before"))
    api.create_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
    async with contextlib.aclosing(client.watch([PODS, NODES])) as events:
        assert [(e.type, e.resource) for e in [await next_event(events) for _ in range(3)]] == [
            (EventType.ADDED, PODS),
            (EventType.ADDED, NODES),
            (EventType.SYNCED, None),
        ]
        api.create_object(pod("after", namespace="apps"))
        assert await next_object_event(events) == (EventType.ADDED, "apps/after")
        changed = pod("before", team="books")
        stored = api.get_object("v1", "Pod", "before", "default")
        assert stored is not None
        changed["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"]
        await client.request("PUT", PODS.item("default", "before"), changed)
        assert await next_object_event(events) == (EventType.MODIFIED, "default/before")
        api.delete_object("v1", "Pod", "after", "apps")
        assert await next_object_event(events) == (EventType.DELETED, "apps/after")


async def test_watch_relists_after_410_gone_and_reports_the_gap(
    api: FakeKubeAPI, client: KubeClient
) -> None:
    api.create_object(pod("kept"))
    api.create_object(pod("removed"))
    async with contextlib.aclosing(client.watch([PODS])) as events:
        await until(events, EventType.SYNCED)
        with api.watch_outage():
            api.create_object(pod("added"))
            api.delete_object("v1", "Pod", "removed", "default")
            api.compact()  # the next watch from the old version gets 410 Gone
        gap = {await next_object_event(events), await next_object_event(events)}
        assert gap == {(EventType.ADDED, "default/added"), (EventType.DELETED, "default/removed")}
        assert any(r.path == "/api/v1/pods" and not r.query.get("watch") for r in api.requests)
        api.create_object(pod("later"))
        assert await next_object_event(events) == (EventType.ADDED, "default/later")


async def test_watch_resumes_from_a_bookmark(api: FakeKubeAPI, client: KubeClient) -> None:
    async with contextlib.aclosing(client.watch([PODS])) as events:
        await until(events, EventType.SYNCED)
        api.create_object(pod("first"))  # seen: the watch is open
        assert await next_object_event(events) == (EventType.ADDED, "default/first")
        # Other kinds move the version on; a bookmark tells the pod watch, which then resumes
        # from there when the server ends its stream.
        api.create_object({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
        api.send_bookmarks()
        bookmarked = api.resource_version
        api.close_watches()
        api.create_object(pod("after"))
        assert await next_object_event(events) == (EventType.ADDED, "default/after")
        watches = [r.query["resourceVersion"] for r in api.requests if r.query.get("watch")]
        assert watches[-1] == bookmarked


async def test_an_outage_is_reported_and_the_watch_resumes(
    api: FakeKubeAPI, client: KubeClient
) -> None:
    async with contextlib.aclosing(client.watch([PODS])) as events:
        await until(events, EventType.SYNCED)
        with api.watch_outage():
            interrupted = await until(events, EventType.INTERRUPTED)
            api.create_object(pod("during"))
        assert interrupted.resource == PODS
        assert "503" in interrupted.reason
        assert (await until(events, EventType.RESUMED)).resource == PODS
        assert await next_object_event(events) == (EventType.ADDED, "default/during")


async def test_a_server_that_goes_away_is_reported(tmp_path: Path) -> None:
    api = FakeKubeAPI()
    await api.start()
    client = KubeClient(load_cluster_access(api.write_kubeconfig(tmp_path / "kubeconfig")))
    async with contextlib.aclosing(client.watch([PODS])) as events:
        await until(events, EventType.SYNCED)
        await api.stop()
        while (
            "cannot reach the Kubernetes API server"
            not in (await until(events, EventType.INTERRUPTED)).reason
        ):
            pass
    await client.close()


async def test_an_error_retrying_cannot_cure_ends_the_watch(
    api: FakeKubeAPI, client: KubeClient
) -> None:
    async with contextlib.aclosing(client.watch([RULES])) as events:
        await until(events, EventType.SYNCED)
        api.delete_object(
            "apiextensions.k8s.io/v1", "CustomResourceDefinition", "routerules.config.istio.io"
        )
        with pytest.raises(ApiError) as raised:
            await drain(events)
        assert raised.value.code == 404
        assert raised.value.resource == RULES


async def test_listing_errors_are_raised_at_once(api: FakeKubeAPI, tmp_path: Path) -> None:
    path = api.write_kubeconfig(tmp_path / "kubeconfig")
    document = yaml.safe_load(path.read_text())
    document["users"][0]["user"]["token"] = "wrong"
    path.write_text(yaml.safe_dump(document))
    client = KubeClient(load_cluster_access(path))
    with pytest.raises(ApiError) as raised:
        await anext(client.watch([PODS]))
    assert (raised.value.code, raised.value.resource) == (401, PODS)
    await client.close()

    dead = KubeClient(ClusterAccess(server="http://127.0.0.1:9", source="test"))
    with pytest.raises(Unreachable, match=r"http://127.0.0.1:9 \(test\)"):
        await dead.list(PODS)
    await dead.close()


async def test_close_ends_watches(client: KubeClient) -> None:
    events: AsyncGenerator[WatchEvent, None] = client.watch([PODS])
    await until(events, EventType.SYNCED)
    pending = asyncio.ensure_future(next_event(events))
    await client.close()
    with pytest.raises(StopAsyncIteration):
        await pending


def test_access_from_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    account = tmp_path / "account"
    with pytest.raises(AccessError, match="no Kubernetes configuration found"):
        load_cluster_access(service_account_dir=account)
    account.mkdir()
    (account / "token").write_text("secret\n")
    access = load_cluster_access(service_account_dir=account)
    assert access.server == "https://[fd00::1]:443"
    assert access.authorization() == "Bearer secret"
    (account / "token").unlink()
    with pytest.raises(AccessError, match="cannot read the token file"):
        access.authorization()
