"""The fake API server behaves as Kubernetes does where clients can tell: Status objects,
conflicts, validation, discovery, selectors and watches (replay, bookmarks, 410 Gone)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from istio.testing.kube import FakeKubeAPI

PODS = "/api/v1/namespaces/default/pods"
RULES = "/apis/config.istio.io/v1alpha2/namespaces/default/routerules"


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    }


def route_rule(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "config.istio.io/v1alpha2",
        "kind": "RouteRule",
        "metadata": {"name": name},
        "spec": spec or {"destination": {"name": "reviews"}},
    }


class Client:
    """Just enough of a Kubernetes client to poke the fake: JSON in, (code, JSON) out."""

    def __init__(self, api: FakeKubeAPI, session: aiohttp.ClientSession) -> None:
        self.api = api
        self.session = session

    async def call(
        self, method: str, path: str, body: Any = None, **params: str
    ) -> tuple[int, dict[str, Any]]:
        async with self.session.request(
            method, self.api.url + path, json=body, params=params, headers=self.api.headers
        ) as response:
            return response.status, await response.json()

    async def watch(self, path: str, **params: str) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request; ends when the server ends the stream."""
        async with self.session.get(
            self.api.url + path, params={"watch": "1", **params}, headers=self.api.headers
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/json")
            while line := await response.content.readline():
                yield json.loads(line)


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI() as server:
        yield server


@pytest.fixture
async def client(api: FakeKubeAPI) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(api, session)


async def next_event(events: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(anext(events), timeout=10)


async def test_discovery_lists_core_and_custom_resources(client: Client) -> None:
    assert (await client.call("GET", "/api"))[1]["versions"] == ["v1"]
    _, groups = await client.call("GET", "/apis")
    assert groups["kind"] == "APIGroupList"
    names = {g["name"] for g in groups["groups"]}
    assert {"apps", "apiextensions.k8s.io", "config.istio.io", "networking.istio.io"} <= names
    _, core = await client.call("GET", "/api/v1")
    pods = next(r for r in core["resources"] if r["name"] == "pods")
    assert (pods["kind"], pods["namespaced"]) == ("Pod", True)
    _, istio = await client.call("GET", "/apis/config.istio.io/v1alpha2")
    rules = next(r for r in istio["resources"] if r["name"] == "routerules")
    assert rules["kind"] == "RouteRule"
    assert rules["categories"] == ["istio-io"]
    code, status = await client.call("GET", "/apis/nothing.example.com/v1")
    assert (code, status["reason"]) == (404, "NotFound")


async def test_requests_need_the_bearer_token(api: FakeKubeAPI) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(api.url + PODS) as response:
            assert response.status == 401
            assert await response.json() == {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "Unauthorized",
                "reason": "Unauthorized",
                "code": 401,
            }
        async with session.get(api.url + "/version") as response:
            assert response.status == 200
            assert (await response.json())["major"] == "1"


async def test_create_get_list_and_the_server_set_fields(client: Client) -> None:
    code, created = await client.call("POST", PODS, pod("reviews-v1", app="reviews"))
    assert code == 201
    meta = created["metadata"]
    assert (created["kind"], meta["namespace"]) == ("Pod", "default")
    assert meta["uid"]
    assert meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > 0
    await client.call("POST", "/api/v1/namespaces/books/pods", pod("details-v1"))

    code, fetched = await client.call("GET", f"{PODS}/reviews-v1")
    assert (code, fetched) == (200, created)
    _, listed = await client.call("GET", PODS)
    assert listed["kind"] == "PodList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["reviews-v1"]
    assert "kind" not in listed["items"][0]  # typed lists leave it out, as Kubernetes does
    _, everywhere = await client.call("GET", "/api/v1/pods")
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]] == [
        ("books", "details-v1"),
        ("default", "reviews-v1"),
    ]
    assert int(everywhere["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])
    _, namespaces = await client.call("GET", "/api/v1/namespaces/books")
    assert namespaces["status"] == {"phase": "Active"}


async def test_errors_are_status_objects(client: Client) -> None:
    code, status = await client.call("GET", f"{PODS}/missing")
    assert (code, status) == (
        404,
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'pods "missing" not found',
            "reason": "NotFound",
            "details": {"name": "missing", "kind": "pods"},
            "code": 404,
        },
    )
    await client.call("POST", RULES, route_rule("reviews"))
    code, status = await client.call("POST", RULES, route_rule("reviews"))
    assert (code, status["reason"], status["message"]) == (
        409,
        "AlreadyExists",
        'routerules.config.istio.io "reviews" already exists',
    )
    assert status["details"] == {
        "name": "reviews",
        "group": "config.istio.io",
        "kind": "routerules",
    }


async def test_replace_and_delete_honour_resource_versions(client: Client) -> None:
    _, created = await client.call("POST", RULES, route_rule("reviews"))
    stale = created["metadata"]["resourceVersion"]
    replacement = {**created, "spec": {"destination": {"name": "ratings"}}}
    code, replaced = await client.call("PUT", f"{RULES}/reviews", replacement)
    assert code == 200
    assert int(replaced["metadata"]["resourceVersion"]) > int(stale)
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert replaced["metadata"]["generation"] == 2

    code, status = await client.call("PUT", f"{RULES}/reviews", replacement)  # stale version
    assert (code, status["reason"]) == (409, "Conflict")
    assert "the object has been modified" in status["message"]

    unversioned = {**replacement, "metadata": {"name": "reviews"}}
    code, status = await client.call("PUT", f"{RULES}/reviews", unversioned)
    assert (code, status["reason"]) == (422, "Invalid")
    assert status["details"]["causes"][0]["field"] == "metadata.resourceVersion"

    precondition = {"kind": "DeleteOptions", "preconditions": {"resourceVersion": stale}}
    code, status = await client.call("DELETE", f"{RULES}/reviews", precondition)
    assert (code, status["reason"]) == (409, "Conflict")
    current = {"preconditions": {"resourceVersion": replaced["metadata"]["resourceVersion"]}}
    code, deleted = await client.call("DELETE", f"{RULES}/reviews", current)
    assert (code, deleted["metadata"]["name"]) == (200, "reviews")
    assert (await client.call("GET", f"{RULES}/reviews"))[0] == 404


async def test_builtin_objects_are_replaced_without_a_version(client: Client) -> None:
    await client.call("POST", PODS, pod("reviews-v1"))
    code, replaced = await client.call("PUT", f"{PODS}/reviews-v1", pod("reviews-v1", app="x"))
    assert (code, replaced["metadata"]["labels"]) == (200, {"app": "x"})


async def test_invalid_pod_is_rejected_with_422(client: Client) -> None:
    invalid = pod("reviews-v1")
    del invalid["spec"]["containers"][0]["name"]
    code, status = await client.call("POST", PODS, invalid)
    assert (code, status["reason"]) == (422, "Invalid")
    assert (
        status["message"] == 'Pod "reviews-v1" is invalid: spec.containers[0].name: Required value'
    )
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueRequired",
            "message": "Required value",
            "field": "spec.containers[0].name",
        }
    ]
    wrong_type = pod("reviews-v1")
    wrong_type["spec"]["containers"] = "app"
    assert (await client.call("POST", PODS, wrong_type))[0] == 422
    code, status = await client.call("POST", PODS, pod("Not_A_Name"))
    assert (code, status["details"]["causes"][0]["field"]) == (422, "metadata.name")
    assert (await client.call("GET", PODS))[1]["items"] == []


