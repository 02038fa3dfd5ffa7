"""The mesh's authPolicy, overridden per service port by the `auth.istio.io/<port>` annotation
(which the registries turn into Port.auth_policy): both ends follow the port's policy, the
clients' outbound clusters (istio.mtls in their metadata) and the server sidecar's inbound
listener (istio.auth_policy, from which the proxy terminates mutual TLS)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.model import AuthPolicy, Proxy
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.registry import Change, RegistrySnapshot
from istio.pilot.xds import resources
from istio.pilot.xds.generate import generate

PRODUCTPAGE = Proxy.parse("sidecar~127.0.0.2~productpage-v1.default~default.svc.cluster.local")
DETAILS = Proxy.parse("sidecar~127.0.0.3~details-v1.default~default.svc.cluster.local")
REVIEWS_V2 = Proxy.parse("sidecar~127.0.0.5~reviews-v2.default~default.svc.cluster.local")
MONGODB = Proxy.parse("sidecar~127.0.0.8~mongodb-v1.default~default.svc.cluster.local")
INGRESS = Proxy.parse(
    "ingress~127.0.0.100~istio-ingress.istio-system~istio-system.svc.cluster.local"
)
REVIEWS = "reviews.default.svc.cluster.local"
DETAILS_HOST = "details.default.svc.cluster.local"
MONGODB_HOST = "mongodb.default.svc.cluster.local"

MESH_POLICIES = {
    AuthPolicy.NONE: proxy_mesh_pb2.MeshConfig.AuthPolicy.NONE,
    AuthPolicy.MUTUAL_TLS: proxy_mesh_pb2.MeshConfig.AuthPolicy.MUTUAL_TLS,
}


def with_mesh_policy(snapshot: MeshSnapshot, policy: AuthPolicy) -> MeshSnapshot:
    mesh = proxy_mesh_pb2.MeshConfig()
    mesh.CopyFrom(snapshot.mesh)
    mesh.auth_policy = MESH_POLICIES[policy]
    return dataclasses.replace(snapshot, mesh=mesh)


def annotated(
    snapshot: MeshSnapshot, hostname: str, number: int, policy: AuthPolicy
) -> MeshSnapshot:
    """The snapshot as a registry makes it from `auth.istio.io/<number>: <policy>` on the
    service: the port carries the policy, in the service and in its instances."""
    service = snapshot.services[hostname]
    ports = tuple(
        dataclasses.replace(p, auth_policy=policy) if p.port == number else p for p in service.ports
    )
    changed = dataclasses.replace(service, ports=ports)
    services = {**snapshot.services, hostname: changed}
    instances = {
        **snapshot.instances,
        hostname: tuple(
            dataclasses.replace(
                i, service=changed, service_port=changed.port_numbered(i.service_port.port)
            )
            for i in snapshot.instances[hostname]
        ),
    }
    return dataclasses.replace(snapshot, services=services, instances=instances)


def cluster_mtls(found: resources.Resources) -> dict[str, bool]:
    """Every outbound mesh cluster: does it originate mutual TLS?"""
    result = {}
    for name, cluster in found.of(resources.CLUSTER).items():
        if not name.startswith("outbound|"):
            continue
        istio = cluster.metadata.filter_metadata.get("istio")  # type: ignore[attr-defined]
        result[name] = bool(istio is not None and "mtls" in istio.fields and istio["mtls"])
    return result


def inbound_policy(found: resources.Resources, proxy: Proxy, port: int) -> str:
    listener = found.of(resources.LISTENER)[f"{proxy.ip}_{port}"]
    return str(listener.metadata.filter_metadata["istio"]["auth_policy"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mesh_policy", "override"),
    [(AuthPolicy.MUTUAL_TLS, AuthPolicy.NONE), (AuthPolicy.NONE, AuthPolicy.MUTUAL_TLS)],
    ids=["mesh-mtls-service-none", "mesh-none-service-mtls"],
)
def test_an_annotated_port_overrides_the_mesh_at_both_ends(
    bookinfo: Callable[..., MeshSnapshot], mesh_policy: AuthPolicy, override: AuthPolicy
) -> None:
    snapshot = annotated(with_mesh_policy(bookinfo(), mesh_policy), REVIEWS, 9080, override)
    mesh_mtls = mesh_policy is AuthPolicy.MUTUAL_TLS
    clusters = cluster_mtls(generate(snapshot, PRODUCTPAGE))
    reviews = {name: mtls for name, mtls in clusters.items() if name.endswith(f"|{REVIEWS}")}
    # The default cluster and every label subset the sample rules name.
    assert f"outbound|9080||{REVIEWS}" in reviews
    assert f"outbound|9080|version=v1|{REVIEWS}" in reviews
    assert set(reviews.values()) == {not mesh_mtls}
    assert clusters[f"outbound|9080||{DETAILS_HOST}"] is mesh_mtls
    assert clusters[f"outbound|27017||{MONGODB_HOST}"] is mesh_mtls
    assert clusters["outbound|443||api.example.com"] is False  # mesh-external: never
    # The ingress calls the service as a sidecar does.
    ingress = cluster_mtls(generate(snapshot, INGRESS))
    assert ingress[f"outbound|9080||{REVIEWS}"] is not mesh_mtls
    assert ingress[f"outbound|9080||{DETAILS_HOST}"] is mesh_mtls
    # The server side: the annotated service's sidecar, and another one.
    assert inbound_policy(generate(snapshot, REVIEWS_V2), REVIEWS_V2, 9080) == override.value
    assert inbound_policy(generate(snapshot, DETAILS), DETAILS, 9080) == mesh_policy.value
    assert inbound_policy(generate(snapshot, MONGODB), MONGODB, 27017) == mesh_policy.value


def test_an_annotation_equal_to_the_mesh_changes_nothing_generated(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    plain = with_mesh_policy(bookinfo(), AuthPolicy.MUTUAL_TLS)
    same = annotated(plain, REVIEWS, 9080, AuthPolicy.MUTUAL_TLS)
    for proxy in (PRODUCTPAGE, REVIEWS_V2):
        before, after = generate(plain, proxy), generate(same, proxy)
        for type_url in resources.PUSH_ORDER:
            assert before.version(type_url) == after.version(type_url)


def test_an_annotation_change_is_a_full_push_that_reaches_both_ends(
    bookinfo: Callable[..., MeshSnapshot],
) -> None:
    """Annotating a service changes the Service (a SERVICES change: CDS and LDS, not EDS
    only); generation after the previous snapshot's does not keep stale shared clusters or
    the server's own inbound listener; an endpoint-only change afterwards keeps the
    annotated policy."""
    before = with_mesh_policy(bookinfo(), AuthPolicy.MUTUAL_TLS)
    after = annotated(before, REVIEWS, 9080, AuthPolicy.NONE)
    registry_before = RegistrySnapshot(before.services, before.instances)
    registry_after = RegistrySnapshot(after.services, after.instances)
    assert registry_after.change_from(registry_before) is Change.SERVICES

    old_client, old_server = generate(before, PRODUCTPAGE), generate(before, REVIEWS_V2)
    assert cluster_mtls(old_client)[f"outbound|9080||{REVIEWS}"]
    assert inbound_policy(old_server, REVIEWS_V2, 9080) == "MUTUAL_TLS"
    new_client, new_server = generate(after, PRODUCTPAGE), generate(after, REVIEWS_V2)
    assert not cluster_mtls(new_client)[f"outbound|9080||{REVIEWS}"]
    assert inbound_policy(new_server, REVIEWS_V2, 9080) == "NONE"
    assert new_client.version(resources.CLUSTER) != old_client.version(resources.CLUSTER)
    assert new_server.version(resources.LISTENER) != old_server.version(resources.LISTENER)

    instances = dict(after.instances)
    moved = dataclasses.replace(instances[REVIEWS][0], address="10.9.9.9")
    instances[REVIEWS] = (*instances[REVIEWS], moved)
    endpoints_only = dataclasses.replace(after, instances=instances)
    assert (
        RegistrySnapshot(endpoints_only.services, endpoints_only.instances).change_from(
            registry_after
        )
        is Change.ENDPOINTS
    )
    client = generate(endpoints_only, PRODUCTPAGE)
    assert not cluster_mtls(client)[f"outbound|9080||{REVIEWS}"]
    assert inbound_policy(generate(endpoints_only, REVIEWS_V2), REVIEWS_V2, 9080) == "NONE"
