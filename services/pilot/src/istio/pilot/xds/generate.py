"""The entry point of generation: (MeshSnapshot, Proxy) -> Resources, by kind of proxy.

Most of what a proxy gets is the same for every proxy of its kind in its namespace: those parts
are built once per snapshot and shared (MeshIndex.cached), with keys that hold everything they
depend on. Only rules and policies that select by source make outputs depend on the proxy's
own instances, and only then do the keys include them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf.message import Message

from istio.model import NodeType, Proxy, ServiceInstance
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.xds import clusters as cds
from istio.pilot.xds import endpoints as eds
from istio.pilot.xds import gateways, grpc, listeners, resources, routes, tracing
from istio.pilot.xds.index import MeshIndex, index_of, instances_key
from istio.pilot.xds.resources import Part


def generate(
    snapshot: MeshSnapshot,
    proxy: Proxy,
    *,
    ingress_certs_dir: str = gateways.DEFAULT_INGRESS_CERTS_DIR,
) -> resources.Resources:
    """`ingress_certs_dir`: where the ingress proxy finds the TLS secrets IngressRules name
    (pilot-discovery --ingress-certs-dir)."""
    index = index_of(snapshot)
    instances = index.proxy_instances(proxy)
    rules_key = instances_key(instances) if index.rules_use_source else None
    policies_key = instances_key(instances) if index.policies_use_source else None
    # Per type: parts shared with other proxies (built once per snapshot, see `_part`), and
    # messages of this proxy's own.
    shared: dict[str, list[Part]] = {t: [] for t in resources.PUSH_ORDER}
    own: dict[str, list[Message]] = {t: [] for t in resources.PUSH_ORDER}
    if proxy.is_grpc:
        key: tuple[Hashable, ...] = ("grpc", proxy.namespace, rules_key)
        shared[resources.LISTENER].append(
            _part(
                index,
                (*key, "lds"),
                lambda: list(grpc.grpc_listeners_and_routes(index, proxy, instances)[0]),
            )
        )
        shared[resources.ROUTE].append(
            _part(
                index,
                (*key, "rds"),
                lambda: list(grpc.grpc_listeners_and_routes(index, proxy, instances)[1]),
            )
        )
        clusters_key: tuple[Hashable, ...] = ("cds", True, policies_key)
        shared[resources.CLUSTER].append(
            _part(
                index,
                clusters_key,
                lambda: list(cds.outbound_clusters(index, instances, proxyless=True)),
            )
        )
    elif proxy.type is NodeType.SIDECAR:
        clusters_key = ("sidecar-cds", policies_key)
        _sidecar(index, proxy, instances, rules_key, policies_key, shared, own)
    elif proxy.type is NodeType.INGRESS:
        clusters_key = ("ingress-cds", policies_key)
        shared[resources.CLUSTER].append(
            _part(
                index,
                clusters_key,
                lambda: [*cds.outbound_clusters(index, instances), *_collector(index)],
            )
        )
        shared[resources.LISTENER].append(
            _part(
                index,
                ("ingress", "lds", ingress_certs_dir),
                lambda: list(gateways.ingress_listeners(index, ingress_certs_dir)),
            )
        )
        shared[resources.ROUTE].append(
            _part(
                index,
                ("ingress", "rds"),
                lambda: [
                    gateways.ingress_route_configuration(index, port)
                    for port in gateways.ingress_ports(index)
                ],
            )
        )
    else:
        clusters_key = ("egress-cds",)
        shared[resources.CLUSTER].append(
            _part(
                index,
                clusters_key,
                lambda: [*cds.egress_clusters(index), *_collector(index)],
            )
        )
        own[resources.LISTENER] = list(gateways.egress_listeners(proxy, snapshot.mesh))
        shared[resources.ROUTE].append(
            _part(index, ("egress", "rds"), lambda: [gateways.egress_route_configuration(index)])
        )
    # Assignments for the EDS clusters; a proxy's own clusters are never EDS (inbound ones
    # are STATIC), so these follow from the shared clusters alone.
    cluster_parts = shared[resources.CLUSTER]
    shared[resources.ENDPOINT].append(
        _part(
            index,
            ("eds-of", clusters_key),
            lambda: [
                _assignment(index, name)
                for part in cluster_parts
                for name, cluster in part.named.items()
                if cluster.type == cluster_pb2.Cluster.EDS  # type: ignore[attr-defined]
            ],
        )
    )
    by_type: dict[str, Mapping[str, Message]] = {}
    digests: dict[str, Mapping[str, bytes]] = {}
    versions: dict[str, str] = {}
    layout: dict[str, tuple[tuple[Part, ...], tuple[str, ...]]] = {}
    for type_url in resources.PUSH_ORDER:
        parts, mine = shared[type_url], own[type_url]
        if len(parts) == 1 and not mine:
            # The whole type is one shared part: its mappings and version, not copies.
            by_type[type_url], digests[type_url] = parts[0].named, parts[0].digests
            versions[type_url] = parts[0].version
            layout[type_url] = (tuple(parts), ())
            continue
        named: dict[str, Message] = {}
        known: dict[str, bytes] = {}
        for part in parts:
            named.update(part.named)
            known.update(part.digests)
        own_digests: dict[str, bytes] = {}
        for message in mine:
            name = _name(message)
            named[name] = message
            known[name] = own_digests[name] = index.digest(message)
        by_type[type_url], digests[type_url] = named, known
        # The parts' versions and the proxy's own digests: a version that moves whenever
        # the content does, without hashing the shared parts' resources again.
        parts_version = "+".join(part.version for part in parts)
        own_version = resources.content_version(own_digests)
        versions[type_url] = resources.content_version({parts_version: own_version.encode()})
        layout[type_url] = (tuple(parts), tuple(own_digests))
    return resources.Resources(by_type, digests, versions, layout)


def _part(index: MeshIndex, key: Hashable, build: Callable[[], list[Message]]) -> Part:
    """The messages `build` makes, as a Part built once per snapshot for every proxy that
    asks with `key` (which holds everything the output depends on)."""

    def make() -> list[Part]:
        messages = index.cached(("part-messages", key), build)
        named = {_name(m): m for m in messages}
        digests = {name: index.digest(m) for name, m in named.items()}
        return [Part(named, digests, resources.content_version(digests))]

    part: Part = index.cached_part(key, make)
    return part


def endpoint_changes(
    old: MeshSnapshot, new: MeshSnapshot
) -> dict[str, tuple[Message, bytes]] | None:
    """For a push where only endpoints changed from `old` to `new`: the assignments, by
    cluster name, that may differ (those of the hosts whose instances changed; every other
    one is the same message as before), with their content digests. None when that is not
    known (the mesh changed in other ways, or a DNS host changed): then everything is
    compared."""
    index = index_of(new)
    for previous, names in index.carried_from:
        if previous is old:
            changed = {}
            for name in sorted(names):
                message = _assignment(index, name)
                changed[name] = (message, index.digest(message))
            return changed
    return None


def _sidecar(
    index: MeshIndex,
    proxy: Proxy,
    instances: Sequence[ServiceInstance],
    rules_key: Hashable,
    policies_key: Hashable,
    shared: dict[str, list[Part]],
    own: dict[str, list[Message]],
) -> None:
    shared[resources.CLUSTER].append(
        _part(
            index,
            ("sidecar-cds", policies_key),
            lambda: [
                *cds.outbound_clusters(index, instances),
                *cds.egress_clusters(index),
                _blackhole(),
                *_collector(index),
            ],
        )
    )
    # A proxy's own inbound clusters and listeners depend on it, its instances, the mesh
    # config and the QuotaSpecs (and bindings) alone: kept per proxy, and carried across
    # routing rule changes (istio.pilot.xds.index).
    own_key = (proxy.node_id, tuple(sorted(proxy.metadata.items())))
    own[resources.CLUSTER] = index.cached(
        ("inbound-cds", own_key), lambda: list(cds.inbound_clusters(index, proxy, instances))
    )
    shared[resources.LISTENER].append(
        _part(
            index,
            ("sidecar-lds",),
            lambda: [listeners.virtual_listener(index), *listeners.outbound_listeners(index)],
        )
    )
    own[resources.LISTENER] = index.cached(
        ("inbound-lds", own_key),
        lambda: list(listeners.inbound_listeners(index, proxy, instances)),
    )
    outbound_ports = listeners.outbound_ports(index)
    shared[resources.ROUTE].append(
        _part(
            index,
            ("sidecar-rds", proxy.namespace, rules_key),
            lambda: [
                routes.port_route_configuration(index, port, proxy.namespace, instances)
                for port in outbound_ports
            ],
        )
    )


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
