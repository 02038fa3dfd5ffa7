"""xDS resources (Envoy v3 protos) to the proxy's runtime config (istio.proxy.config).

Pure: no I/O, no asyncio. Each function compiles one resource or raises `CompileError` naming
the resource and what is wrong with it, which the agent sends back to Pilot as the NACK's
reason. Whatever the data path cannot honour faithfully is refused here, never half-applied.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable
from typing import Any, TypeVar

from istio.proxy import config as rt
from istio.proxy import envoy
from istio.proxy.tracing import TracingConfig
from istio.proxy.wire import Message, to_python

HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
MONGO_PROXY = "envoy.filters.network.mongo_proxy"
# Filter chain metadata Pilot sets on Redis ports: {"istio": {"protocol": "REDIS"}}.
ISTIO_METADATA = "istio"
ROUTER = "envoy.filters.http.router"
FAULT = "envoy.filters.http.fault"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS_TRANSPORT = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
# Pilot's shape of mTLS (docs/proxy.md): cluster metadata istio.mtls (and optionally
# istio.subject_alt_names), inbound listener metadata istio.auth_policy and istio.mtls_permissive.
MUTUAL_TLS = "MUTUAL_TLS"

M = TypeVar("M", bound=Message)

_HCM_TYPE = "type.googleapis.com/" + envoy.HttpConnectionManager.FULL_NAME
_TCP_TYPE = "type.googleapis.com/" + envoy.TcpProxy.FULL_NAME
_ZIPKIN_TYPE = "type.googleapis.com/" + envoy.ZipkinConfig.FULL_NAME
_MONGO_TYPE = "type.googleapis.com/" + envoy.MongoProxy.FULL_NAME
_FAULT_TYPE = "type.googleapis.com/" + envoy.HTTPFault.FULL_NAME
_UPSTREAM_TLS_TYPE = "type.googleapis.com/" + envoy.UpstreamTlsContext.FULL_NAME
_DOWNSTREAM_TLS_TYPE = "type.googleapis.com/" + envoy.DownstreamTlsContext.FULL_NAME
_TLS_VERSIONS = {
    envoy.TlsProtocol.TLS_AUTO: "",
    envoy.TlsProtocol.TLSv1_2: "TLSv1_2",
    envoy.TlsProtocol.TLSv1_3: "TLSv1_3",
}
# SubjectAltNameMatcher types as Python's getpeercert() names them.
_SAN_TYPES = {
    envoy.SanType.EMAIL: "email",
    envoy.SanType.DNS: "DNS",
    envoy.SanType.URI: "URI",
    envoy.SanType.IP_ADDRESS: "IP Address",
}
_DENOMINATORS = {
    envoy.DenominatorType.HUNDRED: 10_000,
    envoy.DenominatorType.TEN_THOUSAND: 100,
    envoy.DenominatorType.MILLION: 1,
}
_LB = {
    envoy.LbPolicy.ROUND_ROBIN: rt.LbPolicy.ROUND_ROBIN,
    envoy.LbPolicy.LEAST_REQUEST: rt.LbPolicy.LEAST_REQUEST,
    envoy.LbPolicy.RANDOM: rt.LbPolicy.RANDOM,
    envoy.LbPolicy.CLUSTER_PROVIDED: rt.LbPolicy.CLUSTER_PROVIDED,
}
_CLUSTER_TYPES = {
    envoy.DiscoveryType.STATIC: rt.ClusterType.STATIC,
    envoy.DiscoveryType.STRICT_DNS: rt.ClusterType.STRICT_DNS,
    envoy.DiscoveryType.LOGICAL_DNS: rt.ClusterType.LOGICAL_DNS,
    envoy.DiscoveryType.EDS: rt.ClusterType.EDS,
    envoy.DiscoveryType.ORIGINAL_DST: rt.ClusterType.ORIGINAL_DST,
}


class CompileError(ValueError):
    """A resource the proxy refuses; str() is the NACK's message."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"{kind} {name!r}: {reason}")
        self.kind = kind
        self.name = name
        self.reason = reason


def seconds(value: envoy.Duration) -> float:
    return float(value.seconds + value.nanos / 1e9)


def ppm(value: envoy.FractionalPercent) -> int:
    """A FractionalPercent as parts per million, capped at one million."""
    return min(int(value.numerator) * _DENOMINATORS.get(value.denominator, 1), 1_000_000)


def _unpack(kind: str, name: str, packed: envoy.Any, message: type[M]) -> M:
    """An Any's message, refused when it holds another type."""
    if packed.type_url != "type.googleapis.com/" + message.FULL_NAME:
        raise CompileError(kind, name, f"expected a {message.FULL_NAME}, got {packed.type_url}")
    return message.decode(packed.value)


