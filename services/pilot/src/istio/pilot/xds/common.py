"""Small builders shared by the generators."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.model import AuthPolicy, Port

HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"
FAULT = "envoy.filters.http.fault"
ORIGINAL_DST = "envoy.filters.listener.original_dst"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS_TRANSPORT = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
# Settings the proxy's Mixer filter and mTLS read, in listener and cluster metadata.
ISTIO_METADATA = "istio"


def ads() -> config_source_pb2.ConfigSource:
    """Resources come over the same ADS stream."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def packed(message: Message) -> any_pb2.Any:
    holder = any_pb2.Any()
    holder.Pack(message)
    return holder


def socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=address, port_value=port)
    )


def duration(nanos: int) -> Duration:
    value = Duration()
    value.FromNanoseconds(nanos)
    return value


def copy_duration(source: Duration) -> Duration:
    value = Duration()
    value.CopyFrom(source)
    return value


def percent(value: float) -> percent_pb2.FractionalPercent:
    """A 0-100 percentage (0.2 allowed fractions such as 0.5) as parts per million."""
    return percent_pb2.FractionalPercent(
        numerator=round(value * 10_000),
        denominator=percent_pb2.FractionalPercent.DenominatorType.MILLION,
    )


def auth_policy(mesh: proxy_mesh_pb2.MeshConfig, port: Port) -> AuthPolicy:
    """The policy between sidecars on a service port: the port's own (the service's
    `auth.istio.io/<port>` annotation), else the mesh's authPolicy. It decides both ends: the
    clients' outbound clusters to the port, and the server sidecar's inbound listener."""
    if port.auth_policy is not None:
        return port.auth_policy
    if mesh.auth_policy == proxy_mesh_pb2.MeshConfig.AuthPolicy.MUTUAL_TLS:
        return AuthPolicy.MUTUAL_TLS
    return AuthPolicy.NONE


def istio_metadata(fields: dict[str, Any]) -> base_pb2.Metadata:
    structure = struct_pb2.Struct()
    structure.update(fields)
    metadata = base_pb2.Metadata()
    metadata.filter_metadata[ISTIO_METADATA].CopyFrom(structure)
    return metadata
