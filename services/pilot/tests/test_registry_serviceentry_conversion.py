"""ServiceEntry -> model conversion, pure: no files, no event loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from istio.config import Config, parse_object
from istio.model import AuthPolicy, Labels, Port, Protocol, Resolution, spiffe_identity
from istio.pilot.registry.serviceentry.conversion import build_snapshot, convert_entry


def entry(
    name: str,
    spec: Mapping[str, Any],
    namespace: str = "default",
    annotations: Mapping[str, str] | None = None,
) -> Config:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return parse_object(
        {
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "ServiceEntry",
            "metadata": metadata,
            "spec": dict(spec),
        }
    )


REVIEWS: dict[str, Any] = {
    "hosts": ["reviews.default.svc.cluster.local"],
    "addresses": ["10.0.0.12"],
    "location": "MESH_INTERNAL",
    "resolution": "STATIC",
    "ports": [
        {"number": 9080, "protocol": "http", "name": "http"},
        {"number": 9443, "protocol": "GRPC", "name": "grpc-admin"},
    ],
    "endpoints": [
        {
            "address": "127.0.0.4",
            "ports": {"http": 19080},
            "labels": {"app": "reviews", "version": "v1"},
            "serviceAccount": "bookinfo-reviews",
            "locality": "us-east/a",
            "weight": 3,
        },
        {"address": "127.0.0.5", "labels": {"app": "reviews", "version": "v2"}},
    ],
}


def test_a_mesh_service_with_endpoints() -> None:
    ((service, instances),) = convert_entry(entry("reviews", REVIEWS))
    assert service.hostname == "reviews.default.svc.cluster.local"
    assert service.namespace == "default"
    assert service.address == "10.0.0.12"
    assert not service.mesh_external
    assert service.resolution is Resolution.STATIC
    assert service.ports == (
        Port("http", 9080, Protocol.HTTP),
        Port("grpc-admin", 9443, Protocol.GRPC),
    )
    assert service.service_accounts == (spiffe_identity("default", "bookinfo-reviews"),)
    # endpoints x ports, ordered by service port, address, port
    assert [(i.service_port.name, i.address, i.port) for i in instances] == [
        ("http", "127.0.0.4", 19080),  # the endpoint's own port for `http`
        ("http", "127.0.0.5", 9080),
        ("grpc-admin", "127.0.0.4", 9443),
        ("grpc-admin", "127.0.0.5", 9443),
    ]
    first = instances[0]
    assert first.labels == Labels({"app": "reviews", "version": "v1"})
    assert (first.service_account, first.locality, first.weight) == (
        "bookinfo-reviews",
        "us-east/a",
        3,
    )
    assert instances[1].weight == 1
    assert all(i.service is service for i in instances)


@pytest.mark.parametrize(
    ("written", "resolution"),
    [("STATIC", Resolution.STATIC), ("DNS", Resolution.DNS), ("NONE", Resolution.PASSTHROUGH)],
)
def test_resolutions(written: str, resolution: Resolution) -> None:
    spec = {
        "hosts": ["api.example.com"],
        "ports": [{"number": 443, "protocol": "HTTPS", "name": "https"}],
    }
    if written == "STATIC":
        spec["endpoints"] = [{"address": "192.0.2.1"}]
    ((service, _),) = convert_entry(entry("api", {**spec, "resolution": written}))
    assert service.resolution is resolution
    assert service.mesh_external  # location defaults to MESH_EXTERNAL
    assert service.address == ""


def test_dns_without_endpoints_resolves_each_host() -> None:
    converted = convert_entry(
        entry(
            "external",
            {
                "hosts": ["api.example.com", "*.example.org"],
                "resolution": "DNS",
                "ports": [{"number": 443, "protocol": "TLS", "name": "tls"}],
                "subjectAltNames": ["spiffe://example.com/api"],
            },
        )
    )
    assert [(s.hostname, [(i.address, i.port) for i in found]) for s, found in converted] == [
        ("api.example.com", [("api.example.com", 443)]),
        ("*.example.org", []),  # a wildcard is nothing to resolve
    ]
    assert converted[0][0].service_accounts == ("spiffe://example.com/api",)


def test_entries_for_one_host_merge_their_endpoints() -> None:
    spec: dict[str, Any] = {
        "hosts": ["vm-app.example.internal"],
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": 8080, "protocol": "HTTP", "name": "http"}],
    }
    vm1 = entry("vm-1", {**spec, "endpoints": [{"address": "10.9.0.1", "serviceAccount": "app"}]})
    vm2 = entry("vm-2", {**spec, "endpoints": [{"address": "10.9.0.2", "serviceAccount": "app-2"}]})
    conversion = build_snapshot([vm2, vm1])
    assert conversion.clashes == ()
    service = conversion.snapshot.services["vm-app.example.internal"]
    assert service.service_accounts == (
        spiffe_identity("default", "app"),
        spiffe_identity("default", "app-2"),
    )
    found = conversion.snapshot.instances["vm-app.example.internal"]
    assert [i.address for i in found] == ["10.9.0.1", "10.9.0.2"]
    assert all(i.service is service for i in found)


def test_a_conflicting_definition_loses_to_the_first_and_is_reported() -> None:
    first = entry("a", REVIEWS)
    other = dict(REVIEWS, ports=[{"number": 9081, "protocol": "HTTP", "name": "http"}])
    conversion = build_snapshot([entry("b", other), first])
    service = conversion.snapshot.services["reviews.default.svc.cluster.local"]
    assert service.ports[0].port == 9080
    assert conversion.clashes == (
        "ServiceEntry default/b: host reviews.default.svc.cluster.local is defined differently "
        "by default/a, whose definition is used",
    )


def test_the_snapshot_is_deterministic() -> None:
    entries = [
        entry("reviews", REVIEWS),
        entry("other", {**REVIEWS, "hosts": ["x.apps"]}, namespace="apps"),
    ]
    assert build_snapshot(entries).snapshot == build_snapshot(entries[::-1]).snapshot
    assert list(build_snapshot(entries).snapshot.services) == [
        "x.apps",
        "reviews.default.svc.cluster.local",
    ]


def test_auth_annotations_set_each_hosts_port_policy() -> None:
    spec = {**REVIEWS, "hosts": [*REVIEWS["hosts"], "reviews.internal"]}
    annotations = {"auth.istio.io/9443": "NONE", "auth.istio.io/9080": "MUTUAL_TLS"}
    conversion = build_snapshot([entry("reviews", spec, annotations=annotations)])
    assert conversion.annotation_problems == ()
    for host in spec["hosts"]:
        service = conversion.snapshot.services[host]
        assert [(p.name, p.auth_policy) for p in service.ports] == [
            ("http", AuthPolicy.MUTUAL_TLS),
            ("grpc-admin", AuthPolicy.NONE),
        ]
        found = conversion.snapshot.instances[host]
        assert all(i.service_port in service.ports for i in found)
        assert {i.service_port.auth_policy for i in found} == {
            AuthPolicy.MUTUAL_TLS,
            AuthPolicy.NONE,
        }


def test_bad_auth_annotations_are_reported_and_ignored() -> None:
    annotations = {"auth.istio.io/9080": "PERMISSIVE", "auth.istio.io/7000": "NONE"}
    conversion = build_snapshot([entry("reviews", REVIEWS, annotations=annotations)])
    assert conversion.snapshot == build_snapshot([entry("reviews", REVIEWS)]).snapshot
    assert conversion.annotation_problems == (
        "ServiceEntry default/reviews: annotation auth.istio.io/7000: '7000' is not a port of "
        "the service (9080, 9443); ignored",
        "ServiceEntry default/reviews: annotation auth.istio.io/9080: 'PERMISSIVE' is not NONE "
        "or MUTUAL_TLS; the mesh's authPolicy applies to the port",
    )


def test_entries_for_one_host_must_agree_on_auth_annotations() -> None:
    vm1 = entry("vm-1", REVIEWS, annotations={"auth.istio.io/9080": "NONE"})
    vm2 = entry("vm-2", REVIEWS)
    conversion = build_snapshot([vm1, vm2])
    service = conversion.snapshot.services["reviews.default.svc.cluster.local"]
    assert service.ports[0].auth_policy is AuthPolicy.NONE
    assert len(conversion.clashes) == 1
    assert conversion.clashes[0].startswith("ServiceEntry default/vm-2: host reviews")
