"""Tracing settings from the mesh config: the connection managers' Zipkin `tracing` and the
collector's cluster.

0.2 turned tracing on with the mesh's `enableTracing` and the proxies' `zipkinAddress`
(`defaultConfig.zipkinAddress`, host:port); its Envoy sampled every request. Here the
percentage is `traceSampling` (beyond 0.2; default 100). Spans go to the cluster `zipkin`,
which every proxy gets while tracing is on, at `/api/v2/spans` as Zipkin v2 JSON.
"""

from __future__ import annotations

import ipaddress

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.trace.v3 import zipkin_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.pilot.xds import common

ZIPKIN_CLUSTER = "zipkin"
ZIPKIN_TRACER = "envoy.tracers.zipkin"
SPANS_PATH = "/api/v2/spans"


class TracingConfigError(ValueError):
    """The mesh config's tracing settings cannot work (named field, why)."""


def collector(mesh: proxy_mesh_pb2.MeshConfig) -> tuple[str, int] | None:
    """The Zipkin collector's host and port when tracing is on, else None."""
    if not mesh.enable_tracing:
        return None
    address = mesh.default_config.zipkin_address
    if not address:
        raise TracingConfigError(
            "enableTracing is on but defaultConfig.zipkinAddress is empty: "
            "set it to the collector's host:port"
        )
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TracingConfigError(
            f"defaultConfig.zipkinAddress {address!r} is not host:port (e.g. zipkin:9411)"
        )
    return host.strip("[]"), int(port)


def sampling(mesh: proxy_mesh_pb2.MeshConfig) -> float:
    if not mesh.HasField("trace_sampling"):
        return 100.0
    value = mesh.trace_sampling.value
    if not 0.0 <= value <= 100.0:
        raise TracingConfigError(f"traceSampling {value:g} is not a percentage from 0 to 100")
    return value


def validate(mesh: proxy_mesh_pb2.MeshConfig) -> None:
    """Raises TracingConfigError for settings no proxy could use."""
    collector(mesh)
    sampling(mesh)


def connection_manager_tracing(
    mesh: proxy_mesh_pb2.MeshConfig,
) -> hcm.HttpConnectionManager.Tracing | None:
    """What every HTTP connection manager carries while tracing is on."""
    if collector(mesh) is None:
        return None
    tracing = hcm.HttpConnectionManager.Tracing()
    tracing.random_sampling.value = sampling(mesh)
    tracing.provider.name = ZIPKIN_TRACER
    tracing.provider.typed_config.Pack(
        zipkin_pb2.ZipkinConfig(
            collector_cluster=ZIPKIN_CLUSTER,
            collector_endpoint=SPANS_PATH,
            collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_JSON,
            shared_span_context={"value": True},
        )
    )
    return tracing


def zipkin_cluster(mesh: proxy_mesh_pb2.MeshConfig) -> cluster_pb2.Cluster | None:
    """The collector as a cluster: STATIC for an IP address, STRICT_DNS for a name."""
    address = collector(mesh)
    if address is None:
        return None
    host, port = address
    try:
        ipaddress.ip_address(host)
        kind = cluster_pb2.Cluster.DiscoveryType.STATIC
    except ValueError:
        kind = cluster_pb2.Cluster.DiscoveryType.STRICT_DNS
    cluster = cluster_pb2.Cluster(
        name=ZIPKIN_CLUSTER,
        type=kind,
        connect_timeout=common.duration(1_000_000_000),
    )
    cluster.load_assignment.CopyFrom(
        endpoint_pb2.ClusterLoadAssignment(
            cluster_name=ZIPKIN_CLUSTER,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=common.socket_address(host, port)
                            )
                        )
                    ]
                )
            ],
        )
    )
    return cluster