async def test_custom_resources_are_checked_against_their_schema(client: Client) -> None:
    not_an_object = {**route_rule("reviews"), "spec": "reviews"}
    code, status = await client.call("POST", RULES, not_an_object)
    assert (code, status["reason"]) == (422, "Invalid")
    assert status["details"]["causes"][0]["field"] == "spec"
    assert status["message"].startswith('RouteRule.config.istio.io "reviews" is invalid: spec:')

    with_extra = {**route_rule("reviews"), "extra": {"pruned": True}}
    code, created = await client.call("POST", RULES, with_extra)
    assert code == 201
    assert "extra" not in created  # pruned, as a structural schema does
    code, status = await client.call(
        "POST", RULES, {**with_extra, "metadata": {"name": "other"}}, fieldValidation="Strict"
    )
    assert (code, status["details"]["causes"][0]["field"]) == (422, "extra")


async def test_the_namespace_in_the_body_must_match_the_url(client: Client) -> None:
    wrong = route_rule("reviews")
    wrong["metadata"]["namespace"] = "books"
    code, status = await client.call("POST", RULES, wrong)
    assert (code, status["reason"]) == (400, "BadRequest")


async def test_label_and_field_selectors(client: Client) -> None:
    await client.call("POST", PODS, pod("reviews-v1", app="reviews", version="v1"))
    await client.call("POST", PODS, pod("reviews-v2", app="reviews", version="v2", canary="yes"))
    await client.call("POST", PODS, pod("ratings-v1", app="ratings", version="v1"))

    async def names(**params: str) -> list[str]:
        _, listed = await client.call("GET", PODS, **params)
        return [i["metadata"]["name"] for i in listed["items"]]

    assert await names(labelSelector="app=reviews") == ["reviews-v1", "reviews-v2"]
    assert await names(labelSelector="app==reviews,version!=v1") == ["reviews-v2"]
    assert await names(labelSelector="version in (v1, v3)") == ["ratings-v1", "reviews-v1"]
    assert await names(labelSelector="app notin (reviews)") == ["ratings-v1"]
    assert await names(labelSelector="!canary,app") == ["ratings-v1", "reviews-v1"]
    assert await names(fieldSelector="metadata.name=reviews-v2") == ["reviews-v2"]
    code, status = await client.call("GET", PODS, labelSelector="app=(")
    assert (code, status["reason"]) == (400, "BadRequest")


