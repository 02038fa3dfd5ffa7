"""The Kubernetes registry against the fake API server: real Service, Endpoints, Pod and Node
JSON (validated as the API server validates them), watches with resourceVersions, bookmarks and
410 Gone."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from istio.kube import KubeClient, Resource, load_cluster_access
from istio.model import AuthPolicy, Labels, Protocol
from istio.pilot.registry import Change, RegistryStatus
from istio.pilot.registry.kube import KubeRegistry
from istio.testing.kube import FakeKubeAPI

REVIEWS = "reviews.default.svc.cluster.local"
MONGODB = "mongodb.db.svc.cluster.local"
ENDPOINTS = Resource("", "v1", "endpoints")
PODS = Resource("", "v1", "pods")
SERVICES = Resource("", "v1", "services")


def node(name: str, region: str, zone: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/region": region,
                "topology.kubernetes.io/zone": zone,
            },
        },
        "spec": {"podCIDR": "10.1.0.0/24"},
    }


def pod(
    name: str, ip: str, node_name: str, namespace: str = "default", **labels: str
) -> dict[str, Any]:
    app = labels.get("app", name)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "serviceAccountName": f"bookinfo-{app}",
            "nodeName": node_name,
            "containers": [
                {
                    "name": app,
                    "image": f"istio/examples-bookinfo-{app}:1.5.0",
                    "ports": [{"containerPort": 9080, "name": "http"}],
                },
                {"name": "istio-proxy", "image": "istio/proxy:0.2.12", "args": ["proxy"]},
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.168.0.10",
        },
    }


def service(
    name: str, port: int, port_name: str, cluster_ip: str, namespace: str = "default"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "selector": {"app": name},
            "ports": [{"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def address(
    ip: str, pod_name: str | None, node_name: str, namespace: str = "default"
) -> dict[str, Any]:
    found: dict[str, Any] = {"ip": ip, "nodeName": node_name}
    if pod_name:
        found["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pod_name}
    return found


def endpoints(
    name: str,
    port: int,
    port_name: str,
    ready: list[dict[str, Any]],
    not_ready: list[dict[str, Any]] | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    subset: dict[str, Any] = {
        "addresses": ready,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }
    if not_ready:
        subset["notReadyAddresses"] = not_ready
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "subsets": [subset],
    }


def bookinfo(api: FakeKubeAPI) -> None:
    api.create_object(node("node-a", "us-east1", "us-east1-b"))
    api.create_object(node("node-b", "us-east1", "us-east1-c"))
    api.create_object(pod("reviews-v1", "10.1.0.4", "node-a", app="reviews", version="v1"))
    api.create_object(pod("reviews-v2", "10.1.0.5", "node-b", app="reviews", version="v2"))
    api.create_object(pod("reviews-v3", "10.1.0.6", "node-b", app="reviews", version="v3"))
    api.create_object(service("reviews", 9080, "http", "10.0.0.12"))
    api.create_object(
        endpoints(
            "reviews",
            9080,
            "http",
            [
                address("10.1.0.4", "reviews-v1", "node-a"),
                address("10.1.0.5", "reviews-v2", "node-b"),
            ],
            not_ready=[address("10.1.0.6", "reviews-v3", "node-b")],
        )
    )
    # A headless service in another namespace, whose endpoints name no pod: found by IP.
    api.create_object(
        pod("mongodb-0", "10.1.0.8", "node-a", namespace="db", app="mongodb", version="v1")
    )
    api.create_object(service("mongodb", 27017, "mongo", "None", namespace="db"))
    api.create_object(
        endpoints("mongodb", 27017, "mongo", [address("10.1.0.8", None, "node-a")], namespace="db")
    )


@dataclass
class Running:
    registry: KubeRegistry
    changes: asyncio.Queue[Change]
    api: FakeKubeAPI
    client: KubeClient

    async def change(self) -> Change:
        return await asyncio.wait_for(self.changes.get(), timeout=10)

    async def status(self, predicate: Any) -> RegistryStatus:
        return await asyncio.wait_for(self.registry.wait_status(predicate), timeout=10)

    async def replace(self, resource: Resource, namespace: str, name: str, change: Any) -> None:
        """Read, change and PUT an object, as kubectl edit does."""
        current = await self.client.request("GET", resource.item(namespace, name))
        changed = copy.deepcopy(current)
        change(changed)
        await self.client.request("PUT", resource.item(namespace, name), changed)

    def addresses(self, host: str = REVIEWS) -> list[str]:
        return [i.address for i in self.registry.snapshot().instances.get(host, ())]


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI() as server:
        bookinfo(server)
        yield server


@pytest.fixture
async def running(api: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[Running]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    registry = KubeRegistry(kubeconfig=kubeconfig)
    changes: asyncio.Queue[Change] = asyncio.Queue()
    task = asyncio.create_task(registry.run(changes.put_nowait))
    client = KubeClient(load_cluster_access(kubeconfig))
    yield Running(registry, changes, api, client)
    await client.close()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_services_with_labels_accounts_and_localities_from_pods(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    status = running.registry.status
    assert status.synced
    assert status.healthy
    assert running.registry.name == "kubernetes"
    snapshot = running.registry.snapshot()
    # every namespace, kube-system's and default's built-ins aside
    assert set(snapshot.services) == {REVIEWS, MONGODB}
    reviews = snapshot.services[REVIEWS]
    assert (reviews.address, reviews.namespace) == ("10.0.0.12", "default")
    assert [(p.name, p.port, p.protocol) for p in reviews.ports] == [("http", 9080, Protocol.HTTP)]
    assert reviews.service_accounts == ("spiffe://cluster.local/ns/default/sa/bookinfo-reviews",)
    found = snapshot.instances[REVIEWS]
    # reviews-v3 is not ready: not an instance
    assert [(i.address, i.port, i.labels, i.service_account, i.locality) for i in found] == [
        (
            "10.1.0.4",
            9080,
            Labels({"app": "reviews", "version": "v1"}),
            "bookinfo-reviews",
            "us-east1/us-east1-b",
        ),
        (
            "10.1.0.5",
            9080,
            Labels({"app": "reviews", "version": "v2"}),
            "bookinfo-reviews",
            "us-east1/us-east1-c",
        ),
    ]


async def test_headless_service_in_another_namespace(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    mongodb = running.registry.snapshot().services[MONGODB]
    assert (mongodb.address, mongodb.namespace, mongodb.ports[0].protocol) == (
        "",
        "db",
        Protocol.MONGO,
    )
    (instance,) = running.registry.snapshot().instances[MONGODB]
    assert (instance.address, instance.port, instance.labels["app"]) == (
        "10.1.0.8",
        27017,
        "mongodb",
    )
    assert instance.service_account == "bookinfo-mongodb"  # the pod found by its IP


async def test_an_endpoints_update_is_an_endpoints_change(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    before = running.registry.snapshot()

    def ready_v3(obj: dict[str, Any]) -> None:
        subset = obj["subsets"][0]
        subset["addresses"].append(subset.pop("notReadyAddresses")[0])

    await running.replace(ENDPOINTS, "default", "reviews", ready_v3)
    assert await running.change() is Change.ENDPOINTS
    assert running.addresses() == ["10.1.0.4", "10.1.0.5", "10.1.0.6"]
    assert running.registry.snapshot().instances[REVIEWS][2].labels["version"] == "v3"
    assert len(before.instances[REVIEWS]) == 2


async def test_pod_changes_reach_the_instances(running: Running) -> None:
    assert await running.change() is Change.SERVICES

    def relabel(obj: dict[str, Any]) -> None:
        obj["metadata"]["labels"]["version"] = "v1-canary"

    await running.replace(PODS, "default", "reviews-v1", relabel)
    assert await running.change() is Change.ENDPOINTS
    assert running.registry.snapshot().instances[REVIEWS][0].labels["version"] == "v1-canary"

    def new_status(obj: dict[str, Any]) -> None:  # nothing the mesh reads: no change
        obj["status"]["hostIP"] = "192.168.0.11"

    await running.replace(PODS, "default", "reviews-v2", new_status)
    running.api.delete_object("v1", "Pod", "reviews-v1", "default")
    assert await running.change() is Change.ENDPOINTS  # v2 still runs as bookinfo-reviews
    first = running.registry.snapshot().instances[REVIEWS][0]
    assert (first.labels, first.service_account) == (Labels(), "")


async def test_service_port_changes_are_service_changes(running: Running) -> None:
    assert await running.change() is Change.SERVICES

    def rename_port(obj: dict[str, Any]) -> None:
        obj["spec"]["ports"][0]["name"] = "grpc"

    await running.replace(SERVICES, "default", "reviews", rename_port)
    assert await running.change() is Change.SERVICES
    reviews = running.registry.snapshot().services[REVIEWS]
    assert reviews.ports[0].protocol is Protocol.GRPC
    assert running.addresses() == []  # the endpoints still name port `http`

    running.api.delete_object("v1", "Service", "mongodb", "db")
    assert await running.change() is Change.SERVICES
    assert MONGODB not in running.registry.snapshot().services


async def test_auth_annotations_override_the_mesh_per_port(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    assert await running.change() is Change.SERVICES

    def annotate(value: str) -> Any:
        def change(obj: dict[str, Any]) -> None:
            obj["metadata"].setdefault("annotations", {})["auth.istio.io/9080"] = value

        return change

    await running.replace(SERVICES, "default", "reviews", annotate("NONE"))
    assert await running.change() is Change.SERVICES  # a full push: clusters and listeners
    snapshot = running.registry.snapshot()
    assert snapshot.services[REVIEWS].ports[0].auth_policy is AuthPolicy.NONE
    assert {i.service_port.auth_policy for i in snapshot.instances[REVIEWS]} == {AuthPolicy.NONE}

    # A bad value: logged once, naming the Service and the annotation; the mesh's policy again.
    with caplog.at_level(logging.WARNING, logger="istio.pilot.registry.kube.controller"):
        await running.replace(SERVICES, "default", "reviews", annotate("STRICT"))
        assert await running.change() is Change.SERVICES
        assert running.registry.snapshot().services[REVIEWS].ports[0].auth_policy is None

        def ready_v3(obj: dict[str, Any]) -> None:
            subset = obj["subsets"][0]
            subset["addresses"].append(subset.pop("notReadyAddresses")[0])

        # Re-converted on an Endpoints change, the Service is not warned about again.
        await running.replace(ENDPOINTS, "default", "reviews", ready_v3)
        assert await running.change() is Change.ENDPOINTS
    warned = [r.getMessage() for r in caplog.records if "auth.istio.io" in r.getMessage()]
    assert warned == [
        "kubernetes: Service default/reviews: annotation auth.istio.io/9080: 'STRICT' is not "
        "NONE or MUTUAL_TLS; the mesh's authPolicy applies to the port"
    ]
    assert running.registry.status.healthy


async def test_node_locality_changes(running: Running) -> None:
    assert await running.change() is Change.SERVICES

    def move(obj: dict[str, Any]) -> None:
        obj["metadata"]["labels"]["topology.kubernetes.io/zone"] = "us-east1-d"

    await running.replace(Resource("", "v1", "nodes", namespaced=False), "", "node-a", move)
    assert await running.change() is Change.ENDPOINTS
    assert running.registry.snapshot().instances[REVIEWS][0].locality == "us-east1/us-east1-d"


async def test_the_watch_survives_410_gone(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    before_outage = len(running.api.requests)

    def scale_down(obj: dict[str, Any]) -> None:
        obj["subsets"][0]["addresses"].pop()

    with running.api.watch_outage():  # the registry cannot watch while this happens
        await running.replace(ENDPOINTS, "default", "reviews", scale_down)
        running.api.compact()  # so its next watch gets 410 Gone
    assert await running.change() is Change.ENDPOINTS
    assert running.addresses() == ["10.1.0.4"]
    relists = [
        r
        for r in running.api.requests[before_outage:]
        if r.path == "/api/v1/endpoints" and not r.query.get("watch")
    ]
    assert relists, "the registry listed endpoints again after 410 Gone"
    await running.status(lambda s: s.healthy)

    running.api.create_object(service("ratings", 9080, "http", "10.0.0.13"))
    assert await running.change() is Change.SERVICES  # and it follows changes again


async def test_a_server_going_away_keeps_the_last_snapshot(running: Running) -> None:
    assert await running.change() is Change.SERVICES
    before = running.registry.snapshot()
    await running.api.stop()
    status = await running.status(lambda s: "cannot reach" in s.last_error)
    assert not status.healthy
    assert status.synced
    assert running.registry.snapshot() is before
    assert running.addresses() == ["10.1.0.4", "10.1.0.5"]


async def test_no_kubeconfig_is_an_error_in_the_status(tmp_path: Path) -> None:
    registry = KubeRegistry(kubeconfig=tmp_path / "absent", context="prod")
    assert registry.name == "kubernetes:prod"
    task = asyncio.create_task(registry.run(lambda change: None))
    status = await asyncio.wait_for(registry.wait_status(lambda s: bool(s.last_error)), 10)
    assert f"kubeconfig {tmp_path / 'absent'} not found" in status.last_error
    assert not status.synced
    assert not status.healthy
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_another_domain(api: FakeKubeAPI, tmp_path: Path) -> None:
    registry = KubeRegistry(api.write_kubeconfig(tmp_path / "config"), domain="svc.example.org")
    changes: asyncio.Queue[Change] = asyncio.Queue()
    task = asyncio.create_task(registry.run(changes.put_nowait))
    assert await asyncio.wait_for(changes.get(), 10) is Change.SERVICES
    assert "reviews.default.svc.example.org" in registry.snapshot().services
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