def _regex(kind: str, name: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise CompileError(kind, name, f"regex {pattern!r} does not compile: {error}") from None


# Routes (RDS and inline route configurations).


def _string_matcher(
    name: str, header: str, matcher: envoy.StringMatcher, invert: bool
) -> rt.HeaderMatcher:
    kind = matcher.WhichOneof("match_pattern")
    ignore = matcher.ignore_case
    if kind == "exact":
        return rt.HeaderMatcher(header, rt.MatchKind.EXACT, matcher.exact, None, ignore, invert)
    if kind == "prefix":
        return rt.HeaderMatcher(header, rt.MatchKind.PREFIX, matcher.prefix, None, ignore, invert)
    if kind == "suffix":
        return rt.HeaderMatcher(header, rt.MatchKind.SUFFIX, matcher.suffix, None, ignore, invert)
    if kind == "contains":
        return rt.HeaderMatcher(
            header, rt.MatchKind.CONTAINS, matcher.contains, None, ignore, invert
        )
    if kind == "safe_regex":
        pattern = _regex("route", name, matcher.safe_regex.regex)
        return rt.HeaderMatcher(header, rt.MatchKind.REGEX, "", pattern, False, invert)
    raise CompileError("route", name, f"header {header!r}: unsupported string match {kind}")


def _header_matcher(name: str, matcher: envoy.HeaderMatcher) -> rt.HeaderMatcher:
    header = matcher.name.lower()
    invert = matcher.invert_match
    kind = matcher.WhichOneof("header_match_specifier")
    if kind == "string_match":
        return _string_matcher(name, header, matcher.string_match, invert)
    if kind == "exact_match":
        return rt.HeaderMatcher(header, rt.MatchKind.EXACT, matcher.exact_match, invert=invert)
    if kind == "prefix_match":
        return rt.HeaderMatcher(header, rt.MatchKind.PREFIX, matcher.prefix_match, invert=invert)
    if kind == "suffix_match":
        return rt.HeaderMatcher(header, rt.MatchKind.SUFFIX, matcher.suffix_match, invert=invert)
    if kind == "contains_match":
        return rt.HeaderMatcher(
            header, rt.MatchKind.CONTAINS, matcher.contains_match, invert=invert
        )
    if kind == "safe_regex_match":
        pattern = _regex("route", name, matcher.safe_regex_match.regex)
        return rt.HeaderMatcher(header, rt.MatchKind.REGEX, "", pattern, invert=invert)
    if kind == "present_match" or kind is None:
        present = matcher.present_match if kind else True
        return rt.HeaderMatcher(header, rt.MatchKind.PRESENT, invert=invert != (not present))
    raise CompileError("route", name, f"header {header!r}: unsupported match {kind}")


def _route_match(name: str, match: envoy.RouteMatch) -> rt.RouteMatch:
    if match.query_parameters or match.HasField("grpc") or match.HasField("tls_context"):
        raise CompileError("route", name, "query parameter, grpc and tls matches are unsupported")
    case_sensitive = not match.HasField("case_sensitive") or match.case_sensitive.value
    headers = tuple(_header_matcher(name, header) for header in match.headers)
    kind = match.WhichOneof("path_specifier")
    if kind == "prefix":
        return rt.RouteMatch(rt.PathKind.PREFIX, match.prefix, None, case_sensitive, headers)
    if kind == "path":
        return rt.RouteMatch(rt.PathKind.EXACT, match.path, None, case_sensitive, headers)
    if kind == "safe_regex":
        pattern = _regex("route", name, match.safe_regex.regex)
        return rt.RouteMatch(rt.PathKind.REGEX, "", pattern, case_sensitive, headers)
    raise CompileError("route", name, f"unsupported path match {kind}")


_RETRY_ON = {
    "5xx": "on_5xx",
    "gateway-error": "on_gateway_error",
    "connect-failure": "on_connect_failure",
    "reset": "on_reset",
    "refused-stream": "on_refused_stream",
    "retriable-status-codes": "",
    # gRPC statuses: see _GRPC_RETRY_ON
    "cancelled": "",
    "deadline-exceeded": "",
    "internal": "",
    "resource-exhausted": "",
    "unavailable": "",
}
# Envoy's gRPC retry_on conditions: the grpc-status of a trailers-only response.
_GRPC_RETRY_ON = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}


def _retry(name: str, policy: envoy.RetryPolicy) -> rt.RetryPolicy:
    flags: dict[str, bool] = {}
    grpc_statuses = set()
    for condition in filter(None, (c.strip() for c in policy.retry_on.split(","))):
        if condition not in _RETRY_ON:
            raise CompileError("route", name, f"unsupported retry_on condition {condition!r}")
        if _RETRY_ON[condition]:
            flags[_RETRY_ON[condition]] = True
        if condition in _GRPC_RETRY_ON:
            grpc_statuses.add(_GRPC_RETRY_ON[condition])
    return rt.RetryPolicy(
        **flags,
        retriable_status_codes=frozenset(policy.retriable_status_codes),
        grpc_statuses=frozenset(grpc_statuses),
        num_retries=policy.num_retries.value if policy.HasField("num_retries") else 1,
        per_try_timeout=seconds(policy.per_try_timeout),
    )


def _headers_to_add(options: Iterable[envoy.HeaderValueOption]) -> tuple[rt.HeaderToAdd, ...]:
    added = []
    for option in options:
        if option.HasField("append"):
            append = option.append.value
        else:
            append = option.append_action in (
                envoy.HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD,
                envoy.HeaderAppendAction.ADD_IF_ABSENT,
            )
        added.append(rt.HeaderToAdd(option.header.key.lower(), option.header.value, append))
    return tuple(added)


def _fault(name: str, packed: envoy.Any) -> rt.Fault:
    if packed.type_url != _FAULT_TYPE:
        raise CompileError("route", name, f"fault config of type {packed.type_url}")
    fault = envoy.HTTPFault.decode(packed.value)
    delay = fault.delay
    if delay.HasField("header_delay") or fault.abort.HasField("header_abort"):
        raise CompileError("route", name, "header-controlled faults are unsupported")
    abort_status = fault.abort.http_status
    if fault.abort.HasField("grpc_status"):
        raise CompileError("route", name, "gRPC status aborts are unsupported")
    if fault.HasField("abort") and not 200 <= abort_status < 600:
        raise CompileError("route", name, f"abort http_status {abort_status} out of range")
    return rt.Fault(
        delay=seconds(delay.fixed_delay),
        delay_ppm=ppm(delay.percentage) if delay.HasField("fixed_delay") else 0,
        abort_status=abort_status,
        abort_ppm=ppm(fault.abort.percentage) if fault.HasField("abort") else 0,
    )