async def test_list_pages_with_limit_and_continue(client: Client) -> None:
    for index in range(5):
        await client.call("POST", PODS, pod(f"pod-{index}"))
    _, first = await client.call("GET", PODS, limit="2")
    assert [i["metadata"]["name"] for i in first["items"]] == ["pod-0", "pod-1"]
    assert first["metadata"]["remainingItemCount"] == 3
    _, rest = await client.call(
        "GET", PODS, limit="5", **{"continue": first["metadata"]["continue"]}
    )
    assert [i["metadata"]["name"] for i in rest["items"]] == ["pod-2", "pod-3", "pod-4"]
    assert "continue" not in rest["metadata"]


async def test_merge_patch(api: FakeKubeAPI, client: Client) -> None:
    await client.call("POST", PODS, pod("reviews-v1", app="reviews", tier="web"))
    patch = {"metadata": {"labels": {"tier": None, "version": "v1"}}}
    async with client.session.patch(
        f"{api.url}{PODS}/reviews-v1",
        data=json.dumps(patch),
        headers={**api.headers, "Content-Type": "application/merge-patch+json"},
    ) as response:
        assert response.status == 200
        patched = await response.json()
    assert patched["metadata"]["labels"] == {"app": "reviews", "version": "v1"}


async def test_creating_a_crd_serves_its_resource(client: Client) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {"size": {"type": "integer"}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    widgets = "/apis/example.com/v1/namespaces/default/widgets"
    assert (await client.call("GET", widgets))[0] == 404
    code, created = await client.call(
        "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
    )
    assert code == 201
    assert {c["type"] for c in created["status"]["conditions"]} == {"NamesAccepted", "Established"}

    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    code, status = await client.call("POST", widgets, widget)
    assert (code, status["details"]["causes"][0]["field"]) == (422, "spec")
    code, status = await client.call("POST", widgets, {**widget, "spec": {"size": "big"}})
    assert (code, status["details"]["causes"][0]["field"]) == (422, "spec.size")
    assert (await client.call("POST", widgets, {**widget, "spec": {"size": 3}}))[0] == 201

    await client.call(
        "DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com"
    )
    assert (await client.call("GET", widgets))[0] == 404

    misnamed = {**crd, "metadata": {"name": "gadgets.example.com"}}
    code, status = await client.call(
        "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", misnamed
    )
    assert (code, status["details"]["causes"][0]["field"]) == (422, "metadata.name")


async def test_strict_namespaces_must_exist() -> None:
    async with FakeKubeAPI(strict_namespaces=True) as api, aiohttp.ClientSession() as session:
        client = Client(api, session)
        code, status = await client.call("POST", "/api/v1/namespaces/books/pods", pod("p"))
        assert (code, status["message"]) == (404, 'namespaces "books" not found')
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "books"}}
        assert (await client.call("POST", "/api/v1/namespaces", namespace))[0] == 201
        assert (await client.call("POST", "/api/v1/namespaces/books/pods", pod("p")))[0] == 201


