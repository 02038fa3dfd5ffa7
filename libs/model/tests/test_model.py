from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio.model import AuthPolicy, Labels, NodeType, Port, Protocol, Proxy, Service
from istio.model.service import (
    Direction,
    cluster_name,
    parse_cluster_name,
    parse_service_key,
    service_key,
)

label_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12)
labels = st.dictionaries(label_text, label_text, max_size=4).map(Labels)
hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,4}", fullmatch=True)


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        ("http", Protocol.HTTP),
        ("http-web", Protocol.HTTP),
        ("HTTP2", Protocol.HTTP2),
        ("grpc-api", Protocol.GRPC),
        ("https", Protocol.HTTPS),
        ("mongo", Protocol.MONGO),
        ("redis-cache", Protocol.REDIS),
        ("tcp", Protocol.TCP),
        ("database", Protocol.TCP),
        ("", Protocol.TCP),
    ],
)
def test_protocol_from_port_name(name: str, protocol: Protocol) -> None:
    assert Protocol.from_port_name(name) is protocol


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("NONE", AuthPolicy.NONE),
        ("MUTUAL_TLS", AuthPolicy.MUTUAL_TLS),
        (" mutual_tls ", AuthPolicy.MUTUAL_TLS),
    ],
)
def test_auth_policy_parse(text: str, policy: AuthPolicy) -> None:
    assert AuthPolicy.parse(text) is policy


@pytest.mark.parametrize("text", ["", "TLS", "PERMISSIVE", "INHERIT"])
def test_auth_policy_parse_refuses_other_values(text: str) -> None:
    with pytest.raises(ValueError, match="is not a valid AuthPolicy"):
        AuthPolicy.parse(text)


@given(st.sampled_from([None, *AuthPolicy]), st.sampled_from([None, *AuthPolicy]))
def test_port_auth_policy_is_part_of_equality_and_hash(
    a: AuthPolicy | None, b: AuthPolicy | None
) -> None:
    """A port's policy override is part of the service: changing it changes the Service (a
    full push), and ports stay usable as keys."""
    one, two = Port("http", 80, Protocol.HTTP, a), Port("http", 80, Protocol.HTTP, b)
    assert (one == two) is (a is b)
    assert (Service("x.ns", (one,)) == Service("x.ns", (two,))) is (a is b)
    if a is b:
        assert hash(one) == hash(two)
    assert Port("http", 80, Protocol.HTTP).auth_policy is None  # inherits the mesh's


def test_labels_are_immutable_hashable_and_match() -> None:
    a = Labels({"version": "v1", "app": "reviews"})
    assert str(a) == "app=reviews,version=v1"
    assert a == {"app": "reviews", "version": "v1"}
    assert hash(a) == hash(Labels([("version", "v1"), ("app", "reviews")]))
    assert a.matches({"version": "v1"})
    assert not a.matches({"version": "v2"})
    assert a.matches({})


@given(hostnames, st.lists(label_text, max_size=3, unique=True), labels)
def test_service_key_round_trips(hostname: str, ports: list[str], selector: Labels) -> None:
    assert parse_service_key(service_key(hostname, ports, selector)) == (
        hostname,
        tuple(sorted(ports)),
        selector,
    )


@given(st.sampled_from(Direction), st.integers(1, 65535), hostnames, labels)
def test_cluster_name_round_trips(
    direction: Direction, port: int, hostname: str, selector: Labels
) -> None:
    name = cluster_name(direction, port, hostname, selector)
    assert parse_cluster_name(name) == (direction, port, hostname, selector)


def test_cluster_name_shape() -> None:
    name = cluster_name(
        Direction.OUTBOUND, 9080, "reviews.default.svc.cluster.local", Labels({"version": "v1"})
    )
    assert name == "outbound|9080|version=v1|reviews.default.svc.cluster.local"


def test_proxy_node_id() -> None:
    proxy = Proxy.parse("sidecar~10.1.1.5~reviews-v1-abc.books~books.svc.cluster.local")
    assert proxy.type is NodeType.SIDECAR
    assert (proxy.ip, proxy.pod_name, proxy.namespace) == ("10.1.1.5", "reviews-v1-abc", "books")
    assert proxy.node_id == "sidecar~10.1.1.5~reviews-v1-abc.books~books.svc.cluster.local"
    grpc = Proxy.parse(
        "sidecar~127.0.0.9~client.default~default.svc.cluster.local", {"GENERATOR": "grpc"}
    )
    assert grpc.is_grpc


@pytest.mark.parametrize(
    ("node_id", "reason"),
    [
        ("sidecar~10.1.1.5~pod.ns", "must have 4 parts"),
        ("router~10.1.1.5~pod.ns~ns.svc.cluster.local", "is not sidecar, ingress or egress"),
        ("sidecar~ten~pod.ns~ns.svc.cluster.local", "is not an IP address"),
        ("ingress~10.0.0.1~~ns.svc.cluster.local", "part is empty"),
    ],
)
def test_bad_node_ids(node_id: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Proxy.parse(node_id)