def _action(name: str, action: envoy.RouteAction) -> rt.RouteAction:
    kind = action.WhichOneof("cluster_specifier")
    if kind == "cluster":
        clusters: tuple[tuple[str, int], ...] = ((action.cluster, 1),)
        total = 1
    elif kind == "weighted_clusters":
        clusters = tuple(
            (weight.name, weight.weight.value)
            for weight in action.weighted_clusters.clusters
            if weight.weight.value > 0
        )
        total = sum(weight for _, weight in clusters)
        if not clusters:
            raise CompileError("route", name, "weighted_clusters without a positive weight")
    else:
        raise CompileError("route", name, f"unsupported cluster specifier {kind}")
    websocket = False
    for upgrade in action.upgrade_configs:
        if upgrade.upgrade_type.lower() != "websocket":
            raise CompileError("route", name, f"unsupported upgrade {upgrade.upgrade_type!r}")
        websocket = not upgrade.HasField("enabled") or upgrade.enabled.value
    return rt.RouteAction(
        clusters=clusters,
        total_weight=total,
        timeout=seconds(action.timeout) if action.HasField("timeout") else rt.DEFAULT_ROUTE_TIMEOUT,
        retry=_retry(name, action.retry_policy) if action.HasField("retry_policy") else None,
        prefix_rewrite=action.prefix_rewrite or None,
        host_rewrite=action.host_rewrite_literal,
        mirrors=tuple(
            mirror.cluster
            for mirror in action.request_mirror_policies
            if not mirror.HasField("runtime_fraction")
            or mirror.runtime_fraction.default_value.numerator > 0
        ),
        websocket=websocket,
    )


def _redirect(redirect: envoy.RedirectAction) -> rt.Redirect:
    codes = {
        envoy.RedirectResponseCode.MOVED_PERMANENTLY: 301,
        envoy.RedirectResponseCode.FOUND: 302,
        envoy.RedirectResponseCode.SEE_OTHER: 303,
        envoy.RedirectResponseCode.TEMPORARY_REDIRECT: 307,
        envoy.RedirectResponseCode.PERMANENT_REDIRECT: 308,
    }
    scheme = "https" if redirect.https_redirect else redirect.scheme_redirect
    return rt.Redirect(
        host=redirect.host_redirect,
        path=redirect.path_redirect,
        prefix_rewrite=redirect.prefix_rewrite,
        scheme=scheme,
        port=redirect.port_redirect,
        status=codes.get(redirect.response_code, 301),
        strip_query=redirect.strip_query,
    )


def route(table: str, route: envoy.Route) -> rt.Route:
    name = f"{table}/{route.name}" if route.name else table
    kind = route.WhichOneof("action")
    action: rt.RouteAction | rt.Redirect | rt.DirectResponse
    if kind == "route":
        action = _action(name, route.route)
    elif kind == "redirect":
        action = _redirect(route.redirect)
    elif kind == "direct_response":
        action = rt.DirectResponse(
            route.direct_response.status, route.direct_response.body.inline_string
        )
    else:
        raise CompileError("route", name, f"unsupported route action {kind}")
    fault = None
    for filter_name, packed in route.typed_per_filter_config.items():
        if filter_name == FAULT:
            fault = _fault(name, packed)
        else:
            raise CompileError("route", name, f"per-filter config for unknown filter {filter_name}")
    return rt.Route(
        name=route.name,
        match=_route_match(name, route.match),
        action=action,
        fault=fault,
        headers_to_add=_headers_to_add(route.request_headers_to_add),
        headers_to_remove=tuple(h.lower() for h in route.request_headers_to_remove),
    )


def route_table(config: envoy.RouteConfiguration) -> rt.RouteTable:
    hosts = []
    for host in config.virtual_hosts:
        if not host.domains:
            raise CompileError("route configuration", config.name, f"{host.name}: no domains")
        hosts.append(
            rt.VirtualHost(
                name=host.name,
                domains=tuple(host.domains),
                routes=tuple(route(f"{config.name}/{host.name}", r) for r in host.routes),
                headers_to_add=_headers_to_add(host.request_headers_to_add),
            )
        )
    return rt.RouteTable.build(
        config.name, tuple(hosts), _headers_to_add(config.request_headers_to_add)
    )


# Listeners (LDS).


def _http_manager(name: str, manager: envoy.HttpConnectionManager) -> rt.HttpManager:
    fault_filter = False
    for http_filter in manager.http_filters:
        if http_filter.name == FAULT:
            fault_filter = True
        elif http_filter.name != ROUTER and not http_filter.is_optional:
            raise CompileError("listener", name, f"unsupported HTTP filter {http_filter.name}")
    kind = manager.WhichOneof("route_specifier")
    rds = routes = None
    if kind == "rds":
        rds = manager.rds.route_config_name
    elif kind == "route_config":
        routes = route_table(manager.route_config)
    else:
        raise CompileError("listener", name, f"unsupported route specifier {kind}")
    return rt.HttpManager(
        stat_prefix=manager.stat_prefix or name,
        rds=rds,
        routes=routes,
        generate_request_id=not manager.HasField("generate_request_id")
        or manager.generate_request_id.value,
        use_remote_address=manager.use_remote_address.value,
        fault_filter=fault_filter,
        tracing=_tracing(name, manager) if manager.HasField("tracing") else None,
    )


