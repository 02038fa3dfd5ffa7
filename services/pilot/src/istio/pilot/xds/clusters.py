"""CDS: one outbound cluster per service port and label subset, inbound clusters to the local
app, and clusters for the external hosts that EgressRules allow."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.wrappers_pb2 import UInt32Value

from istio.api.proxy.v1.config import dest_policy_pb2
from istio.model import (
    AuthPolicy,
    Labels,
    Port,
    Protocol,
    Proxy,
    Resolution,
    Service,
    ServiceInstance,
)
from istio.model.service import Direction, cluster_name
from istio.pilot.xds import common
from istio.pilot.xds.index import MeshIndex, egress_rule, policy_for

_LB = {
    dest_policy_pb2.LoadBalancing.SimpleLBPolicy.ROUND_ROBIN: cluster_pb2.Cluster.ROUND_ROBIN,
    dest_policy_pb2.LoadBalancing.SimpleLBPolicy.LEAST_CONN: cluster_pb2.Cluster.LEAST_REQUEST,
    dest_policy_pb2.LoadBalancing.SimpleLBPolicy.RANDOM: cluster_pb2.Cluster.RANDOM,
}


def outbound_clusters(
    index: MeshIndex, instances: Sequence[ServiceInstance], *, proxyless: bool = False
) -> list[cluster_pb2.Cluster]:
    """A cluster for every port of every service, and one per label subset that a rule or
    policy names; policies pick the proxy's load balancing and circuit breaking."""
    clusters = []
    services = index.snapshot.services
    for hostname in sorted(services):
        service = services[hostname]
        subsets = [Labels(), *sorted(index.subsets_by_host.get(hostname, ()), key=str)]
        for port in service.ports:
            if proxyless and not port.protocol.is_http:
                continue
            for labels in subsets:
                policy = policy_for(index, hostname, labels, instances)
                clusters.append(
                    _service_cluster(index, service, port, labels, policy, proxyless=proxyless)
                )
    return clusters


def _service_cluster(
    index: MeshIndex,
    service: Service,
    port: Port,
    labels: Labels,
    policy: dest_policy_pb2.DestinationPolicy | None,
    *,
    proxyless: bool,
) -> cluster_pb2.Cluster:
    name = cluster_name(Direction.OUTBOUND, port.port, service.hostname, labels)
    mtls = common.auth_policy(index.snapshot.mesh, port) is AuthPolicy.MUTUAL_TLS
    cluster = cluster_pb2.Cluster(
        name=name,
        connect_timeout=common.copy_duration(index.snapshot.mesh.connect_timeout),
    )
    if mtls and not service.mesh_external:
        # What the sidecar's TLS origination reads (the CA issue): mesh services speak mTLS
        # when the mesh (or the service port's auth.istio.io annotation) says so; external
        # ones never do. Only set when true: every proxy decodes every cluster, and the
        # service, port and labels are in the name already.
        # The identities the service's workloads run as: the proxy checks the server's
        # certificate names one of them (0.2's verify_subject_alt_name).
        fields: dict[str, object] = {"mtls": True}
        if service.service_accounts:
            fields["subject_alt_names"] = list(service.service_accounts)
        cluster.metadata.CopyFrom(common.istio_metadata(fields))
    resolution = service.resolution
    if resolution is Resolution.STATIC or proxyless:
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(common.ads())
        # No service_name: it defaults to the cluster's name, in Envoy and in gRPC's client,
        # and every proxy decodes every cluster.
    elif resolution is Resolution.DNS:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        endpoints = [
            (i.address, i.port)
            for i in index.instances_of(service.hostname)
            if i.service_port.port == port.port and i.labels.matches(labels)
        ] or [(service.hostname, port.port)]
        cluster.load_assignment.CopyFrom(_static_assignment(name, endpoints))
    else:
        cluster.type = cluster_pb2.Cluster.ORIGINAL_DST
        cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    if policy is not None:
        _apply_policy(cluster, policy)
    if port.protocol.is_http2 and not proxyless:
        _use_http2(cluster)
    return cluster


def _apply_policy(cluster: cluster_pb2.Cluster, policy: dest_policy_pb2.DestinationPolicy) -> None:
    if policy.load_balancing.WhichOneof("lb_policy") == "name" and (
        cluster.lb_policy != cluster_pb2.Cluster.CLUSTER_PROVIDED
    ):
        cluster.lb_policy = _LB[policy.load_balancing.name]
    if not policy.circuit_breaker.HasField("simple_cb"):
        return
    cb = policy.circuit_breaker.simple_cb
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds()
    for source, target in (
        ("max_connections", "max_connections"),
        ("http_max_pending_requests", "max_pending_requests"),
        ("http_max_requests", "max_requests"),
        ("http_max_retries", "max_retries"),
    ):
        value = getattr(cb, source)
        if value > 0:
            getattr(thresholds, target).value = value
    cluster.circuit_breakers.thresholds.append(thresholds)
    if cb.http_max_requests_per_connection > 0:
        options = _protocol_options(cluster)
        options.common_http_protocol_options.max_requests_per_connection.value = (
            cb.http_max_requests_per_connection
        )
        cluster.typed_extension_protocol_options[common.HTTP_PROTOCOL_OPTIONS].Pack(options)
    if cb.http_consecutive_errors > 0:
        outlier = outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=UInt32Value(value=cb.http_consecutive_errors)
        )
        if cb.HasField("http_detection_interval"):
            outlier.interval.CopyFrom(cb.http_detection_interval)
        if cb.HasField("sleep_window"):
            outlier.base_ejection_time.CopyFrom(cb.sleep_window)
        if cb.http_max_ejection_percent > 0:
            outlier.max_ejection_percent.value = cb.http_max_ejection_percent
        cluster.outlier_detection.CopyFrom(outlier)


