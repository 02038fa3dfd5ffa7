"""The Envoy v3 messages and fields the proxy decodes (istio.proxy.compile, xds and agent).

tools/protogen turns this into services/proxy/src/istio/proxy/envoy.py: a schema table for
istio.proxy.wire's decoder, so the sidecar decodes xDS without loading protobuf and Envoy's
descriptor tree (about 6 MB of its idle RSS). Field numbers, types and oneofs come from the
descriptors of the xds-protos package, never from here, so they cannot be mistyped.

Each entry: full message name -> (class name in envoy.py, field names). A field name ending in
`?` is decoded for presence only (HasField, truthiness of a repeated field): compile refuses
what it cannot honour without reading it. Every member of a oneof with a listed member is
added (as presence-only when not listed) so WhichOneof names what Pilot sent. `*?` adds every
other field as presence-only. Fields not listed are skipped like unknown fields.
"""

from __future__ import annotations

MESSAGES: dict[str, tuple[str, str]] = {
    # protobuf's well-known types
    "google.protobuf.Any": ("Any", "type_url value"),
    "google.protobuf.Duration": ("Duration", "seconds nanos"),
    "google.protobuf.BoolValue": ("BoolValue", "value"),
    "google.protobuf.UInt32Value": ("UInt32Value", "value"),
    "google.protobuf.Struct": ("Struct", "fields"),
    "google.protobuf.Value": (
        "Value",
        "null_value number_value string_value bool_value struct_value list_value",
    ),
    "google.protobuf.ListValue": ("ListValue", "values"),
    # the ADS stream
    "envoy.service.discovery.v3.DiscoveryResponse": (
        "DiscoveryResponse",
        "version_info resources type_url nonce",
    ),
    # core
    "envoy.config.core.v3.Metadata": ("Metadata", "filter_metadata"),
    "envoy.config.core.v3.Address": ("Address", "socket_address"),
    "envoy.config.core.v3.SocketAddress": ("SocketAddress", "address port_value"),
    "envoy.config.core.v3.TransportSocket": ("TransportSocket", "name typed_config"),
    "envoy.config.core.v3.DataSource": ("DataSource", "filename inline_string"),
    "envoy.config.core.v3.HeaderValue": ("HeaderValue", "key value"),
    "envoy.config.core.v3.HeaderValueOption": (
        "HeaderValueOption",
        "header append append_action",
    ),
    "envoy.config.core.v3.RuntimeFractionalPercent": (
        "RuntimeFractionalPercent",
        "default_value",
    ),
    "envoy.config.core.v3.HttpProtocolOptions": (
        "CoreHttpProtocolOptions",
        "max_requests_per_connection",
    ),
    "envoy.type.v3.FractionalPercent": ("FractionalPercent", "numerator denominator"),
    "envoy.type.v3.Percent": ("Percent", "value"),
    "envoy.type.matcher.v3.StringMatcher": (
        "StringMatcher",
        "exact prefix suffix contains safe_regex ignore_case",
    ),
    "envoy.type.matcher.v3.RegexMatcher": ("RegexMatcher", "regex"),
    # clusters (CDS) and endpoints (EDS)
    "envoy.config.cluster.v3.Cluster": (
        "Cluster",
        "name type lb_policy max_requests_per_connection typed_extension_protocol_options"
        " transport_socket metadata load_assignment connect_timeout eds_cluster_config"
        " circuit_breakers outlier_detection",
    ),
    "envoy.config.cluster.v3.Cluster.EdsClusterConfig": ("EdsClusterConfig", "service_name"),
    "envoy.config.cluster.v3.CircuitBreakers": ("CircuitBreakers", "thresholds"),
    "envoy.config.cluster.v3.CircuitBreakers.Thresholds": (
        "Thresholds",
        "priority max_connections max_pending_requests max_requests max_retries",
    ),
    "envoy.config.cluster.v3.OutlierDetection": (
        "OutlierDetection",
        "consecutive_5xx interval base_ejection_time max_ejection_percent",
    ),
    "envoy.config.endpoint.v3.ClusterLoadAssignment": (
        "ClusterLoadAssignment",
        "cluster_name endpoints",
    ),
    "envoy.config.endpoint.v3.LocalityLbEndpoints": ("LocalityLbEndpoints", "lb_endpoints"),
    "envoy.config.endpoint.v3.LbEndpoint": (
        "LbEndpoint",
        "endpoint health_status load_balancing_weight",
    ),
    "envoy.config.endpoint.v3.Endpoint": ("Endpoint", "address"),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": (
        "HttpProtocolOptions",
        "explicit_http_config common_http_protocol_options",
    ),
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig": (
        "ExplicitHttpConfig",
        "http2_protocol_options?",
    ),
    # listeners (LDS)
    "envoy.config.listener.v3.Listener": (
        "Listener",
        "name address listener_filters filter_chains default_filter_chain metadata"
        " use_original_dst bind_to_port traffic_direction",
    ),
    "envoy.config.listener.v3.ListenerFilter": ("ListenerFilter", "name"),
    "envoy.config.listener.v3.FilterChain": (
        "FilterChain",
        "filter_chain_match transport_socket filters metadata",
    ),
    "envoy.config.listener.v3.FilterChainMatch": (
        "FilterChainMatch",
        "transport_protocol server_names *?",
    ),
    "envoy.config.listener.v3.Filter": ("Filter", "name typed_config"),
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager": (
        "HttpConnectionManager",
        "http_filters rds route_config stat_prefix generate_request_id use_remote_address tracing",
    ),
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter": (
        "HttpFilter",
        "name is_optional",
    ),
    "envoy.extensions.filters.network.http_connection_manager.v3.Rds": (
        "Rds",
        "route_config_name",
    ),
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.Tracing": (
        "HcmTracing",
        "random_sampling provider",
    ),
    "envoy.config.trace.v3.Tracing.Http": ("TracingHttp", "name typed_config"),
    "envoy.config.trace.v3.ZipkinConfig": (
        "ZipkinConfig",
        "collector_cluster collector_endpoint collector_endpoint_version trace_id_128bit"
        " shared_span_context",
    ),
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy": (
        "TcpProxy",
        "cluster idle_timeout stat_prefix",
    ),
    "envoy.extensions.filters.network.mongo_proxy.v3.MongoProxy": (
        "MongoProxy",
        "stat_prefix delay? access_log commands",
    ),
    # TLS
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext": (
        "UpstreamTlsContext",
        "common_tls_context sni",
    ),
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext": (
        "DownstreamTlsContext",
        "common_tls_context require_client_certificate",
    ),
    "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext": (
        "CommonTlsContext",
        "tls_certificate_sds_secret_configs? tls_certificate_provider_instance?"
        " validation_context tls_certificates tls_params alpn_protocols",
    ),
    "envoy.extensions.transport_sockets.tls.v3.TlsCertificate": (
        "TlsCertificate",
        "certificate_chain private_key",
    ),
    "envoy.extensions.transport_sockets.tls.v3.TlsParameters": (
        "TlsParameters",
        "tls_minimum_protocol_version tls_maximum_protocol_version",
    ),
    "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext": (
        "CertificateValidationContext",
        "trusted_ca match_typed_subject_alt_names match_subject_alt_names",
    ),
    "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher": (
        "SubjectAltNameMatcher",
        "san_type matcher",
    ),
    # routes (RDS)
    "envoy.config.route.v3.RouteConfiguration": (
        "RouteConfiguration",
        "name virtual_hosts request_headers_to_add",
    ),
    "envoy.config.route.v3.VirtualHost": (
        "VirtualHost",
        "name domains routes request_headers_to_add",
    ),
    "envoy.config.route.v3.Route": (
        "Route",
        "name match route redirect direct_response typed_per_filter_config"
        " request_headers_to_add request_headers_to_remove",
    ),
    "envoy.config.route.v3.RouteMatch": (
        "RouteMatch",
        "prefix path safe_regex case_sensitive headers query_parameters? grpc? tls_context?",
    ),
    "envoy.config.route.v3.HeaderMatcher": (
        "HeaderMatcher",
        "name invert_match string_match exact_match prefix_match suffix_match contains_match"
        " safe_regex_match present_match",
    ),
    "envoy.config.route.v3.RouteAction": (
        "RouteAction",
        "cluster weighted_clusters upgrade_configs timeout retry_policy prefix_rewrite"
        " host_rewrite_literal request_mirror_policies",
    ),
    "envoy.config.route.v3.WeightedCluster": ("WeightedCluster", "clusters"),
    "envoy.config.route.v3.WeightedCluster.ClusterWeight": ("ClusterWeight", "name weight"),
    "envoy.config.route.v3.RouteAction.UpgradeConfig": ("UpgradeConfig", "upgrade_type enabled"),
    "envoy.config.route.v3.RouteAction.RequestMirrorPolicy": (
        "RequestMirrorPolicy",
        "cluster runtime_fraction",
    ),
    "envoy.config.route.v3.RetryPolicy": (
        "RetryPolicy",
        "retry_on retriable_status_codes num_retries per_try_timeout",
    ),
    "envoy.config.route.v3.RedirectAction": (
        "RedirectAction",
        "https_redirect scheme_redirect host_redirect path_redirect prefix_rewrite"
        " port_redirect response_code strip_query",
    ),
    "envoy.config.route.v3.DirectResponseAction": ("DirectResponseAction", "status body"),
    "envoy.extensions.filters.http.fault.v3.HTTPFault": ("HTTPFault", "delay abort"),
    "envoy.extensions.filters.common.fault.v3.FaultDelay": (
        "FaultDelay",
        "fixed_delay header_delay? percentage",
    ),
    "envoy.extensions.filters.http.fault.v3.FaultAbort": (
        "FaultAbort",
        "http_status grpc_status header_abort? percentage",
    ),
}

