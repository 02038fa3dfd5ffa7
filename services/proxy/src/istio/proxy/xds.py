"""The proxy's xDS state: accepted resources per type, compiled, and the snapshots built from
them. Pure bookkeeping (no I/O): the ADS client feeds it responses and sends what it says.

A response is compiled whole: if any resource in it cannot be compiled, the response is
rejected (NACK with the reason) and the last accepted resources of that type stay. An accepted
response may change what the proxy must subscribe to: EDS names follow the EDS clusters of
CDS, RDS names the route configurations the listeners of LDS name. A snapshot is `complete`
once every route configuration and cluster load assignment it references has arrived, which is
when the agent applies it (Envoy's warming), so no listener is served without its routes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from istio.proxy import compile, envoy
from istio.proxy.config import ClusterType, HttpManager, Snapshot
from istio.proxy.wire import DecodeError, Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}
WILDCARD_TYPES = (CLUSTER, LISTENER)
# Responses of these types may carry a part of what the proxy subscribed to (the rest stays).
MERGED_TYPES = frozenset({ENDPOINT, ROUTE})

# Decoded with istio.proxy.wire's schema (istio.proxy.envoy), not protobuf: see wire.py.
_MESSAGES: dict[str, type[Message]] = {
    CLUSTER: envoy.Cluster,
    ENDPOINT: envoy.ClusterLoadAssignment,
    LISTENER: envoy.Listener,
    ROUTE: envoy.RouteConfiguration,
}


def from_protobuf(message: Any) -> Message:
    """A protobuf object of a type the proxy decodes, as the proxy decodes it (through its wire
    bytes): for tests and tools that build resources with protobuf's classes."""
    ours = envoy.BY_FULL_NAME[message.DESCRIPTOR.full_name]
    return ours.decode(message.SerializeToString())


def _name(type_url: str, message: Any) -> str:
    return str(message.cluster_name if type_url == ENDPOINT else message.name)


_COMPILERS: dict[str, Callable[[Any], Any]] = {
    CLUSTER: compile.cluster,
    ENDPOINT: compile.load_assignment,
    LISTENER: compile.listener,
    ROUTE: compile.route_table,
}


@dataclass(frozen=True, slots=True)
class TypeState:
    """The accepted resources of one type. `raw` keeps each one as its wire bytes (for
    /config_dump, decoded again by `message`): parsed protobuf messages would cost several
    times the memory, and only the compiled records are read when serving."""

    version: str = ""
    raw: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    compiled: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def message(self, type_url: str, name: str) -> Any:
        """The resource `name` as accepted, decoded again with protobuf's full classes (every
        field, for /config_dump; importing them costs the process several MB, so only a dump
        does)."""
        return _protobuf_classes()[type_url].FromString(self.raw[name])


def _protobuf_classes() -> dict[str, Any]:
    """protobuf's classes of the four resource types, with the descriptors of everything Pilot
    packs in their Any fields (json_format must find them to print them)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.config.trace.v3 import zipkin_pb2  # noqa: F401
    from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
    from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
        http_connection_manager_pb2,
    )
    from envoy.extensions.filters.network.mongo_proxy.v3 import mongo_proxy_pb2  # noqa: F401
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

    return {
        CLUSTER: cluster_pb2.Cluster,
        ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
        LISTENER: listener_pb2.Listener,
        ROUTE: route_pb2.RouteConfiguration,
    }


class XdsState:
    def __init__(self, checks: Mapping[str, Callable[[Any], None]] | None = None) -> None:
        """`checks`: by type, what must hold of each compiled resource beyond the resource
        itself (the files a listener's TLS names load): raises CompileError to NACK."""
        self.checks = dict(checks or {})
        self.types: dict[str, TypeState] = {url: TypeState() for url in SHORT_NAMES}
        self.received: set[str] = set()
        self.nacks = 0
        self.last_nack = ""

    def accept(self, type_url: str, version: str, resources: Sequence[Any]) -> str | None:
        """Compile a response; None when accepted, else the reason to NACK it with.
        `resources` are Any messages (ours or protobuf's: type_url and value are read)."""
        message_type = _MESSAGES.get(type_url)
        if message_type is None:
            return f"unsupported resource type {type_url}"
        raw: dict[str, bytes] = {}
        compiled: dict[str, Any] = {}
        check = self.checks.get(type_url)
        try:
            for packed in resources:
                if packed.type_url != type_url:
                    return f"resource of type {packed.type_url} in a {type_url} response"
                message = message_type.decode(packed.value)
                name = _name(type_url, message)
                if name in raw:
                    return f"duplicate {SHORT_NAMES[type_url]} resource {name!r}"
                compiled[name] = _COMPILERS[type_url](message)
                if check is not None:
                    check(compiled[name])
                raw[name] = packed.value
        except compile.CompileError as error:
            self.nacks += 1
            self.last_nack = str(error)
            return str(error)
        except DecodeError as error:
            self.nacks += 1
            self.last_nack = f"undecodable {SHORT_NAMES[type_url]} resource: {error}"
            return self.last_nack
        if type_url in MERGED_TYPES:
            # EDS and RDS responses may carry only the resources that changed: the others
            # stay as they were (snapshot() keeps only what the subscriptions name).
            previous = self.types[type_url]
            wanted = self.eds_names() if type_url == ENDPOINT else self.rds_names()
            kept = [name for name in previous.raw if name in wanted and name not in raw]
            raw = {**{n: previous.raw[n] for n in kept}, **raw}
            compiled = {**{n: previous.compiled[n] for n in kept}, **compiled}
        self.types[type_url] = TypeState(version, MappingProxyType(raw), MappingProxyType(compiled))
        self.received.add(type_url)
        return None

    def eds_names(self) -> frozenset[str]:
        return frozenset(
            cluster.eds_name or cluster.name
            for cluster in self.types[CLUSTER].compiled.values()
            if cluster.type is ClusterType.EDS
        )

    def rds_names(self) -> frozenset[str]:
        return frozenset(
            listener.chain.rds
            for listener in self.types[LISTENER].compiled.values()
            if isinstance(listener.chain, HttpManager) and listener.chain.rds
        )

    def snapshot(self) -> Snapshot:
        eds = self.eds_names()
        rds = self.rds_names()
        return Snapshot(
            listeners=self.types[LISTENER].compiled,
            routes=MappingProxyType(
                {k: v for k, v in self.types[ROUTE].compiled.items() if k in rds}
            ),
            clusters=self.types[CLUSTER].compiled,
            endpoints=MappingProxyType(
                {k: v for k, v in self.types[ENDPOINT].compiled.items() if k in eds}
            ),
            versions=MappingProxyType({SHORT_NAMES[u]: s.version for u, s in self.types.items()}),
        )

    def complete(self, snapshot: Snapshot) -> bool:
        return CLUSTER in self.received and LISTENER in self.received and not snapshot.missing()