async def test_watch_from_zero_lists_then_follows(client: Client) -> None:
    await client.call("POST", PODS, pod("existing"))
    events = aiter(client.watch(PODS, resourceVersion="0"))
    first = await next_event(events)
    assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "existing")
    assert first["object"]["kind"] == "Pod"  # watch events carry kind and apiVersion
    await client.call("POST", PODS, pod("new"))
    second = await next_event(events)
    assert (second["type"], second["object"]["metadata"]["name"]) == ("ADDED", "new")
    await events.aclose()  # type: ignore[attr-defined]


async def test_watch_replays_changes_after_its_resource_version(client: Client) -> None:
    _, created = await client.call("POST", RULES, route_rule("reviews"))
    since = created["metadata"]["resourceVersion"]
    _, replaced = await client.call(
        "PUT", f"{RULES}/reviews", {**created, "spec": {"destination": {"name": "ratings"}}}
    )
    await client.call("POST", PODS, pod("unrelated"))
    await client.call("DELETE", f"{RULES}/reviews")

    events = aiter(client.watch("/apis/config.istio.io/v1alpha2/routerules", resourceVersion=since))
    modified, deleted = await next_event(events), await next_event(events)
    assert (modified["type"], modified["object"]) == ("MODIFIED", replaced)
    assert deleted["type"] == "DELETED"
    assert int(deleted["object"]["metadata"]["resourceVersion"]) > int(
        replaced["metadata"]["resourceVersion"]
    )
    await client.call("POST", RULES, route_rule("later"))
    live = await next_event(events)
    assert (live["type"], live["object"]["metadata"]["name"]) == ("ADDED", "later")
    await events.aclose()  # type: ignore[attr-defined]


async def test_watch_with_a_selector_sees_objects_leave_it(client: Client) -> None:
    _, created = await client.call("POST", PODS, pod("reviews-v1", app="reviews"))
    events = aiter(
        client.watch(
            PODS,
            resourceVersion=created["metadata"]["resourceVersion"],
            labelSelector="app=reviews",
        )
    )
    await client.call("PUT", f"{PODS}/reviews-v1", pod("reviews-v1", app="ratings"))
    left = await next_event(events)
    assert (left["type"], left["object"]["metadata"]["labels"]) == ("DELETED", {"app": "reviews"})
    await client.call("PUT", f"{PODS}/reviews-v1", pod("reviews-v1", app="reviews"))
    assert (await next_event(events))["type"] == "ADDED"
    await events.aclose()  # type: ignore[attr-defined]