def _tracing(name: str, manager: envoy.HttpConnectionManager) -> TracingConfig:
    """HCM `tracing` with the Zipkin provider (the only one: spans go out as Zipkin v2 JSON)."""
    tracing = manager.tracing
    ppm = 1_000_000
    if tracing.HasField("random_sampling"):
        percent = tracing.random_sampling.value
        if not 0 <= percent <= 100:
            raise CompileError("listener", name, f"tracing random_sampling {percent} not in 0-100")
        ppm = round(percent * 10_000)
    provider = tracing.provider
    if provider.typed_config.type_url != _ZIPKIN_TYPE:
        raise CompileError("listener", name, f"unsupported tracer {provider.name or '(none)'}")
    zipkin = envoy.ZipkinConfig.decode(provider.typed_config.value)
    if zipkin.collector_endpoint_version != envoy.CollectorEndpointVersion.HTTP_JSON:
        raise CompileError("listener", name, "zipkin collector_endpoint_version must be HTTP_JSON")
    if not zipkin.collector_cluster:
        raise CompileError("listener", name, "zipkin collector_cluster is empty")
    return TracingConfig(
        sampling_ppm=ppm,
        collector_cluster=zipkin.collector_cluster,
        collector_endpoint=zipkin.collector_endpoint or "/api/v2/spans",
        trace_id_128bit=zipkin.trace_id_128bit,
        shared_span_context=not zipkin.HasField("shared_span_context")
        or zipkin.shared_span_context.value,
    )


def _tcp_proxy(name: str, chain: envoy.FilterChain, packed: envoy.Any) -> rt.TcpProxy:
    """A tcp_proxy, with the stats sniffer its chain asks for: a mongo_proxy filter before it,
    or the chain metadata `istio.protocol: REDIS`."""
    tcp = envoy.TcpProxy.decode(packed.value)
    if tcp.WhichOneof("cluster_specifier") != "cluster":
        raise CompileError("listener", name, "tcp_proxy needs a single cluster")
    idle = seconds(tcp.idle_timeout) if tcp.HasField("idle_timeout") else None
    if idle is not None and idle < 0:
        raise CompileError("listener", name, "tcp_proxy idle_timeout is negative")
    sniffer = None
    sniffer_prefix = ""
    commands: frozenset[str] = frozenset()
    before = chain.filters[:-1]
    if len(before) > 1:
        raise CompileError("listener", name, "at most one network filter before tcp_proxy")
    if before:
        mongo_filter = before[0]
        if mongo_filter.typed_config.type_url != _MONGO_TYPE:
            raise CompileError(
                "listener", name, f"unsupported network filter {mongo_filter.name} before tcp_proxy"
            )
        mongo = envoy.MongoProxy.decode(mongo_filter.typed_config.value)
        if mongo.HasField("delay") or mongo.access_log:
            raise CompileError("listener", name, "mongo_proxy delay and access_log are unsupported")
        if not mongo.stat_prefix:
            raise CompileError("listener", name, "mongo_proxy needs a stat_prefix")
        sniffer = rt.Sniffer.MONGO
        sniffer_prefix = mongo.stat_prefix
        commands = frozenset(mongo.commands)
    protocol = chain.metadata.filter_metadata.get(ISTIO_METADATA)
    if protocol is not None and "protocol" in protocol.fields:
        value = protocol.fields["protocol"].string_value.upper()
        if value == "REDIS" and sniffer is None:
            sniffer = rt.Sniffer.REDIS
            sniffer_prefix = tcp.stat_prefix or name
    return rt.TcpProxy(
        tcp.stat_prefix or name,
        tcp.cluster,
        idle_timeout=rt.DEFAULT_TCP_IDLE_TIMEOUT if idle is None else idle,
        sniffer=sniffer,
        sniffer_prefix=sniffer_prefix,
        commands=commands,
    )


def _chain(name: str, chain: envoy.FilterChain) -> rt.HttpManager | rt.TcpProxy | None:
    if not chain.filters:
        raise CompileError("listener", name, "a filter chain without network filters")
    network_filter = chain.filters[-1]
    packed = network_filter.typed_config
    if packed.type_url == _TCP_TYPE:
        return _tcp_proxy(name, chain, packed)
    if len(chain.filters) != 1:
        raise CompileError(
            "listener", name, f"expected one network filter, got {len(chain.filters)}"
        )
    if packed.type_url == _HCM_TYPE:
        manager = envoy.HttpConnectionManager.decode(packed.value)
        return _http_manager(name, manager)
    raise CompileError("listener", name, f"unsupported network filter {network_filter.name}")