# Enums compile compares against: full name -> class name in envoy.py.
ENUMS: dict[str, str] = {
    "envoy.config.cluster.v3.Cluster.DiscoveryType": "DiscoveryType",
    "envoy.config.cluster.v3.Cluster.LbPolicy": "LbPolicy",
    "envoy.config.core.v3.HealthStatus": "HealthStatus",
    "envoy.config.core.v3.RoutingPriority": "RoutingPriority",
    "envoy.config.core.v3.TrafficDirection": "TrafficDirection",
    "envoy.config.core.v3.HeaderValueOption.HeaderAppendAction": "HeaderAppendAction",
    "envoy.config.route.v3.RedirectAction.RedirectResponseCode": "RedirectResponseCode",
    "envoy.config.trace.v3.ZipkinConfig.CollectorEndpointVersion": "CollectorEndpointVersion",
    "envoy.extensions.transport_sockets.tls.v3.TlsParameters.TlsProtocol": "TlsProtocol",
    "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher.SanType": "SanType",
    "envoy.type.v3.FractionalPercent.DenominatorType": "DenominatorType",
}

# The modules whose descriptors hold everything above (loaded by the generator only).
MODULES = (
    "google.protobuf.any_pb2",
    "google.protobuf.duration_pb2",
    "google.protobuf.struct_pb2",
    "google.protobuf.wrappers_pb2",
    "envoy.service.discovery.v3.discovery_pb2",
    "envoy.config.cluster.v3.cluster_pb2",
    "envoy.config.endpoint.v3.endpoint_pb2",
    "envoy.config.listener.v3.listener_pb2",
    "envoy.config.route.v3.route_pb2",
    "envoy.config.trace.v3.zipkin_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.mongo_proxy.v3.mongo_proxy_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
)

# The fields istio.proxy.wire.discovery_request writes by number, checked against Envoy's.
ENCODED: dict[str, dict[str, int]] = {
    "envoy.service.discovery.v3.DiscoveryRequest": {
        "version_info": 1,
        "node": 2,
        "resource_names": 3,
        "type_url": 4,
        "response_nonce": 5,
        "error_detail": 6,
    },
    "envoy.config.core.v3.Node": {"id": 1, "cluster": 2, "metadata": 3, "user_agent_name": 6},
    "google.rpc.Status": {"code": 1, "message": 2},
    "google.protobuf.Struct": {"fields": 1},
    "google.protobuf.Value": {
        "null_value": 1,
        "number_value": 2,
        "string_value": 3,
        "bool_value": 4,
        "struct_value": 5,
        "list_value": 6,
    },
    "google.protobuf.ListValue": {"values": 1},
}