async def test_bookmarks_only_when_allowed(api: FakeKubeAPI, client: Client) -> None:
    with_bookmarks = aiter(
        client.watch(PODS, resourceVersion=api.resource_version, allowWatchBookmarks="true")
    )
    without = aiter(client.watch(PODS, resourceVersion=api.resource_version))
    await client.call("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "c"}})
    # Both watches are open once their first event arrives: a pod bounds the wait.
    await client.call("POST", PODS, pod("first"))
    assert (await next_event(with_bookmarks))["type"] == "ADDED"
    assert (await next_event(without))["type"] == "ADDED"

    api.send_bookmarks()
    bookmark = await next_event(with_bookmarks)
    assert bookmark == {
        "type": "BOOKMARK",
        "object": {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": api.resource_version},
        },
    }
    await client.call("POST", PODS, pod("second"))
    assert (await next_event(without))["type"] == "ADDED"  # no bookmark came first
    await with_bookmarks.aclose()  # type: ignore[attr-defined]
    await without.aclose()  # type: ignore[attr-defined]


async def test_watch_from_a_compacted_version_is_410_gone(api: FakeKubeAPI, client: Client) -> None:
    _, created = await client.call("POST", PODS, pod("reviews-v1"))
    since = created["metadata"]["resourceVersion"]
    await client.call("PUT", f"{PODS}/reviews-v1", pod("reviews-v1", app="x"))
    api.compact()
    events = [e async for e in client.watch(PODS, resourceVersion=since)]
    assert len(events) == 1
    error = events[0]
    assert error["type"] == "ERROR"
    status = error["object"]
    assert (status["kind"], status["status"], status["code"]) == ("Status", "Failure", 410)
    assert status["reason"] == "Expired"
    assert status["message"].startswith(f"too old resource version: {since} ")
    current = [
        e
        async for e in client.watch(PODS, resourceVersion=api.resource_version, timeoutSeconds="1")
    ]
    assert current == []  # from the current version nothing is missing: no error


async def test_history_is_bounded() -> None:
    async with FakeKubeAPI(history=3) as api, aiohttp.ClientSession() as session:
        client = Client(api, session)
        _, created = await client.call("POST", PODS, pod("p0"))
        for index in range(1, 5):
            await client.call("POST", PODS, pod(f"p{index}"))
        events = [
            e
            async for e in client.watch(
                PODS, resourceVersion=created["metadata"]["resourceVersion"]
            )
        ]
        assert [e["object"]["code"] for e in events] == [410]


async def test_watch_timeout_seconds_ends_the_stream(api: FakeKubeAPI, client: Client) -> None:
    events = [
        e
        async for e in client.watch(PODS, resourceVersion=api.resource_version, timeoutSeconds="1")
    ]
    assert events == []


async def test_close_watches_and_outage(api: FakeKubeAPI, client: Client) -> None:
    events = aiter(client.watch(PODS, resourceVersion=api.resource_version))
    await client.call("POST", PODS, pod("first"))
    assert (await next_event(events))["type"] == "ADDED"
    with api.watch_outage():
        with pytest.raises(StopAsyncIteration):
            await next_event(events)
        async with client.session.get(
            api.url + PODS, params={"watch": "1"}, headers=api.headers
        ) as response:
            assert response.status == 503
        assert (await client.call("POST", PODS, pod("during")))[0] == 201


async def test_write_kubeconfig_points_at_the_server(api: FakeKubeAPI, tmp_path: Path) -> None:
    path = api.write_kubeconfig(tmp_path / "kube" / "config", context="test")
    config = yaml.safe_load(path.read_text())
    assert config["current-context"] == "test"
    assert config["clusters"][0]["cluster"]["server"] == api.url
    assert config["users"][0]["user"]["token"] == api.token


async def test_requests_are_recorded(api: FakeKubeAPI, client: Client) -> None:
    await client.call("GET", PODS, labelSelector="app=reviews")
    recorded = api.requests[-1]
    assert (recorded.method, recorded.path, recorded.status) == ("GET", PODS, 200)
    assert recorded.query == {"labelSelector": "app=reviews"}


async def test_in_process_access_matches_http(api: FakeKubeAPI, client: Client) -> None:
    created = api.create_object(
        {**pod("seeded"), "metadata": {"name": "seeded", "namespace": "books"}}
    )
    assert (await client.call("GET", "/api/v1/namespaces/books/pods/seeded"))[1] == created
    assert api.get_object("v1", "Pod", "seeded", "books") == created
    assert [p["metadata"]["name"] for p in api.list_objects("v1", "Pod")] == ["seeded"]
    api.delete_object("v1", "Pod", "seeded", "books")
    assert api.get_object("v1", "Pod", "seeded", "books") is None


def test_istio_crds_are_installed_by_default() -> None:
    api = FakeKubeAPI()
    names = {
        c["metadata"]["name"]
        for c in api.list_objects("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    }
    assert {"routerules.config.istio.io", "serviceentries.networking.istio.io"} <= names
    assert not FakeKubeAPI(crds=[]).list_objects(
        "apiextensions.k8s.io/v1", "CustomResourceDefinition"
    )
