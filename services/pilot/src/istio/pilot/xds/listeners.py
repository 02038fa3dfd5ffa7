"""LDS: the sidecar's capture listener, per-port outbound listeners, inbound listeners to the
local app, and the gateways' listeners."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.filters.network.mongo_proxy.v3 import mongo_proxy_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import json_format

from istio.api.mixer.v1.config.client import quota_pb2
from istio.config.duration import parse_duration
from istio.model import Labels, Protocol, Proxy, ServiceInstance
from istio.model.service import DEFAULT_DOMAIN, Direction, Port, cluster_name
from istio.pilot.xds import common
from istio.pilot.xds import tracing as trace_settings
from istio.pilot.xds.index import MeshIndex, destination_policy, egress_rule, policy_for

VIRTUAL_LISTENER = "virtualOutbound"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
MONGO_PROXY = "envoy.filters.network.mongo_proxy"
# 0.2's DestinationPolicy has no TCP idle timeout: this annotation on one gives it (a Go
# duration; "0s" turns it off). Envoy's default, one hour, applies otherwise.
TCP_IDLE_TIMEOUT_ANNOTATION = "networking.istio.io/tcpIdleTimeout"
DEFAULT_TCP_IDLE_TIMEOUT_NANOS = 3600 * 1_000_000_000


def http_filters() -> list[hcm.HttpFilter]:
    """Fault injection (configured per route) before the router, as every HCM has them."""
    fault = hcm.HttpFilter(name=common.FAULT)
    fault.typed_config.Pack(fault_pb2.HTTPFault())
    router = hcm.HttpFilter(name=common.ROUTER)
    router.typed_config.Pack(router_pb2.Router())
    return [fault, router]


def connection_manager(
    stat_prefix: str,
    *,
    rds: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
    gateway: bool = False,
    tracing: hcm.HttpConnectionManager.Tracing | None = None,
) -> hcm.HttpConnectionManager:
    manager = hcm.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm.HttpConnectionManager.AUTO,
        http_filters=http_filters(),
        generate_request_id={"value": True},
        use_remote_address={"value": gateway},
    )
    if tracing is not None:
        manager.tracing.CopyFrom(tracing)
    if rds is not None:
        manager.rds.config_source.CopyFrom(common.ads())
        manager.rds.route_config_name = rds
    elif route_config is not None:
        manager.route_config.CopyFrom(route_config)
    return manager


def _chain(filter_name: str, config: Any) -> listener_components_pb2.FilterChain:
    network_filter = listener_components_pb2.Filter(name=filter_name)
    network_filter.typed_config.Pack(config)
    return listener_components_pb2.FilterChain(filters=[network_filter])


def _tcp_proxy(
    stat_prefix: str, cluster: str, idle_timeout: int | None = None
) -> tcp_proxy_pb2.TcpProxy:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    if idle_timeout is not None:
        proxy.idle_timeout.CopyFrom(common.duration(idle_timeout))
    return proxy


def tcp_idle_timeout(index: MeshIndex, hostname: str, labels: Labels) -> int:
    """The idle timeout (nanoseconds) of TCP connections to a service: from the annotation on
    the DestinationPolicy that applies to it, else Envoy's default. Policies selected by source
    are not consulted (these listeners are shared by every proxy); an annotation that is not
    a duration is ignored."""
    policy = policy_for(index, hostname, labels, ())
    if policy is None:
        return DEFAULT_TCP_IDLE_TIMEOUT_NANOS
    for config in index.policies_by_host.get(hostname, []):
        if destination_policy(config) is policy:
            text = config.meta.annotations.get(TCP_IDLE_TIMEOUT_ANNOTATION)
            if text is None:
                break
            try:
                nanos = parse_duration(text)
            except ValueError:
                break
            return max(nanos, 0)
    return DEFAULT_TCP_IDLE_TIMEOUT_NANOS


def tcp_chain(
    index: MeshIndex, hostname: str, labels: Labels, port: Port, cluster: str
) -> listener_components_pb2.FilterChain:
    """A TCP port's chain: tcp_proxy to `cluster`; on MONGO ports Envoy's mongo_proxy (stats)
    before it; on REDIS ports the chain's metadata `istio.protocol: REDIS`, from which the
    proxy keeps RESP stats on the spliced bytes (Envoy's redis_proxy is a full proxy with
    its own routing, not a splice: docs/pilot.md)."""
    proxy = _tcp_proxy(cluster, cluster, tcp_idle_timeout(index, hostname, labels))
    chain = _chain(common.TCP_PROXY, proxy)
    if port.protocol is Protocol.MONGO:
        mongo = listener_components_pb2.Filter(name=MONGO_PROXY)
        mongo.typed_config.Pack(mongo_proxy_pb2.MongoProxy(stat_prefix=cluster))
        chain.filters.insert(0, mongo)
    elif port.protocol is Protocol.REDIS:
        chain.metadata.CopyFrom(common.istio_metadata({"protocol": Protocol.REDIS.value}))
    return chain


def virtual_listener(index: MeshIndex) -> listener_pb2.Listener:
    """Port 15001: captured connections are handed to the listener for their original
    destination; anything else finds no route (0.2 blocked unknown external traffic).

    With Mixer in the mesh its metadata says `mixer_forward_attributes`: the sidecar then
    tells the server sidecar its own source attributes on every outbound request (0.2's
    forward_attributes; the values are the proxy's own, so these listeners stay shared)."""
    mesh = index.snapshot.mesh
    port = mesh.proxy_listen_port or 15001
    listener = listener_pb2.Listener(
        name=VIRTUAL_LISTENER,
        address=common.socket_address("0.0.0.0", port),
        use_original_dst={"value": True},
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name=common.ORIGINAL_DST,
                typed_config=common.packed(original_dst_pb2.OriginalDst()),
            )
        ],
        default_filter_chain=_chain(
            common.TCP_PROXY, _tcp_proxy(BLACKHOLE_CLUSTER, BLACKHOLE_CLUSTER)
        ),
    )
    if mesh.mixer_address:
        listener.metadata.CopyFrom(common.istio_metadata({"mixer_forward_attributes": True}))
    return listener