def listener(resource: envoy.Listener) -> rt.Listener:
    name = resource.name
    if not resource.address.HasField("socket_address"):
        raise CompileError("listener", name, "only socket addresses are supported")
    address = resource.address.socket_address
    for listener_filter in resource.listener_filters:
        if listener_filter.name not in (ORIGINAL_DST_FILTER, TLS_INSPECTOR):
            raise CompileError(
                "listener", name, f"unsupported listener filter {listener_filter.name}"
            )
    # The chains SNI picks are set aside; the rest are picked by transport as ever.
    sni_chains = [c for c in resource.filter_chains if c.filter_chain_match.server_names]
    tls_chain, plain_chain = _chains_by_transport(
        name,
        [c for c in resource.filter_chains if not c.filter_chain_match.server_names],
        resource.default_filter_chain if resource.HasField("default_filter_chain") else None,
    )
    tls: rt.DownstreamTls | None = None
    if sni_chains:
        tls = _sni_tls(name, sni_chains, tls_chain, permissive=plain_chain is not None)
        tls_chain = tls_chain or sni_chains[0]
    elif tls_chain is not None:
        tls = _downstream_tls(name, tls_chain.transport_socket, permissive=plain_chain is not None)
    if tls_chain is not None:
        if plain_chain is not None and list(plain_chain.filters) != list(tls_chain.filters):
            raise CompileError(
                "listener",
                name,
                "the TLS and plaintext filter chains must carry the same network filters",
            )
        chosen: envoy.FilterChain | None = tls_chain
    else:
        chosen = plain_chain
        tls = _metadata_tls(name, resource.metadata)
    if tls is not None and resource.use_original_dst.value:
        raise CompileError("listener", name, "TLS on a use_original_dst listener")
    return rt.Listener(
        name=name,
        host=address.address,
        port=address.port_value,
        bind=not resource.HasField("bind_to_port") or resource.bind_to_port.value,
        use_original_dst=resource.use_original_dst.value,
        chain=_chain(name, chosen) if chosen is not None else None,
        inbound=resource.traffic_direction == envoy.TrafficDirection.INBOUND,
        tls=tls,
        mixer=_metadata_mixer(name, resource.metadata),
        forward_attributes=_metadata_forward_attributes(resource.metadata),
    )


def _metadata_forward_attributes(metadata: envoy.Metadata) -> bool:
    istio = metadata.filter_metadata.get(ISTIO_METADATA)
    if istio is None or "mixer_forward_attributes" not in istio.fields:
        return False
    return bool(istio.fields["mixer_forward_attributes"].bool_value)


def _metadata_mixer(name: str, metadata: envoy.Metadata) -> rt.MixerFilter | None:
    """Pilot's inbound listener metadata istio.mixer: {address, disable_policy_checks,
    attributes}; None when there is no Mixer (no address)."""
    istio = metadata.filter_metadata.get(ISTIO_METADATA)
    if istio is None or "mixer" not in istio.fields:
        return None
    mixer = to_python(istio.fields["mixer"].struct_value)
    address = str(mixer.get("address") or "")
    if not address:
        return None
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise CompileError("listener", name, f"mixer address {address!r} is not host:port")
    attributes: dict[str, Any] = {}
    for key, value in (mixer.get("attributes") or {}).items():
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # Struct numbers are doubles; ports are ints
        if isinstance(value, dict):
            value = {str(k): str(v) for k, v in value.items()}
        if value in ("", None, {}):
            continue
        if str(key).endswith(".ip") and isinstance(value, str):
            try:  # Mixer's IP_ADDRESS attributes travel as the address's bytes
                value = ipaddress.ip_address(value).packed
            except ValueError:
                raise CompileError(
                    "listener", name, f"mixer attribute {key}: {value!r} is not an IP address"
                ) from None
        attributes[str(key)] = value
    return rt.MixerFilter(
        address=address,
        check=not mixer.get("disable_policy_checks", False),
        attributes=attributes,
        quotas=tuple(
            rule
            for position, spec in enumerate(mixer.get("quota_specs") or ())
            for rule in _quota_spec(name, f"mixer.quota_specs[{position}]", spec)
        ),
    )


def _quota_spec(listener: str, where: str, spec: Any) -> list[rt.QuotaRule]:
    """A QuotaSpec in its JSON form (Pilot's metadata) as rules; CompileError names the field."""

    def fail(field: str, problem: str) -> CompileError:
        return CompileError("listener", listener, f"{where}{field}: {problem}")

    if not isinstance(spec, dict):
        raise fail("", "not a QuotaSpec object")
    rules = []
    for index, rule in enumerate(spec.get("rules") or ()):
        at = f".rules[{index}]"
        alternatives = []
        for position, match in enumerate(rule.get("match") or ()):
            clauses = []
            for attribute, condition in ((match or {}).get("clause") or {}).items():
                field = f"{at}.match[{position}].clause.{attribute}"
                kinds = [k for k in ("exact", "prefix", "regex") if k in (condition or {})]
                if len(kinds) != 1 or not isinstance(condition[kinds[0]], str):
                    raise fail(field, "needs one string of exact, prefix or regex")
                value = condition[kinds[0]]
                if kinds[0] == "regex":
                    try:
                        clauses.append(rt.AttributeMatch(attribute, regex=re.compile(value)))
                    except re.error as error:
                        raise fail(field, f"bad regex {value!r}: {error}") from None
                else:
                    clauses.append(rt.AttributeMatch(attribute, **{kinds[0]: value}))
            alternatives.append(tuple(clauses))
        quotas = []
        for position, quota in enumerate(rule.get("quotas") or ()):
            field = f"{at}.quotas[{position}]"
            name, charge = (quota or {}).get("quota"), (quota or {}).get("charge", 0)
            try:
                amount = int(charge)  # int64 is a JSON string in a proto's JSON form
            except (TypeError, ValueError):
                amount = 0
            if not isinstance(name, str) or not name or amount <= 0:
                raise fail(field, "needs a quota name and a positive charge")
            quotas.append((name, amount))
        rules.append(rt.QuotaRule(tuple(alternatives), tuple(quotas)))
    return rules


