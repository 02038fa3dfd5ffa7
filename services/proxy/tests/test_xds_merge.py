"""EDS and RDS responses that carry a part of the subscription: the rest is kept."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from istio.proxy.xds import CLUSTER, ENDPOINT, XdsState


def _packed(*messages: Message) -> list[any_pb2.Any]:
    out = []
    for message in messages:
        item = any_pb2.Any()
        item.Pack(message)
        out.append(item)
    return out


def _cluster(name: str) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    cluster.connect_timeout.FromSeconds(1)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    return cluster


def _assignment(name: str, *addresses: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address=address, port_value=9080
                                )
                            )
                        )
                    )
                    for address in addresses
                ]
            )
        ],
    )


def _hosts(state: XdsState, name: str) -> list[str]:
    return [endpoint.host for endpoint in state.snapshot().endpoints[name]]


def test_a_partial_eds_response_updates_its_names_and_keeps_the_others() -> None:
    state = XdsState()
    assert state.accept(CLUSTER, "c1", _packed(_cluster("a"), _cluster("b"))) is None
    full = _packed(_assignment("a", "10.0.0.1"), _assignment("b", "10.0.0.2"))
    assert state.accept(ENDPOINT, "e1", full) is None
    assert state.accept(ENDPOINT, "e2", _packed(_assignment("b", "10.0.0.3"))) is None
    assert _hosts(state, "a") == ["10.0.0.1"]
    assert _hosts(state, "b") == ["10.0.0.3"]
    assert state.snapshot().versions["eds"] == "e2"
    # A cluster gone from CDS takes its assignment along at the next EDS response.
    assert state.accept(CLUSTER, "c2", _packed(_cluster("a"))) is None
    assert state.accept(ENDPOINT, "e3", _packed(_assignment("a", "10.0.0.4"))) is None
    assert set(state.types[ENDPOINT].raw) == {"a"}
    assert _hosts(state, "a") == ["10.0.0.4"]


def test_a_bad_partial_response_changes_nothing() -> None:
    state = XdsState()
    state.accept(CLUSTER, "c1", _packed(_cluster("a"), _cluster("b")))
    state.accept(
        ENDPOINT, "e1", _packed(_assignment("a", "10.0.0.1"), _assignment("b", "10.0.0.2"))
    )
    # One good assignment and one resource of another type: the whole response is refused.
    error = state.accept(ENDPOINT, "e2", _packed(_assignment("a", "10.0.0.9"), _cluster("x")))
    assert error is not None
    assert "Cluster" in error
    assert _hosts(state, "a") == ["10.0.0.1"]
    assert _hosts(state, "b") == ["10.0.0.2"]
    assert state.snapshot().versions["eds"] == "e1"