def outbound_ports(index: MeshIndex) -> list[int]:
    """Ports with an HTTP service or an HTTP EgressRule: each gets a listener and a route
    configuration named after it."""
    ports = {
        number
        for number, services in index.services_by_port.items()
        if any(s.port_numbered(number).protocol.is_http for s in services)  # type: ignore[union-attr]
    }
    for config in index.snapshot.of_kind("EgressRule"):
        for port in egress_rule(config).ports:
            if Protocol.parse(port.protocol) is not Protocol.TCP:
                ports.add(port.port)
    return sorted(ports)


def outbound_listeners(index: MeshIndex) -> list[listener_pb2.Listener]:
    listeners = []
    for port in outbound_ports(index):
        listeners.append(
            listener_pb2.Listener(
                name=f"0.0.0.0_{port}",
                address=common.socket_address("0.0.0.0", port),
                bind_to_port={"value": False},
                traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
                filter_chains=[
                    _chain(
                        common.HTTP_CONNECTION_MANAGER,
                        connection_manager(
                            f"outbound_{port}",
                            rds=str(port),
                            tracing=trace_settings.connection_manager_tracing(index.snapshot.mesh),
                        ),
                    )
                ],
            )
        )
    services = index.snapshot.services
    for hostname in sorted(services):
        service = services[hostname]
        if not service.address:
            continue  # TCP needs a VIP to tell services apart (0.2's rule)
        for tcp_port in service.ports:
            if tcp_port.protocol.is_http:
                continue
            cluster = cluster_name(Direction.OUTBOUND, tcp_port.port, hostname)
            listeners.append(
                listener_pb2.Listener(
                    name=f"{service.address}_{tcp_port.port}",
                    address=common.socket_address(service.address, tcp_port.port),
                    bind_to_port={"value": False},
                    traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
                    filter_chains=[tcp_chain(index, hostname, Labels(), tcp_port, cluster)],
                )
            )
    return listeners