def _chains_by_transport(
    name: str, chains: list[envoy.FilterChain], default_chain: envoy.FilterChain | None
) -> tuple[envoy.FilterChain | None, envoy.FilterChain | None]:
    """The chain for TLS connections and the one for plaintext, as Envoy picks them by
    filter_chain_match.transport_protocol ("tls" from the tls_inspector, else "raw_buffer"):
    a chain matching the transport exactly first, then the one without a match (which takes
    every connection), then default_filter_chain. A chain terminates TLS when it has a
    transport socket."""
    exact: dict[str, envoy.FilterChain] = {}
    catch_all = None
    for chain in chains:
        match = chain.filter_chain_match
        if chain.HasField("filter_chain_match") and set(match.present()) - {"transport_protocol"}:
            raise CompileError(
                "listener", name, "filter_chain_match is supported on transport_protocol only"
            )
        transport = match.transport_protocol
        terminates = chain.HasField("transport_socket")
        if transport == "tls" and not terminates:
            raise CompileError(
                "listener", name, "a tls filter chain without a transport socket (passthrough)"
            )
        if transport == "raw_buffer" and terminates:
            raise CompileError("listener", name, "a raw_buffer filter chain with a TLS socket")
        if transport not in ("", "tls", "raw_buffer"):
            raise CompileError("listener", name, f"unsupported transport_protocol {transport!r}")
        if not transport:
            if catch_all is not None:
                raise CompileError("listener", name, "more than one filter chain without a match")
            catch_all = chain
        elif transport in exact:
            raise CompileError("listener", name, f"more than one {transport} filter chain")
        else:
            exact[transport] = chain
    if catch_all is None:
        catch_all = default_chain
    tls_chain = exact.get("tls")
    plain_chain = exact.get("raw_buffer")
    if catch_all is not None:
        if catch_all.HasField("transport_socket"):
            tls_chain = tls_chain or catch_all
        else:
            plain_chain = plain_chain or catch_all
    return tls_chain, plain_chain


def _sni_tls(
    name: str,
    sni_chains: list[envoy.FilterChain],
    default_chain: envoy.FilterChain | None,
    *,
    permissive: bool,
) -> rt.DownstreamTls:
    """A listener whose TLS chains Envoy picks by SNI (filter_chain_match.server_names), as
    one DownstreamTls whose certificate the SNI picks. The data path serves one chain per
    listener: the chains must differ in their certificate alone."""
    reference = default_chain or sni_chains[0]
    base = _downstream_tls(name, reference.transport_socket, permissive=permissive)
    seen: set[str] = set()
    certificates = []
    for chain in sni_chains:
        match = chain.filter_chain_match
        criteria = set(match.present()) - {"server_names"}
        if match.transport_protocol == "tls":
            criteria.discard("transport_protocol")
        if criteria:
            raise CompileError(
                "listener",
                name,
                "filter_chain_match with server_names is supported on transport_protocol tls only",
            )
        if not chain.HasField("transport_socket"):
            raise CompileError(
                "listener", name, "a filter chain matching server_names without TLS (passthrough)"
            )
        if list(chain.filters) != list(reference.filters):
            raise CompileError(
                "listener", name, "the filter chains picked by SNI must carry the same filters"
            )
        tls = _downstream_tls(name, chain.transport_socket, permissive=permissive)
        assert tls.files is not None
        if _without_certificate(tls) != _without_certificate(base):
            raise CompileError(
                "listener",
                name,
                "the filter chains picked by SNI must differ in their certificate alone",
            )
        names = []
        for server_name in chain.filter_chain_match.server_names:
            server_name = server_name.lower()
            wildcard = server_name.startswith("*.")
            if not server_name or "*" in (server_name[2:] if wildcard else server_name):
                raise CompileError("listener", name, f"server name {server_name!r}: not a name")
            if server_name in seen:
                raise CompileError(
                    "listener", name, f"server name {server_name!r} in more than one chain"
                )
            seen.add(server_name)
            names.append(server_name)
        certificates.append(rt.SniCertificate(tuple(names), tls.files))
    return dataclasses.replace(base, sni=tuple(certificates), sni_default=default_chain is not None)


def _without_certificate(tls: rt.DownstreamTls) -> rt.DownstreamTls:
    files = tls.files
    assert files is not None
    return dataclasses.replace(tls, files=rt.TlsFiles("", "", files.trusted_ca))


def _metadata_tls(name: str, metadata: envoy.Metadata) -> rt.DownstreamTls | None:
    """Pilot's inbound listener metadata: istio.auth_policy MUTUAL_TLS (the mesh's
    certificates), istio.mtls_permissive for plaintext too."""
    istio = metadata.filter_metadata.get(ISTIO_METADATA)
    if istio is None or "auth_policy" not in istio.fields:
        return None
    policy = istio.fields["auth_policy"].string_value
    if policy == "NONE":
        return None
    if policy != MUTUAL_TLS:
        raise CompileError("listener", name, f"unknown auth_policy {policy!r}")
    permissive = (
        istio.fields["mtls_permissive"].bool_value if "mtls_permissive" in istio.fields else False
    )
    return rt.DownstreamTls(permissive=permissive)


def _filename(kind: str, name: str, source: envoy.DataSource, what: str) -> str:
    if source.WhichOneof("specifier") != "filename" or not source.filename:
        raise CompileError(kind, name, f"{what} must name a file (inline and SDS are unsupported)")
    return str(source.filename)


