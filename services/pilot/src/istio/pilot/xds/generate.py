"""The entry point of generation: (MeshSnapshot, Proxy) -> Resources, by kind of proxy.

Most of what a proxy gets is the same for every proxy of its kind in its namespace: those parts
are built once per snapshot and shared (MeshIndex.cached), with keys that hold everything they
depend on. Only rules and policies that select by source make outputs depend on the proxy's
own instances, and only then do the keys include them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf.message import Message

from istio.model import NodeType, Proxy, ServiceInstance
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.xds import clusters as cds
from istio.pilot.xds import endpoints as eds
from istio.pilot.xds import gateways, grpc, listeners, resources, routes, tracing
from istio.pilot.xds.index import MeshIndex, index_of, instances_key


def generate(snapshot: MeshSnapshot, proxy: Proxy) -> resources.Resources:
    index = index_of(snapshot)
    instances = index.proxy_instances(proxy)
    rules_key = instances_key(instances) if index.rules_use_source else None
    policies_key = instances_key(instances) if index.policies_use_source else None
    by_type: dict[str, list[Message]]
    if proxy.is_grpc:
        key: tuple[Hashable, ...] = ("grpc", proxy.namespace, rules_key)
        grpc_listeners = index.cached(
            (*key, "lds"), lambda: list(grpc.grpc_listeners_and_routes(index, proxy, instances)[0])
        )
        grpc_routes = index.cached(
            (*key, "rds"), lambda: list(grpc.grpc_listeners_and_routes(index, proxy, instances)[1])
        )
        by_type = {
            resources.CLUSTER: index.cached(
                ("cds", True, policies_key),
                lambda: list(cds.outbound_clusters(index, instances, proxyless=True)),
            ),
            resources.LISTENER: grpc_listeners,
            resources.ROUTE: grpc_routes,
        }
    elif proxy.type is NodeType.SIDECAR:
        by_type = _sidecar(index, proxy, instances, rules_key, policies_key)
    elif proxy.type is NodeType.INGRESS:
        by_type = {
            resources.CLUSTER: index.cached(
                ("cds", False, policies_key),
                lambda: list(cds.outbound_clusters(index, instances)),
            ),
            resources.LISTENER: index.cached(
                ("ingress", "lds"), lambda: list(gateways.ingress_listeners(index))
            ),
            resources.ROUTE: index.cached(
                ("ingress", "rds"),
                lambda: [
                    gateways.ingress_route_configuration(index, port)
                    for port in gateways.ingress_ports(index)
                ],
            ),
        }
    else:
        by_type = {
            resources.CLUSTER: index.cached(
                ("egress", "cds"), lambda: list(cds.egress_clusters(index))
            ),
            resources.LISTENER: list(gateways.egress_listeners(proxy, snapshot.mesh)),
            resources.ROUTE: index.cached(
                ("egress", "rds"), lambda: [gateways.egress_route_configuration(index)]
            ),
        }
    if not proxy.is_grpc:  # spans go to the collector while tracing is on
        by_type[resources.CLUSTER] = [*by_type[resources.CLUSTER], *_collector(index)]
    by_type[resources.ENDPOINT] = [
        _assignment(index, c.name)  # type: ignore[attr-defined]
        for c in by_type[resources.CLUSTER]
        if c.type == cluster_pb2.Cluster.EDS  # type: ignore[attr-defined]
    ]
    named = {t: {_name(m): m for m in items} for t, items in by_type.items()}
    return resources.Resources(
        named,
        {t: {name: index.digest(m) for name, m in items.items()} for t, items in named.items()},
    )


def _sidecar(
    index: MeshIndex,
    proxy: Proxy,
    instances: Sequence[ServiceInstance],
    rules_key: Hashable,
    policies_key: Hashable,
) -> dict[str, list[Message]]:
    outbound_ports = listeners.outbound_ports(index)
    return {
        resources.CLUSTER: [
            *index.cached(
                ("cds", False, policies_key), lambda: list(cds.outbound_clusters(index, instances))
            ),
            *cds.inbound_clusters(index, proxy, instances),
            *index.cached(("egress", "cds"), lambda: list(cds.egress_clusters(index))),
            *index.cached(("blackhole",), lambda: [_blackhole()]),
        ],
        resources.LISTENER: [
            *index.cached(("virtual",), lambda: [listeners.virtual_listener(index)]),
            *index.cached(("lds", "outbound"), lambda: list(listeners.outbound_listeners(index))),
            *listeners.inbound_listeners(index, proxy, instances),
        ],
        resources.ROUTE: [
            route
            for port in outbound_ports
            for route in index.cached(
                ("rds", port, proxy.namespace, rules_key),
                lambda port=port: [  # type: ignore[misc]
                    routes.port_route_configuration(index, port, proxy.namespace, instances)
                ],
            )
        ],
    }


def _name(message: Message) -> str:
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return str(message.cluster_name)
    return str(message.name)  # type: ignore[attr-defined]


def _assignment(index: MeshIndex, name: str) -> Message:
    return index.cached(("eds", name), lambda: [eds.load_assignment(index, name)])[0]


def _collector(index: MeshIndex) -> list[Message]:
    def build() -> list[Message]:
        cluster = tracing.zipkin_cluster(index.snapshot.mesh)
        return [cluster] if cluster is not None else []

    return index.cached(("zipkin",), build)


def _blackhole() -> cluster_pb2.Cluster:
    """Where captured traffic to unknown destinations goes: nowhere (0.2 blocked it)."""
    return cluster_pb2.Cluster(
        name=listeners.BLACKHOLE_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout={"seconds": 1},
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=listeners.BLACKHOLE_CLUSTER
        ),
    )