def quota_specs(index: MeshIndex, instance: ServiceInstance) -> list[dict[str, Any]]:
    """The QuotaSpecs (as JSON) that QuotaSpecBindings bind to the instance's service (and, when
    a binding's service names labels, to instances with those labels), in binding order
    (namespace, name), each once. A reference to a spec that does not exist binds nothing."""
    specs = {(c.meta.namespace, c.meta.name): c.spec for c in index.snapshot.of_kind("QuotaSpec")}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for config in index.snapshot.of_kind("QuotaSpecBinding"):
        binding = config.spec
        assert isinstance(binding, quota_pb2.QuotaSpecBinding)
        namespace = config.meta.namespace
        if not any(
            _quota_host(service, namespace) == instance.service.hostname
            and instance.labels.matches(service.labels)
            for service in binding.services
        ):
            continue
        for reference in binding.quota_specs:
            key = (reference.namespace or namespace, reference.name)
            spec = specs.get(key)
            if spec is not None and key not in found:
                found[key] = json_format.MessageToDict(spec)
    return list(found.values())


def _quota_host(service: quota_pb2.IstioService, namespace: str) -> str:
    """The hostname a binding's IstioService names (its namespace defaults to the binding's)."""
    if service.service:
        return service.service
    return f"{service.name}.{service.namespace or namespace}.{service.domain or DEFAULT_DOMAIN}"


def inbound_listeners(
    index: MeshIndex, proxy: Proxy, instances: Sequence[ServiceInstance]
) -> list[listener_pb2.Listener]:
    """One listener per port the proxy's workload serves, in front of the app.

    With iptables capture they are not bound (traffic arrives through 15001); without it
    (INTERCEPTION_MODE=NONE, the local platform) the sidecar binds them on its own IP.
    Their metadata carries what the Mixer filter reports about the destination, the
    QuotaSpecs bound to it (what each request is charged in Check), and the service port's
    auth policy (the mesh's, or its auth.istio.io annotation's), from which
    the proxy terminates mutual TLS. When services share an endpoint port, the listener
    follows the first (by hostname), as its Mixer attributes do.
    """
    bind = proxy.metadata.get("INTERCEPTION_MODE", "REDIRECT").upper() == "NONE"
    mesh = index.snapshot.mesh
    by_port: dict[int, ServiceInstance] = {}
    for instance in sorted(instances, key=lambda i: (i.port, i.service.hostname)):
        by_port.setdefault(instance.port, instance)
    listeners = []
    for port, instance in sorted(by_port.items()):
        cluster = cluster_name(Direction.INBOUND, port, instance.service.hostname)
        mixer: dict[str, Any] = {
            "address": mesh.mixer_address,
            "disable_policy_checks": mesh.disable_policy_checks,
            "attributes": {
                "destination.service": instance.service.hostname,
                "destination.ip": proxy.ip,
                # 0.2's: the workload's pod, as Mixer's Kubernetes adapter names it (the
                # calling sidecar sends its own as source.uid)
                "destination.uid": f"kubernetes://{proxy.id}",
                "destination.port": port,
                "destination.labels": dict(instance.labels),
                "destination.user": instance.service_account,
                "destination.namespace": instance.service.namespace,
            },
        }
        specs = quota_specs(index, instance)
        if specs:
            mixer["quota_specs"] = specs
        if instance.service_port.protocol.is_http:
            route_config = route_pb2.RouteConfiguration(
                name=f"inbound|{port}",
                virtual_hosts=[
                    rc.VirtualHost(
                        name=f"inbound|{port}",
                        domains=["*"],
                        routes=[
                            rc.Route(
                                name="inbound",
                                match=rc.RouteMatch(prefix="/"),
                                route=rc.RouteAction(
                                    cluster=cluster,
                                    upgrade_configs=[
                                        rc.RouteAction.UpgradeConfig(upgrade_type="websocket")
                                    ],
                                ),
                            )
                        ],
                    )
                ],
            )
            chain = _chain(
                common.HTTP_CONNECTION_MANAGER,
                connection_manager(
                    f"inbound_{port}",
                    route_config=route_config,
                    tracing=trace_settings.connection_manager_tracing(mesh),
                ),
            )
        else:
            chain = tcp_chain(
                index, instance.service.hostname, instance.labels, instance.service_port, cluster
            )
        listeners.append(
            listener_pb2.Listener(
                name=f"{proxy.ip}_{port}",
                address=common.socket_address(proxy.ip, port),
                bind_to_port={"value": bind},
                traffic_direction=base_pb2.TrafficDirection.INBOUND,
                filter_chains=[chain],
                metadata=common.istio_metadata(
                    {
                        "mixer": mixer,
                        "auth_policy": common.auth_policy(mesh, instance.service_port).value,
                        "mtls_permissive": mesh.mtls_permissive,
                        "protocol": instance.service_port.protocol.value,
                    }
                ),
            )
        )
    return listeners