def _san_matcher(
    kind: str, name: str, san_type: str, matcher: envoy.StringMatcher
) -> rt.SanMatcher:
    pattern = matcher.WhichOneof("match_pattern")
    ignore = matcher.ignore_case
    if pattern == "exact":
        return rt.SanMatcher(san_type, rt.MatchKind.EXACT, matcher.exact, None, ignore)
    if pattern == "prefix":
        return rt.SanMatcher(san_type, rt.MatchKind.PREFIX, matcher.prefix, None, ignore)
    if pattern == "suffix":
        return rt.SanMatcher(san_type, rt.MatchKind.SUFFIX, matcher.suffix, None, ignore)
    if pattern == "contains":
        return rt.SanMatcher(san_type, rt.MatchKind.CONTAINS, matcher.contains, None, ignore)
    if pattern == "safe_regex":
        compiled = _regex(kind, name, matcher.safe_regex.regex)
        return rt.SanMatcher(san_type, rt.MatchKind.REGEX, "", compiled)
    raise CompileError(kind, name, f"unsupported subject alt name match {pattern}")


def _common_tls(
    kind: str, name: str, common: envoy.CommonTlsContext
) -> tuple[str, str, str, tuple[rt.SanMatcher, ...], tuple[str, str]]:
    """cert chain, key and trusted CA files, SAN matchers, (min, max) TLS versions."""
    if (
        common.tls_certificate_sds_secret_configs
        or common.HasField("tls_certificate_provider_instance")
        or common.WhichOneof("validation_context_type") not in (None, "validation_context")
    ):
        raise CompileError(
            kind, name, "TLS secrets must be files (SDS and providers are unsupported)"
        )
    if len(common.tls_certificates) > 1:
        raise CompileError(kind, name, "more than one TLS certificate")
    cert_chain = key = ""
    for certificate in common.tls_certificates:
        cert_chain = _filename(kind, name, certificate.certificate_chain, "certificate_chain")
        key = _filename(kind, name, certificate.private_key, "private_key")
    validation = common.validation_context
    trusted_ca = ""
    if validation.HasField("trusted_ca"):
        trusted_ca = _filename(kind, name, validation.trusted_ca, "trusted_ca")
    sans = []
    for typed in validation.match_typed_subject_alt_names:
        if typed.san_type not in _SAN_TYPES:
            raise CompileError(kind, name, f"unsupported subject alt name type {typed.san_type}")
        sans.append(_san_matcher(kind, name, _SAN_TYPES[typed.san_type], typed.matcher))
    sans += [_san_matcher(kind, name, "", m) for m in validation.match_subject_alt_names]
    params = common.tls_params
    versions = []
    for version in (params.tls_minimum_protocol_version, params.tls_maximum_protocol_version):
        if version not in _TLS_VERSIONS:
            raise CompileError(kind, name, "TLS versions below 1.2 are refused")
        versions.append(_TLS_VERSIONS[version])
    return cert_chain, key, trusted_ca, tuple(sans), (versions[0], versions[1])


def _downstream_tls(
    name: str, socket: envoy.TransportSocket, *, permissive: bool
) -> rt.DownstreamTls:
    if socket.typed_config.type_url != _DOWNSTREAM_TLS_TYPE:
        raise CompileError("listener", name, f"unsupported transport socket {socket.name}")
    context = envoy.DownstreamTlsContext.decode(socket.typed_config.value)
    cert_chain, key, trusted_ca, sans, (low, high) = _common_tls(
        "listener", name, context.common_tls_context
    )
    if not cert_chain:
        raise CompileError("listener", name, "a DownstreamTlsContext needs a TLS certificate")
    require = context.require_client_certificate.value
    if require and not trusted_ca:
        raise CompileError(
            "listener", name, "require_client_certificate needs validation_context.trusted_ca"
        )
    return rt.DownstreamTls(
        files=rt.TlsFiles(cert_chain, key, trusted_ca),
        require_client_certificate=require,
        permissive=permissive,
        alpn=tuple(context.common_tls_context.alpn_protocols),
        subject_alt_names=sans,
        min_version=low,
        max_version=high,
    )


# Clusters (CDS) and endpoints (EDS).


def load_assignment(assignment: envoy.ClusterLoadAssignment) -> tuple[rt.Endpoint, ...]:
    endpoints = []
    health = envoy.HealthStatus
    unusable = (health.UNHEALTHY, health.DRAINING, health.TIMEOUT)
    for locality in assignment.endpoints:
        for lb_endpoint in locality.lb_endpoints:
            if lb_endpoint.health_status in unusable:
                continue
            address = lb_endpoint.endpoint.address
            if not address.HasField("socket_address"):
                raise CompileError(
                    "endpoints", assignment.cluster_name, "only socket addresses are supported"
                )
            socket_address = address.socket_address
            weight = lb_endpoint.load_balancing_weight.value or 1
            endpoints.append(rt.Endpoint(socket_address.address, socket_address.port_value, weight))
    return tuple(endpoints)


def _breakers(cluster: envoy.Cluster) -> rt.CircuitBreakers:
    defaults = rt.CircuitBreakers()
    for thresholds in cluster.circuit_breakers.thresholds:
        if thresholds.priority != envoy.RoutingPriority.DEFAULT:
            continue

        def value(field: str, default: int, thresholds: object = thresholds) -> int:
            wrapper = getattr(thresholds, field)
            return int(wrapper.value) if thresholds.HasField(field) else default  # type: ignore[attr-defined]

        return rt.CircuitBreakers(
            max_connections=value("max_connections", defaults.max_connections),
            max_pending_requests=value("max_pending_requests", defaults.max_pending_requests),
            max_requests=value("max_requests", defaults.max_requests),
            max_retries=value("max_retries", defaults.max_retries),
        )
    return defaults


