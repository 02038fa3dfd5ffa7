"""RDS: route rules as Envoy routes, one RouteConfiguration per port.

Theory of operation. For a service, its rules are tried in precedence order (then namespace,
name); the first whose match holds takes the request; a final default route sends the rest to
every instance of the service, as 0.2 did. A rule whose `match.source` is not this proxy is
left out of this proxy's config altogether (the source is the proxy itself). Label subsets
become clusters named by istio.model.service.cluster_name, so CDS and RDS always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from istio.api.proxy.v1.config import route_rule_pb2
from istio.config import Config
from istio.model import Labels, Port, Protocol, Service, ServiceInstance
from istio.model.service import Direction, cluster_name
from istio.pilot.xds import common
from istio.pilot.xds.index import (
    MeshIndex,
    destination_host,
    egress_rule,
    route_rule,
    source_matches,
)

_PSEUDO_HEADERS = {"scheme": ":scheme", "method": ":method", "authority": ":authority"}
HTTP_RETRY_ON = "5xx,connect-failure,refused-stream"
GRPC_RETRY_ON = "cancelled,deadline-exceeded,internal,resource-exhausted,unavailable"


def domains(service: Service, port: int, proxy_namespace: str) -> list[str]:
    """Every name a client may use for the service: FQDN, the shorter Kubernetes forms (the
    bare name only from the same namespace, as DNS search paths allow), and the VIP; each
    with and without the port."""
    names = [service.hostname]
    suffix = f".{service.namespace}.svc.cluster.local"
    if service.hostname.endswith(suffix):
        short = service.hostname[: -len(suffix)]
        names += [f"{short}.{service.namespace}", f"{short}.{service.namespace}.svc"]
        if service.namespace == proxy_namespace:
            names.append(short)
    if service.address:
        names.append(service.address)
    return [form for name in names for form in (name, f"{name}:{port}")]


def _string_match(match: route_rule_pb2.StringMatch) -> string_pb2.StringMatcher:
    kind = match.WhichOneof("match_type")
    if kind == "exact":
        return string_pb2.StringMatcher(exact=match.exact)
    if kind == "prefix":
        return string_pb2.StringMatcher(prefix=match.prefix)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.regex))


def route_match(condition_set: route_rule_pb2.MatchCondition) -> rc.RouteMatch:
    """uri becomes the path match; scheme, method and authority their pseudo-headers."""
    match = rc.RouteMatch(prefix="/")
    headers = condition_set.request.headers
    for name in sorted(headers):
        condition = headers[name]
        kind = condition.WhichOneof("match_type")
        if name == "uri":
            if kind == "exact":
                match.path = condition.exact
            elif kind == "prefix":
                match.prefix = condition.prefix
            else:
                match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=condition.regex))
            continue
        match.headers.append(
            rc.HeaderMatcher(
                name=_PSEUDO_HEADERS.get(name, name), string_match=_string_match(condition)
            )
        )
    return match


def _port_of(index: MeshIndex, hostname: str, port: Port) -> int:
    """The port of a (possibly other) destination service: the same number when it has it."""
    service = index.snapshot.services.get(hostname)
    if service is None or service.port_numbered(port.port) is not None:
        return port.port
    http = [p for p in service.ports if p.protocol.is_http] or list(service.ports)
    return http[0].port if http else port.port


def _route_action(
    index: MeshIndex, config: Config, service: Service, port: Port, *, proxyless: bool
) -> rc.RouteAction:
    rule = route_rule(config)
    namespace = config.meta.namespace
    action = rc.RouteAction()
    targets = []
    for weight in rule.route:
        host = (
            destination_host(weight.destination, namespace)
            if weight.HasField("destination")
            else service.hostname
        )
        name = cluster_name(
            Direction.OUTBOUND, _port_of(index, host, port), host, Labels(weight.labels)
        )
        targets.append((name, weight.weight or 100))
    if len(targets) == 1:
        action.cluster = targets[0][0]
    elif targets:
        action.weighted_clusters.clusters.extend(
            rc.WeightedCluster.ClusterWeight(name=name, weight={"value": value})
            for name, value in targets
            if value > 0
        )
    else:
        action.cluster = cluster_name(Direction.OUTBOUND, port.port, service.hostname)

    if rule.http_req_timeout.HasField("simple_timeout"):
        timeout = rule.http_req_timeout.simple_timeout.timeout
        if proxyless:
            action.max_stream_duration.max_stream_duration.CopyFrom(timeout)
        else:
            action.timeout.CopyFrom(timeout)
    if rule.http_req_retries.HasField("simple_retry"):
        retry = rule.http_req_retries.simple_retry
        if retry.attempts > 0:
            policy = rc.RetryPolicy(
                retry_on=GRPC_RETRY_ON
                if proxyless or port.protocol is Protocol.GRPC
                else HTTP_RETRY_ON,
            )
            policy.num_retries.value = retry.attempts
            if retry.HasField("per_try_timeout"):
                policy.per_try_timeout.CopyFrom(retry.per_try_timeout)
            action.retry_policy.CopyFrom(policy)
    if rule.HasField("rewrite"):
        if rule.rewrite.uri:
            action.prefix_rewrite = rule.rewrite.uri
        if rule.rewrite.authority:
            action.host_rewrite_literal = rule.rewrite.authority
    if rule.websocket_upgrade and not proxyless:
        action.upgrade_configs.append(rc.RouteAction.UpgradeConfig(upgrade_type="websocket"))
    if rule.HasField("mirror") and not proxyless:
        host = destination_host(rule.mirror, namespace)
        action.request_mirror_policies.append(
            rc.RouteAction.RequestMirrorPolicy(
                cluster=cluster_name(
                    Direction.OUTBOUND,
                    _port_of(index, host, port),
                    host,
                    Labels(rule.mirror.labels),
                )
            )
        )
    return action


def _fault(rule: route_rule_pb2.RouteRule) -> fault_pb2.HTTPFault:
    fault = fault_pb2.HTTPFault()
    if rule.http_fault.HasField("delay"):
        delay = rule.http_fault.delay
        fault.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=delay.fixed_delay, percentage=common.percent(delay.percent)
            )
        )
    if rule.http_fault.HasField("abort"):
        abort = rule.http_fault.abort
        fault.abort.http_status = abort.http_status
        fault.abort.percentage.CopyFrom(common.percent(abort.percent))
    return fault


def rule_route(
    index: MeshIndex, config: Config, service: Service, port: Port, *, proxyless: bool
) -> rc.Route:
    rule = route_rule(config)
    route = rc.Route(
        name=f"{config.meta.namespace}/{config.meta.name}", match=route_match(rule.match)
    )
    if rule.HasField("redirect"):
        route.redirect.CopyFrom(
            rc.RedirectAction(
                path_redirect=rule.redirect.uri, host_redirect=rule.redirect.authority
            )
        )
    else:
        route.route.CopyFrom(_route_action(index, config, service, port, proxyless=proxyless))
    if rule.HasField("http_fault"):
        route.typed_per_filter_config[common.FAULT].Pack(_fault(rule))
    for name in sorted(rule.append_headers):
        route.request_headers_to_add.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, value=rule.append_headers[name]),
                append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD,
            )
        )
    return route


def default_route(service: Service, port: Port) -> rc.Route:
    return rc.Route(
        name="default",
        match=rc.RouteMatch(prefix="/"),
        route=rc.RouteAction(cluster=cluster_name(Direction.OUTBOUND, port.port, service.hostname)),
    )


def service_routes(
    index: MeshIndex,
    service: Service,
    port: Port,
    instances: Sequence[ServiceInstance],
    *,
    proxyless: bool = False,
) -> list[rc.Route]:
    """The routes for requests to one service port from this proxy, best rule first."""
    routes = []
    for config in index.rules_by_host.get(service.hostname, []):
        rule = route_rule(config)
        if rule.match.HasField("source") and not source_matches(
            rule.match.source, config.meta.namespace, instances
        ):
            continue
        routes.append(rule_route(index, config, service, port, proxyless=proxyless))
    routes.append(default_route(service, port))
    return routes


def egress_virtual_hosts(index: MeshIndex, port: int, taken: set[str]) -> list[rc.VirtualHost]:
    """Virtual hosts for the external hosts EgressRules allow on a port."""
    hosts = []
    for config in index.snapshot.of_kind("EgressRule"):
        rule = egress_rule(config)
        host = rule.destination.service
        for rule_port in rule.ports:
            if rule_port.port != port or Protocol.parse(rule_port.protocol) is Protocol.TCP:
                continue
            names = [n for n in (host, f"{host}:{port}") if n not in taken]
            if not names:
                continue
            taken.update(names)
            hosts.append(
                rc.VirtualHost(
                    name=f"{host}:{port}",
                    domains=names,
                    routes=[
                        rc.Route(
                            name="egress",
                            match=rc.RouteMatch(prefix="/"),
                            route=rc.RouteAction(
                                cluster=cluster_name(Direction.OUTBOUND, port, host)
                            ),
                        )
                    ],
                )
            )
    return hosts


def port_route_configuration(
    index: MeshIndex, port: int, proxy_namespace: str, instances: Sequence[ServiceInstance]
) -> route_pb2.RouteConfiguration:
    """Route configuration `<port>`: a virtual host for every HTTP service on the port, then
    the external hosts EgressRules allow on it."""
    virtual_hosts = []
    taken: set[str] = set()
    for service in index.services_by_port.get(port, []):
        service_port = service.port_numbered(port)
        if service_port is None or not service_port.protocol.is_http:
            continue
        names = [d for d in domains(service, port, proxy_namespace) if d not in taken]
        taken.update(names)
        virtual_hosts.append(
            rc.VirtualHost(
                name=f"{service.hostname}:{port}",
                domains=names,
                routes=service_routes(index, service, service_port, instances),
            )
        )
    virtual_hosts += egress_virtual_hosts(index, port, taken)
    return route_pb2.RouteConfiguration(
        name=str(port), virtual_hosts=virtual_hosts, validate_clusters={"value": False}
    )