def gateway_listener(
    name: str,
    port: int,
    route_config: str,
    tracing: hcm.HttpConnectionManager.Tracing | None = None,
) -> listener_pb2.Listener:
    """A gateway's bound HTTP listener (ingress and egress are the proxy as a gateway).
    OUTBOUND, as Istio marks gateway listeners: a gateway calls into the mesh (or out of it)
    on behalf of its clients, so its trace spans are CLIENT spans that the callee's sidecar
    shares; the root of a trace that enters at the ingress."""
    return listener_pb2.Listener(
        name=name,
        address=common.socket_address("0.0.0.0", port),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        filter_chains=[
            _chain(
                common.HTTP_CONNECTION_MANAGER,
                connection_manager(name, rds=route_config, gateway=True, tracing=tracing),
            )
        ],
    )


def tls_gateway_listener(
    name: str,
    port: int,
    route_config: str,
    certificates: Sequence[tuple[Sequence[str], str, str]],
    alpn: Sequence[str],
    tracing: hcm.HttpConnectionManager.Tracing | None = None,
) -> listener_pb2.Listener:
    """A gateway's bound HTTPS listener: TLS terminated with the certificate the client's SNI
    names. `certificates` holds (server names, certificate chain file, private key file); the
    entry without server names is the default chain, for clients that send no SNI or a name
    no other entry has. Every chain serves the same routes; no client certificate is asked
    for."""
    manager = connection_manager(name, rds=route_config, gateway=True, tracing=tracing)
    chains = []
    for server_names, cert_chain, private_key in certificates:
        chain = _chain(common.HTTP_CONNECTION_MANAGER, manager)
        if server_names:
            chain.filter_chain_match.server_names.extend(server_names)
        context = tls_pb2.DownstreamTlsContext(
            common_tls_context=tls_pb2.CommonTlsContext(
                tls_certificates=[
                    common_pb2.TlsCertificate(
                        certificate_chain=base_pb2.DataSource(filename=cert_chain),
                        private_key=base_pb2.DataSource(filename=private_key),
                    )
                ],
                alpn_protocols=list(alpn),
            )
        )
        chain.transport_socket.name = common.TLS_TRANSPORT
        chain.transport_socket.typed_config.Pack(context)
        chains.append(chain)
    return listener_pb2.Listener(
        name=name,
        address=common.socket_address("0.0.0.0", port),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name=common.TLS_INSPECTOR,
                typed_config=common.packed(tls_inspector_pb2.TlsInspector()),
            )
        ],
        filter_chains=chains,
    )
