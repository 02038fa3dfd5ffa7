"""Kubernetes objects -> model conversion, pure: plain JSON in, records out."""

from __future__ import annotations

from typing import Any

import pytest

from istio.model import AuthPolicy, Labels, Protocol, Resolution
from istio.pilot.registry.kube.conversion import (
    PodIndex,
    PodInfo,
    auth_annotation_problems,
    convert_service,
    endpoint_ips,
    node_locality,
    pod_info,
)


def service(name: str = "reviews", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    spec.setdefault("clusterIP", "10.0.0.12")
    spec.setdefault("ports", [{"name": "http", "port": 9080, "targetPort": 9080}])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def endpoints(*subsets: dict[str, Any], name: str = "reviews") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"}, "subsets": list(subsets)}


def address(ip: str, pod: str | None = None, node: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"ip": ip}
    if pod:
        found["targetRef"] = {"kind": "Pod", "namespace": "default", "name": pod}
    if node:
        found["nodeName"] = node
    return found


def pods(**by_name: PodInfo) -> PodIndex:
    index = PodIndex()
    for name, info in by_name.items():
        index.put(("default", name.replace("_", "-")), info)
    return index


V1 = PodInfo(
    Labels({"app": "reviews", "version": "v1"}), "bookinfo-reviews", "node-a", ("10.1.0.4",)
)
V2 = PodInfo(
    Labels({"app": "reviews", "version": "v2"}), "bookinfo-reviews", "node-b", ("10.1.0.5",)
)


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ("http", Protocol.HTTP),
        ("http-web", Protocol.HTTP),
        ("http2", Protocol.HTTP2),
        ("grpc", Protocol.GRPC),
        ("https-admin", Protocol.HTTPS),
        ("mongo", Protocol.MONGO),
        ("redis", Protocol.REDIS),
        ("tcp", Protocol.TCP),
        ("web", Protocol.TCP),
        ("", Protocol.TCP),
    ],
)
def test_port_protocol_from_the_name(name: str, protocol: Protocol) -> None:
    converted, _ = convert_service(
        service(ports=[{"name": name, "port": 80}]), None, PodIndex(), {}
    )
    assert converted.ports[0].protocol is protocol


def test_udp_ports_are_udp() -> None:
    converted, _ = convert_service(
        service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]), None, PodIndex(), {}
    )
    assert converted.ports[0].protocol is Protocol.UDP


def test_service_and_instances() -> None:
    ready = {
        "addresses": [address("10.1.0.5", "reviews-v2"), address("10.1.0.4", "reviews-v1")],
        "notReadyAddresses": [address("10.1.0.9")],
        "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
    }
    converted, instances = convert_service(
        service(), endpoints(ready), pods(reviews_v1=V1, reviews_v2=V2), {"node-a": "us/a"}
    )
    assert converted.hostname == "reviews.default.svc.cluster.local"
    assert converted.address == "10.0.0.12"
    assert converted.resolution is Resolution.STATIC
    assert converted.service_accounts == ("spiffe://cluster.local/ns/default/sa/bookinfo-reviews",)
    assert [(i.address, i.port, i.labels["version"], i.locality) for i in instances] == [
        ("10.1.0.4", 9080, "v1", "us/a"),
        ("10.1.0.5", 9080, "v2", ""),  # node-b has no topology labels
    ]
    assert {i.service_account for i in instances} == {"bookinfo-reviews"}
    assert all(i.service is converted and i.service_port.name == "http" for i in instances)


def test_endpoint_ports_match_service_ports_by_name() -> None:
    subset = {
        "addresses": [address("10.1.0.4")],
        "ports": [
            {"name": "grpc", "port": 7070},
            {"name": "http", "port": 8080},  # the pod's port behind service port 9080
            {"name": "metrics", "port": 15090},  # no such service port
        ],
    }
    svc = service(ports=[{"name": "http", "port": 9080}, {"name": "grpc", "port": 7000}])
    _, instances = convert_service(svc, endpoints(subset), PodIndex(), {})
    assert [(i.service_port.port, i.port) for i in instances] == [(7000, 7070), (9080, 8080)]


def test_pods_by_target_ref_then_by_ip() -> None:
    impostor = PodInfo(Labels({"app": "other"}), "other", "", ("10.1.0.4",))
    index = pods(reviews_v1=V1, host_network=impostor)
    by_ref = convert_service(
        service(),
        endpoints(
            {
                "addresses": [address("10.1.0.4", "reviews-v1")],
                "ports": [{"name": "http", "port": 9080}],
            }
        ),
        index,
        {},
    )[1]
    assert by_ref[0].labels["app"] == "reviews"
    # Without a targetRef, the pod with that IP; several (host network): the smallest key.
    by_ip = convert_service(
        service(),
        endpoints({"addresses": [address("10.1.0.4")], "ports": [{"name": "http", "port": 9080}]}),
        index,
        {},
    )[1]
    assert by_ip[0].labels["app"] == "other"
    unknown = convert_service(
        service(),
        endpoints(
            {
                "addresses": [address("10.1.0.8", node="node-a")],
                "ports": [{"name": "http", "port": 9080}],
            }
        ),
        index,
        {"node-a": "us/a"},
    )[1]
    assert (unknown[0].labels, unknown[0].service_account, unknown[0].locality) == (
        Labels(),
        "",
        "us/a",
    )


def test_headless_service_keeps_its_instances() -> None:
    subset = {"addresses": [address("10.1.0.4")], "ports": [{"name": "mongo", "port": 27017}]}
    converted, instances = convert_service(
        service("mongodb", clusterIP="None", ports=[{"name": "mongo", "port": 27017}]),
        endpoints(subset, name="mongodb"),
        PodIndex(),
        {},
    )
    assert converted.address == ""
    assert converted.ports[0].protocol is Protocol.MONGO
    assert [i.address for i in instances] == ["10.1.0.4"]