def _protocol_options(
    cluster: cluster_pb2.Cluster,
) -> http_protocol_options_pb2.HttpProtocolOptions:
    options = http_protocol_options_pb2.HttpProtocolOptions()
    existing = cluster.typed_extension_protocol_options.get(common.HTTP_PROTOCOL_OPTIONS)
    if existing is not None:
        existing.Unpack(options)
    return options


def _use_http2(cluster: cluster_pb2.Cluster) -> None:
    options = _protocol_options(cluster)
    options.explicit_http_config.http2_protocol_options.CopyFrom(
        protocol_pb2.Http2ProtocolOptions()
    )
    cluster.typed_extension_protocol_options[common.HTTP_PROTOCOL_OPTIONS].Pack(options)


def _static_assignment(
    name: str, endpoints: Sequence[tuple[str, int]]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=common.socket_address(address, port)
                        )
                    )
                    for address, port in endpoints
                ]
            )
        ],
    )


def app_address(proxy: Proxy, port: int) -> tuple[str, int]:
    """Where the proxy's own app listens for a service port.

    With iptables capture (the default) the app is on 127.0.0.1 at the endpoint port. Without
    it (node metadata INTERCEPTION_MODE=NONE, the local platform) the sidecar owns the service
    port and the app listens at APP_HOST (default the proxy's IP) on the port APP_PORTS maps
    it to ("9080:19080,9090:19090").
    """
    if proxy.metadata.get("INTERCEPTION_MODE", "REDIRECT").upper() != "NONE":
        return "127.0.0.1", port
    mapping = {}
    for item in proxy.metadata.get("APP_PORTS", "").split(","):
        service_port, _, target = item.partition(":")
        if service_port.strip().isdigit() and target.strip().isdigit():
            mapping[int(service_port)] = int(target)
    return proxy.metadata.get("APP_HOST", proxy.ip), mapping.get(port, port)


def inbound_clusters(
    index: MeshIndex, proxy: Proxy, instances: Sequence[ServiceInstance]
) -> list[cluster_pb2.Cluster]:
    clusters: dict[str, cluster_pb2.Cluster] = {}
    for instance in instances:
        name = cluster_name(Direction.INBOUND, instance.port, instance.service.hostname)
        if name in clusters:
            continue
        cluster = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.STATIC,
            connect_timeout=common.copy_duration(index.snapshot.mesh.connect_timeout),
            load_assignment=_static_assignment(name, [app_address(proxy, instance.port)]),
        )
        if instance.service_port.protocol.is_http2:
            _use_http2(cluster)
        clusters[name] = cluster
    return [clusters[name] for name in sorted(clusters)]


def egress_clusters(index: MeshIndex) -> list[cluster_pb2.Cluster]:
    """External hosts allowed by EgressRules. A named host is resolved by DNS; a wildcard goes
    to the destination the client asked for. HTTPS ports originate TLS (0.2: the app calls
    http://host:443 and the sidecar speaks TLS to the host)."""
    clusters: dict[str, cluster_pb2.Cluster] = {}
    for config in index.snapshot.of_kind("EgressRule"):
        rule = egress_rule(config)
        host = rule.destination.service
        for port in rule.ports:
            name = cluster_name(Direction.OUTBOUND, port.port, host)
            if name in clusters:
                continue
            cluster = cluster_pb2.Cluster(
                name=name,
                connect_timeout=common.copy_duration(index.snapshot.mesh.connect_timeout),
                metadata=common.istio_metadata({"egress": host, "port": port.port}),
            )
            if host.startswith("*"):
                cluster.type = cluster_pb2.Cluster.ORIGINAL_DST
                cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
            else:
                cluster.type = cluster_pb2.Cluster.LOGICAL_DNS
                cluster.load_assignment.CopyFrom(_static_assignment(name, [(host, port.port)]))
            protocol = Protocol.parse(port.protocol)
            if protocol is Protocol.HTTPS:
                tls = tls_pb2.UpstreamTlsContext(sni="" if host.startswith("*") else host)
                cluster.transport_socket.name = common.TLS_TRANSPORT
                cluster.transport_socket.typed_config.Pack(tls)
            elif protocol.is_http2:
                _use_http2(cluster)
            clusters[name] = cluster
    return [clusters[name] for name in sorted(clusters)]
