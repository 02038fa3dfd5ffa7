"""Ingress and egress gateways: the proxy at the mesh's edge (`ingress~` and `egress~` nodes)."""

from __future__ import annotations

from typing import cast

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import string_pb2

from istio.api.proxy.v1.config import ingress_rule_pb2, proxy_mesh_pb2
from istio.config import Config
from istio.model import Protocol, Proxy
from istio.model.service import Direction, cluster_name
from istio.pilot.xds import listeners, tracing
from istio.pilot.xds.index import MeshIndex, destination_host, egress_rule
from istio.pilot.xds.routes import route_match, service_routes

EGRESS_ROUTE_CONFIG = "egress"
DEFAULT_GATEWAY_PORT = 80


def _ingress_rule(config: Config) -> ingress_rule_pb2.IngressRule:
    return cast(ingress_rule_pb2.IngressRule, config.spec)


def ingress_ports(index: MeshIndex) -> list[int]:
    return sorted(
        {
            _ingress_rule(c).port or DEFAULT_GATEWAY_PORT
            for c in index.snapshot.of_kind("IngressRule")
        }
    )


def ingress_route_configuration(index: MeshIndex, port: int) -> route_pb2.RouteConfiguration:
    """IngressRules for a port, highest precedence first, each to its destination service
    port; requests no rule matches get 404."""
    rules = [
        c
        for c in index.snapshot.of_kind("IngressRule")
        if (_ingress_rule(c).port or DEFAULT_GATEWAY_PORT) == port
    ]
    rules.sort(key=lambda c: (-_ingress_rule(c).precedence, c.meta.namespace, c.meta.name))
    routes: list[rc.Route] = []
    for config in rules:
        rule = _ingress_rule(config)
        host = destination_host(rule.destination, config.meta.namespace)
        service = index.snapshot.services.get(host)
        if service is None:
            continue  # not known yet: no route until it is
        target = (
            service.port_named(rule.destination_port_name)
            if rule.WhichOneof("destination_servicePort") == "destination_port_name"
            else service.port_numbered(rule.destination_port)
        )
        if target is None:
            continue
        ingress_match = route_match(rule.match)
        # As 0.2 did, the destination's route rules apply behind the ingress: each of its
        # routes, narrowed to what the IngressRule matches.
        for route in service_routes(index, service, target, ()):
            combined = rc.Route()
            combined.CopyFrom(route)
            combined.name = f"{config.meta.namespace}/{config.meta.name}:{route.name}"
            combined.match.CopyFrom(_narrowed(ingress_match, route.match))
            if combined.HasField("route"):
                combined.route.upgrade_configs.append(
                    rc.RouteAction.UpgradeConfig(upgrade_type="websocket")
                )
            routes.append(combined)
    return route_pb2.RouteConfiguration(
        name=f"ingress_{port}",
        virtual_hosts=[rc.VirtualHost(name=f"ingress_{port}", domains=["*"], routes=routes)],
        validate_clusters={"value": False},
    )


def _narrowed(outer: rc.RouteMatch, inner: rc.RouteMatch) -> rc.RouteMatch:
    """A match for requests both match: the outer path, both sets of headers, and the inner
    path condition (unless it is the catch-all `/`) as a `:path` header."""
    match = rc.RouteMatch()
    match.CopyFrom(outer)
    match.headers.extend(inner.headers)
    kind = inner.WhichOneof("path_specifier")
    if kind == "prefix" and inner.prefix != "/":
        match.headers.append(
            rc.HeaderMatcher(
                name=":path", string_match=string_pb2.StringMatcher(prefix=inner.prefix)
            )
        )
    elif kind == "path":
        match.headers.append(
            rc.HeaderMatcher(name=":path", string_match=string_pb2.StringMatcher(exact=inner.path))
        )
    elif kind == "safe_regex":
        match.headers.append(
            rc.HeaderMatcher(
                name=":path", string_match=string_pb2.StringMatcher(safe_regex=inner.safe_regex)
            )
        )
    return match


def ingress_listeners(index: MeshIndex) -> list[listener_pb2.Listener]:
    return [
        listeners.gateway_listener(
            f"ingress_{port}",
            port,
            f"ingress_{port}",
            tracing=tracing.connection_manager_tracing(index.snapshot.mesh),
        )
        for port in ingress_ports(index)
    ]


def egress_route_configuration(index: MeshIndex) -> route_pb2.RouteConfiguration:
    """Every external host EgressRules allow, on every port they name."""
    virtual_hosts: dict[str, rc.VirtualHost] = {}
    for config in index.snapshot.of_kind("EgressRule"):
        rule = egress_rule(config)
        host = rule.destination.service
        for port in rule.ports:
            if Protocol.parse(port.protocol) is Protocol.TCP:
                continue
            name = f"{host}:{port.port}"
            domains = [name] + ([host] if port.port == DEFAULT_GATEWAY_PORT else [])
            virtual_hosts.setdefault(
                name,
                rc.VirtualHost(
                    name=name,
                    domains=domains,
                    routes=[
                        rc.Route(
                            name="egress",
                            match=rc.RouteMatch(prefix="/"),
                            route=rc.RouteAction(
                                cluster=cluster_name(Direction.OUTBOUND, port.port, host)
                            ),
                        )
                    ],
                ),
            )
    return route_pb2.RouteConfiguration(
        name=EGRESS_ROUTE_CONFIG,
        virtual_hosts=[virtual_hosts[n] for n in sorted(virtual_hosts)],
        validate_clusters={"value": False},
    )


def egress_listeners(proxy: Proxy, mesh: proxy_mesh_pb2.MeshConfig) -> list[listener_pb2.Listener]:
    """The egress gateway listens on GATEWAY_PORTS from its node metadata (80 by default, as
    0.2's istio-egress; the local platform uses 15002)."""
    ports = [
        int(p)
        for p in proxy.metadata.get("GATEWAY_PORTS", str(DEFAULT_GATEWAY_PORT)).split(",")
        if p.strip().isdigit()
    ]
    return [
        listeners.gateway_listener(
            f"egress_{port}",
            port,
            EGRESS_ROUTE_CONFIG,
            tracing=tracing.connection_manager_tracing(mesh),
        )
        for port in sorted(set(ports))
    ]
