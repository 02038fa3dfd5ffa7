"""Tracing from the mesh config, as the proxy compiles it."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.trace.v3 import zipkin_pb2

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.pilot.mesh import default_mesh_config
from istio.pilot.xds import tracing


def _mesh(address: str = "zipkin.istio-system:9411", **fields: object) -> proxy_mesh_pb2.MeshConfig:
    mesh = default_mesh_config()
    mesh.enable_tracing = True
    mesh.default_config.zipkin_address = address
    for name, value in fields.items():
        if name == "trace_sampling":
            mesh.trace_sampling.value = value  # type: ignore[assignment]
    return mesh


def test_off_unless_enabled() -> None:
    mesh = default_mesh_config()
    mesh.default_config.zipkin_address = "zipkin:9411"
    assert tracing.connection_manager_tracing(mesh) is None
    assert tracing.zipkin_cluster(mesh) is None


def test_connection_managers_send_every_span_to_the_zipkin_cluster_by_default() -> None:
    config = tracing.connection_manager_tracing(_mesh())
    assert config is not None
    assert config.random_sampling.value == 100
    assert config.provider.name == "envoy.tracers.zipkin"
    zipkin = zipkin_pb2.ZipkinConfig()
    config.provider.typed_config.Unpack(zipkin)
    assert (zipkin.collector_cluster, zipkin.collector_endpoint) == ("zipkin", "/api/v2/spans")
    assert zipkin.collector_endpoint_version == zipkin_pb2.ZipkinConfig.HTTP_JSON
    assert zipkin.shared_span_context.value
    sampled = tracing.connection_manager_tracing(_mesh(trace_sampling=2.5))
    assert sampled is not None
    assert sampled.random_sampling.value == 2.5


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("zipkin.istio-system:9411", cluster_pb2.Cluster.DiscoveryType.STRICT_DNS),
        ("127.0.0.9:9411", cluster_pb2.Cluster.DiscoveryType.STATIC),
        ("[::1]:9411", cluster_pb2.Cluster.DiscoveryType.STATIC),
    ],
)
def test_the_collector_cluster(address: str, kind: int) -> None:
    cluster = tracing.zipkin_cluster(_mesh(address))
    assert cluster is not None
    assert (cluster.name, cluster.type) == ("zipkin", kind)
    socket = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert f"{socket.address}:{socket.port_value}" == address.replace("[", "").replace("]", "")


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        (_mesh(""), "zipkinAddress is empty"),
        (_mesh("zipkin"), "'zipkin' is not host:port"),
        (_mesh("zipkin:99999"), "is not host:port"),
        (_mesh(trace_sampling=150.0), "traceSampling 150 is not a percentage"),
    ],
)
def test_settings_no_proxy_could_use_are_named(
    mesh: proxy_mesh_pb2.MeshConfig, message: str
) -> None:
    with pytest.raises(tracing.TracingConfigError, match=message):
        tracing.validate(mesh)