def test_external_name_service() -> None:
    converted, instances = convert_service(
        service("payments", type="ExternalName", externalName="pay.example.com", clusterIP=""),
        None,
        PodIndex(),
        {},
    )
    assert (converted.address, converted.mesh_external, converted.resolution) == (
        "",
        True,
        Resolution.DNS,
    )
    assert [(i.address, i.port) for i in instances] == [("pay.example.com", 9080)]


def test_a_service_without_endpoints_has_no_instances() -> None:
    converted, instances = convert_service(service(), None, PodIndex(), {}, "svc.example.org")
    assert converted.hostname == "reviews.default.svc.example.org"
    assert instances == ()


def test_service_accounts_from_annotations() -> None:
    svc = service()
    svc["metadata"]["annotations"] = {
        "alpha.istio.io/kubernetes-serviceaccounts": "a, b",
        "alpha.istio.io/canonical-serviceaccounts": "spiffe://example.com/legacy",
    }
    converted, _ = convert_service(svc, None, PodIndex(), {})
    assert converted.service_accounts == (
        "spiffe://cluster.local/ns/default/sa/a",
        "spiffe://cluster.local/ns/default/sa/b",
        "spiffe://example.com/legacy",
    )


def test_auth_policy_per_port_from_annotations() -> None:
    svc = service(
        ports=[
            {"name": "http", "port": 9080},
            {"name": "http-admin", "port": 8080},
            {"name": "tcp", "port": 3306},
        ]
    )
    svc["metadata"]["annotations"] = {
        "auth.istio.io/8080": "NONE",
        "auth.istio.io/3306": "mutual_tls",  # any case, as MeshConfig's parser takes it
        "auth.istio.io/7777": "NONE",  # no such port
    }
    ready = {"addresses": [address("10.1.0.4")], "ports": [{"name": "http-admin", "port": 18080}]}
    converted, instances = convert_service(svc, endpoints(ready), PodIndex(), {})
    assert [(p.port, p.auth_policy) for p in converted.ports] == [
        (9080, None),  # the mesh's policy
        (8080, AuthPolicy.NONE),
        (3306, AuthPolicy.MUTUAL_TLS),
    ]
    # Instances carry the service port with its policy: the server sidecar's inbound side.
    assert [i.service_port.auth_policy for i in instances] == [AuthPolicy.NONE]
    assert auth_annotation_problems(svc) == (
        "Service default/reviews: annotation auth.istio.io/7777: '7777' is not a port of the "
        "service (3306, 8080, 9080); ignored",
    )


def test_bad_auth_annotations_are_reported_and_ignored() -> None:
    svc = service()
    svc["metadata"]["annotations"] = {
        "auth.istio.io/9080": "TLS",
        "auth.istio.io/http": "NONE",
        "auth.istio.io/": "NONE",
    }
    converted, _ = convert_service(svc, None, PodIndex(), {})
    assert converted == convert_service(service(), None, PodIndex(), {})[0]
    problems = auth_annotation_problems(svc)
    assert len(problems) == 3
    assert all(p.startswith("Service default/reviews: annotation auth.istio.io/") for p in problems)
    assert "auth.istio.io/9080: 'TLS' is not NONE or MUTUAL_TLS" in " ".join(problems)
    assert "auth.istio.io/http: 'http' is not a port of the service" in " ".join(problems)
    assert auth_annotation_problems(service()) == ()


def test_pod_info() -> None:
    pod = {
        "metadata": {"name": "p", "labels": {"app": "reviews"}},
        "spec": {"serviceAccountName": "sa", "nodeName": "n1", "containers": []},
        "status": {"podIP": "10.1.0.4", "podIPs": [{"ip": "10.1.0.4"}, {"ip": "fd00::4"}]},
    }
    assert pod_info(pod) == PodInfo(Labels({"app": "reviews"}), "sa", "n1", ("10.1.0.4", "fd00::4"))
    assert pod_info({"metadata": {"name": "pending"}}) == PodInfo()


def test_pod_index_forgets_removed_pods() -> None:
    index = pods(reviews_v1=V1)
    index.put(("default", "reviews-v1"), PodInfo(ips=("10.1.0.7",)))
    assert index.for_address({"ip": "10.1.0.4"}, "default") is None
    index.remove(("default", "reviews-v1"))
    assert index.for_address({"ip": "10.1.0.7"}, "default") is None


def test_node_locality() -> None:
    def node(**labels: str) -> dict[str, Any]:
        return {"metadata": {"name": "n", "labels": labels}}

    assert node_locality(node()) == ""
    assert (
        node_locality(
            node(
                **{"topology.kubernetes.io/region": "us-east1", "topology.kubernetes.io/zone": "b"}
            )
        )
        == "us-east1/b"
    )
    beta = {
        "failure-domain.beta.kubernetes.io/region": "eu",
        "failure-domain.beta.kubernetes.io/zone": "eu-1",
        "topology.istio.io/subzone": "rack7",
    }
    assert node_locality(node(**beta)) == "eu/eu-1/rack7"


def test_endpoint_ips_include_not_ready_addresses() -> None:
    subset = {"addresses": [address("10.1.0.4")], "notReadyAddresses": [address("10.1.0.9")]}
    assert endpoint_ips(endpoints(subset)) == {"10.1.0.4", "10.1.0.9"}
    assert endpoint_ips(endpoints()) == set()