def _outlier(cluster: envoy.Cluster) -> rt.OutlierDetection | None:
    if not cluster.HasField("outlier_detection"):
        return None
    outlier = cluster.outlier_detection
    defaults = rt.OutlierDetection()
    return rt.OutlierDetection(
        consecutive_5xx=outlier.consecutive_5xx.value
        if outlier.HasField("consecutive_5xx")
        else defaults.consecutive_5xx,
        interval=seconds(outlier.interval) if outlier.HasField("interval") else defaults.interval,
        base_ejection_time=seconds(outlier.base_ejection_time)
        if outlier.HasField("base_ejection_time")
        else defaults.base_ejection_time,
        max_ejection_percent=outlier.max_ejection_percent.value
        if outlier.HasField("max_ejection_percent")
        else defaults.max_ejection_percent,
    )


def cluster(resource: envoy.Cluster) -> rt.Cluster:
    name = resource.name
    kind = resource.WhichOneof("cluster_discovery_type")
    if kind != "type" or resource.type not in _CLUSTER_TYPES:
        raise CompileError("cluster", name, f"unsupported cluster type {kind}")
    cluster_type = _CLUSTER_TYPES[resource.type]
    if resource.lb_policy not in _LB:
        raise CompileError(
            "cluster",
            name,
            f"unsupported lb_policy {envoy.LbPolicy.NAMES.get(resource.lb_policy, '?')}",
        )
    lb = _LB[resource.lb_policy]
    if (lb is rt.LbPolicy.CLUSTER_PROVIDED) != (cluster_type is rt.ClusterType.ORIGINAL_DST):
        if cluster_type is rt.ClusterType.ORIGINAL_DST:
            lb = rt.LbPolicy.CLUSTER_PROVIDED
        else:
            raise CompileError("cluster", name, "CLUSTER_PROVIDED needs an ORIGINAL_DST cluster")
    http2 = False
    max_per_connection = resource.max_requests_per_connection.value
    packed = resource.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
    if packed is not None:
        options = _unpack("cluster", name, packed, envoy.HttpProtocolOptions)
        http2 = options.explicit_http_config.HasField("http2_protocol_options")
        common = options.common_http_protocol_options
        max_per_connection = common.max_requests_per_connection.value or max_per_connection
    tls_sni = None
    mtls = None
    if resource.HasField("transport_socket"):
        socket = resource.transport_socket
        if socket.name != TLS_TRANSPORT and socket.typed_config.type_url != _UPSTREAM_TLS_TYPE:
            raise CompileError("cluster", name, f"unsupported transport socket {socket.name}")
        tls = _unpack("cluster", name, socket.typed_config, envoy.UpstreamTlsContext)
        if tls.common_tls_context.tls_certificates:
            mtls = _upstream_tls(name, tls)
        else:
            tls_sni = tls.sni
    else:
        mtls = _metadata_mtls(name, resource.metadata)
    endpoints: tuple[rt.Endpoint, ...] = ()
    if cluster_type in (
        rt.ClusterType.STATIC,
        rt.ClusterType.STRICT_DNS,
        rt.ClusterType.LOGICAL_DNS,
    ):
        endpoints = load_assignment(resource.load_assignment)
        if cluster_type is rt.ClusterType.LOGICAL_DNS and len(endpoints) > 1:
            raise CompileError("cluster", name, "LOGICAL_DNS takes exactly one endpoint")
    return rt.Cluster(
        name=name,
        type=cluster_type,
        lb=lb,
        connect_timeout=seconds(resource.connect_timeout)
        if resource.HasField("connect_timeout")
        else 5.0,
        eds_name=resource.eds_cluster_config.service_name or name,
        endpoints=endpoints,
        breakers=_breakers(resource),
        outlier=_outlier(resource),
        max_requests_per_connection=max_per_connection,
        http2=http2,
        tls_sni=tls_sni,
        mtls=mtls,
    )


def _upstream_tls(name: str, context: envoy.UpstreamTlsContext) -> rt.UpstreamTls:
    """An UpstreamTlsContext with a client certificate: mutual TLS, the server verified."""
    cert_chain, key, trusted_ca, sans, (low, high) = _common_tls(
        "cluster", name, context.common_tls_context
    )
    if not trusted_ca:
        raise CompileError(
            "cluster", name, "mutual TLS needs validation_context.trusted_ca to verify the server"
        )
    return rt.UpstreamTls(
        files=rt.TlsFiles(cert_chain, key, trusted_ca),
        sni=context.sni,
        alpn=tuple(context.common_tls_context.alpn_protocols),
        subject_alt_names=sans,
        min_version=low,
        max_version=high,
    )


def _metadata_mtls(name: str, metadata: envoy.Metadata) -> rt.UpstreamTls | None:
    """Pilot's cluster metadata: istio.mtls true (the mesh's certificates), and the SPIFFE ids
    the server may have in istio.subject_alt_names (exact URIs; absent: any in the trust
    domain)."""
    istio = metadata.filter_metadata.get(ISTIO_METADATA)
    if istio is None or "mtls" not in istio.fields or not istio.fields["mtls"].bool_value:
        return None
    names = istio.fields.get("subject_alt_names")
    matchers: list[rt.SanMatcher] = []
    if names is not None:
        if names.WhichOneof("kind") != "list_value":
            raise CompileError("cluster", name, "metadata istio.subject_alt_names must be a list")
        for value in names.list_value.values:
            if value.WhichOneof("kind") != "string_value":
                raise CompileError(
                    "cluster", name, "metadata istio.subject_alt_names must hold strings"
                )
            matchers.append(rt.SanMatcher("URI", rt.MatchKind.EXACT, value.string_value))
    return rt.UpstreamTls(subject_alt_names=tuple(matchers))
