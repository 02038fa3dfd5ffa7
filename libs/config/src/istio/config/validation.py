"""Semantic checks for each kind, as Istio 0.2's pilot/model/validation.go made them.

Each validator takes a spec and returns every problem with the field path inside the spec
(`route[1].weight`); the caller adds file, document and object. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from istio.api.mixer.v1.config import cfg_pb2
from istio.api.mixer.v1.config.client import quota_pb2
from istio.api.networking.v1alpha3 import service_entry_pb2
from istio.api.proxy.v1.config import (
    dest_policy_pb2,
    egress_rule_pb2,
    ingress_rule_pb2,
    route_rule_pb2,
)
from istio.config.convert import message_to_value
from istio.config.errors import Problem
from istio.config.model import Config
from istio.expr import STANDARD_VOCABULARY, ExpressionError, ValueType, parse
from istio.mixersdk import TEMPLATES, compile_instance
from istio.mixersdk.params import Object, parse_params
from istio.mixersdk.templates import check_expression

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_FQDN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MIXER_REFERENCE = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?){1,2}$"
)

EGRESS_PROTOCOLS = ("http", "https", "grpc", "http2")
SERVICE_ENTRY_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "HTTPS", "MONGO", "REDIS", "TCP", "TLS")
ONE_MILLISECOND = 1_000_000


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def validate_object_name(name: str) -> str | None:
    """Why a metadata.name or namespace is invalid, or None (a DNS-1123 subdomain)."""
    if not name:
        return "is required"
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        return (
            f"{name!r} is not a valid name: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def validate_labels(labels: Mapping[str, str], path: str) -> list[Problem]:
    problems = []
    for key, value in labels.items():
        name = key.rsplit("/", 1)[-1]
        prefix = key[: -len(name) - 1] if "/" in key else ""
        if (
            len(name) > 63
            or not _LABEL_NAME.match(name)
            or (prefix and not _DNS1123_SUBDOMAIN.match(prefix))
        ):
            problems.append(Problem(f"invalid label key {key!r}", _join(path, key)))
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(Problem(f"invalid label value {value!r}", _join(path, key)))
    return problems


def _nanos(value: Duration) -> int:
    return value.seconds * 1_000_000_000 + value.nanos


def _check_duration(value: Duration, path: str, minimum: int = ONE_MILLISECOND) -> list[Problem]:
    if _nanos(value) < minimum:
        return [Problem("must be at least 1ms", path)]
    return []


def _check_percent(value: float, path: str) -> list[Problem]:
    if not 0 <= value <= 100:
        return [Problem(f"percent must be in [0, 100], got {value:g}", path)]
    return []


def _check_regex(pattern: str, path: str) -> list[Problem]:
    try:
        re.compile(pattern)
    except re.error as error:
        return [Problem(f"invalid regex {pattern!r}: {error}", path)]
    return []


def validate_istio_service(
    service: route_rule_pb2.IstioService, path: str, *, required: bool = True
) -> list[Problem]:
    """0.2's IstioService: a short name (or a full `service` FQDN) plus optional labels."""
    problems: list[Problem] = []
    if not service.name and not service.service:
        if required:
            problems.append(Problem("a service name is required (name or service)", path))
    elif service.name and not _DNS1123_LABEL.match(service.name):
        problems.append(
            Problem(
                f"{service.name!r} is not a valid service name (a DNS-1123 label such as "
                "'reviews'; use 'namespace' and 'domain' for the rest)",
                _join(path, "name"),
            )
        )
    if service.namespace and not _DNS1123_LABEL.match(service.namespace):
        problems.append(
            Problem(f"{service.namespace!r} is not a valid namespace", _join(path, "namespace"))
        )
    if service.domain and not _DNS1123_SUBDOMAIN.match(service.domain):
        problems.append(Problem(f"{service.domain!r} is not a valid domain", _join(path, "domain")))
    if service.service and not _valid_fqdn(service.service):
        problems.append(
            Problem(f"{service.service!r} is not a valid host name", _join(path, "service"))
        )
    problems.extend(validate_labels(service.labels, _join(path, "labels")))
    return problems


def _valid_fqdn(host: str) -> bool:
    host = host.rstrip(".")
    return bool(host) and len(host) <= 255 and all(_FQDN_LABEL.match(p) for p in host.split("."))


def _check_string_match(match: route_rule_pb2.StringMatch, path: str) -> list[Problem]:
    kind = match.WhichOneof("match_type")
    if kind is None:
        return [Problem("one of exact, prefix or regex is required", path)]
    if kind == "regex":
        return _check_regex(match.regex, _join(path, "regex"))
    return []


def validate_route_rule(spec: Message) -> list[Problem]:
    rule = cast(route_rule_pb2.RouteRule, spec)
    problems = []
    if not rule.HasField("destination"):
        problems.append(Problem("destination is required", "destination"))
    else:
        problems += validate_istio_service(rule.destination, "destination")
    if rule.HasField("match"):
        problems += _check_match(rule.match, "match")

    if rule.HasField("redirect"):
        if rule.route:
            problems.append(Problem("a rule cannot have both route and redirect", "redirect"))
        if rule.HasField("rewrite"):
            problems.append(Problem("a rule cannot have both rewrite and redirect", "redirect"))
        if rule.HasField("http_fault"):
            problems.append(Problem("a rule cannot have both httpFault and redirect", "redirect"))
        if not rule.redirect.uri and not rule.redirect.authority:
            problems.append(Problem("redirect needs uri or authority", "redirect"))
    if rule.HasField("rewrite") and not rule.rewrite.uri and not rule.rewrite.authority:
        problems.append(Problem("rewrite needs uri or authority", "rewrite"))

    total = 0
    for index, weight in enumerate(rule.route):
        path = f"route[{index}]"
        if weight.HasField("destination"):
            problems += validate_istio_service(weight.destination, _join(path, "destination"))
        problems += validate_labels(weight.labels, _join(path, "labels"))
        if not 0 <= weight.weight <= 100:
            problems.append(Problem(f"weight must be in [0, 100], got {weight.weight}", path))
        total += weight.weight
    # A single route without a weight takes all traffic, as in 0.2's Bookinfo rules.
    if rule.route and not (len(rule.route) == 1 and rule.route[0].weight == 0) and total != 100:
        problems.append(Problem(f"route weights must sum to 100, got {total}", "route"))

    if rule.HasField("http_req_timeout"):
        timeout = rule.http_req_timeout
        if timeout.HasField("simple_timeout"):
            problems += _check_duration(
                timeout.simple_timeout.timeout, "httpReqTimeout.simpleTimeout.timeout"
            )
    if rule.HasField("http_req_retries"):
        retries = rule.http_req_retries
        if retries.HasField("simple_retry"):
            simple = retries.simple_retry
            if simple.attempts < 0:
                problems.append(
                    Problem("attempts must not be negative", "httpReqRetries.simpleRetry.attempts")
                )
            if simple.HasField("per_try_timeout"):
                problems += _check_duration(
                    simple.per_try_timeout, "httpReqRetries.simpleRetry.perTryTimeout"
                )
    if rule.HasField("http_fault"):
        problems += _check_http_fault(rule.http_fault, "httpFault")
    if rule.HasField("l4_fault"):
        problems.append(Problem("l4Fault is not supported (as in Istio 0.2)", "l4Fault"))
    if rule.HasField("mirror"):
        problems += validate_istio_service(rule.mirror, "mirror")
    for name in rule.append_headers:
        if not _HEADER_NAME.match(name):
            problems.append(
                Problem(f"header name {name!r} must be lowercase token characters", "appendHeaders")
            )
    return problems


def _check_match(match: route_rule_pb2.MatchCondition, path: str) -> list[Problem]:
    problems = []
    if match.HasField("source"):
        problems += validate_istio_service(match.source, _join(path, "source"), required=False)
    if match.HasField("udp"):
        problems.append(Problem("UDP matching is not supported", _join(path, "udp")))
    if match.HasField("tcp"):
        for field in ("source_subnet", "destination_subnet"):
            for index, subnet in enumerate(getattr(match.tcp, field)):
                try:
                    ipaddress.ip_network(subnet, strict=False)
                except ValueError:
                    problems.append(
                        Problem(f"invalid subnet {subnet!r}", f"{path}.tcp.{field}[{index}]")
                    )
    for name, string_match in match.request.headers.items():
        header_path = f"{path}.request.headers.{name}"
        if name.lower() != name:
            problems.append(Problem(f"header name {name!r} must be lowercase", header_path))
        elif not _HEADER_NAME.match(name):
            problems.append(Problem(f"invalid header name {name!r}", header_path))
        problems += _check_string_match(string_match, header_path)
    return problems


def _check_http_fault(fault: route_rule_pb2.HTTPFaultInjection, path: str) -> list[Problem]:
    problems = []
    if not fault.HasField("delay") and not fault.HasField("abort"):
        problems.append(Problem("needs delay or abort", path))
    if fault.HasField("delay"):
        delay = fault.delay
        problems += _check_percent(delay.percent, f"{path}.delay.percent")
        kind = delay.WhichOneof("http_delay_type")
        if kind == "exponential_delay":
            problems.append(
                Problem("exponentialDelay is not supported", f"{path}.delay.exponentialDelay")
            )
        elif kind is None:
            problems.append(Problem("fixedDelay is required", f"{path}.delay"))
        else:
            problems += _check_duration(delay.fixed_delay, f"{path}.delay.fixedDelay")
    if fault.HasField("abort"):
        abort = fault.abort
        problems += _check_percent(abort.percent, f"{path}.abort.percent")
        error_type = abort.WhichOneof("error_type")
        if error_type in ("grpc_status", "http2_error"):
            problems.append(
                Problem(
                    f"abort with {error_type} is not supported; use httpStatus", f"{path}.abort"
                )
            )
        elif error_type is None:
            problems.append(Problem("httpStatus is required", f"{path}.abort"))
        elif not 200 <= abort.http_status <= 599:
            problems.append(
                Problem(
                    f"httpStatus must be in [200, 599], got {abort.http_status}",
                    f"{path}.abort.httpStatus",
                )
            )
    return problems


def validate_destination_policy(spec: Message) -> list[Problem]:
    policy = cast(dest_policy_pb2.DestinationPolicy, spec)
    problems = []
    if not policy.HasField("destination"):
        problems.append(Problem("destination is required", "destination"))
    else:
        problems += validate_istio_service(policy.destination, "destination")
    if policy.HasField("source"):
        problems += validate_istio_service(policy.source, "source")
    if policy.HasField("circuit_breaker") and policy.circuit_breaker.HasField("simple_cb"):
        cb = policy.circuit_breaker.simple_cb
        path = "circuitBreaker.simpleCb"
        for field in (
            "max_connections",
            "http_max_pending_requests",
            "http_max_requests",
            "http_consecutive_errors",
            "http_max_requests_per_connection",
            "http_max_retries",
        ):
            if getattr(cb, field) < 0:
                name = cb.DESCRIPTOR.fields_by_name[field].json_name
                problems.append(Problem("must not be negative", f"{path}.{name}"))
        if cb.HasField("sleep_window"):
            problems += _check_duration(cb.sleep_window, f"{path}.sleepWindow")
        if cb.HasField("http_detection_interval"):
            problems += _check_duration(cb.http_detection_interval, f"{path}.httpDetectionInterval")
        problems += _check_percent(cb.http_max_ejection_percent, f"{path}.httpMaxEjectionPercent")
    return problems


def validate_egress_host(host: str) -> str | None:
    """Why an EgressRule host is invalid: `*`, `*.foo.com`, `*-bar.foo.com` or a plain FQDN."""
    if host == "*":
        return None
    rest = host[1:] if host.startswith("*") else host
    if "*" in rest:
        return f"{host!r}: a wildcard may only be the first character (e.g. *.foo.com)"
    if host.startswith("*"):
        rest = rest.lstrip(".-")
        if not rest:
            return f"{host!r} is not a valid wildcard host"
    if not _valid_fqdn(rest):
        return f"{host!r} is not a valid host name"
    return None


def validate_egress_rule(spec: Message) -> list[Problem]:
    rule = cast(egress_rule_pb2.EgressRule, spec)
    problems = []
    destination = rule.destination
    if not destination.service:
        problems.append(Problem("destination.service is required", "destination.service"))
    else:
        reason = validate_egress_host(destination.service)
        if reason:
            problems.append(Problem(reason, "destination.service"))
    for field in ("name", "namespace", "domain"):
        if getattr(destination, field):
            problems.append(Problem("only destination.service may be set", f"destination.{field}"))
    if destination.labels:
        problems.append(Problem("only destination.service may be set", "destination.labels"))
    if not rule.ports:
        problems.append(Problem("at least one port is required", "ports"))
    seen: dict[int, int] = {}
    for index, port in enumerate(rule.ports):
        path = f"ports[{index}]"
        if not 1 <= port.port <= 65535:
            problems.append(Problem(f"port must be in [1, 65535], got {port.port}", f"{path}.port"))
        if port.port in seen:
            problems.append(
                Problem(f"port {port.port} repeats ports[{seen[port.port]}]", f"{path}.port")
            )
        seen.setdefault(port.port, index)
        if port.protocol.lower() not in EGRESS_PROTOCOLS:
            problems.append(
                Problem(
                    f"protocol {port.protocol!r} is not one of "
                    f"{', '.join(p.upper() for p in EGRESS_PROTOCOLS)}",
                    f"{path}.protocol",
                )
            )
    if rule.use_egress_proxy:
        problems.append(Problem("useEgressProxy is not supported", "useEgressProxy"))
    return problems


def validate_ingress_rule(spec: Message) -> list[Problem]:
    rule = cast(ingress_rule_pb2.IngressRule, spec)
    problems = []
    if not 0 <= rule.port <= 65535:
        problems.append(Problem(f"port must be in [0, 65535], got {rule.port}", "port"))
    if rule.tls_secret:
        # The ingress proxy reads the secret's files from a directory of this name.
        reason = validate_object_name(rule.tls_secret)
        if reason:
            problems.append(Problem(f"secret {reason}", "tlsSecret"))
    if not rule.HasField("destination"):
        problems.append(Problem("destination is required", "destination"))
    else:
        problems += validate_istio_service(rule.destination, "destination")
    if rule.HasField("match"):
        problems += _check_match(rule.match, "match")
    kind = rule.WhichOneof("destination_servicePort")
    if kind is None:
        problems.append(Problem("destinationPort or destinationPortName is required", ""))
    elif kind == "destination_port" and not 1 <= rule.destination_port <= 65535:
        problems.append(Problem("must be in [1, 65535]", "destinationPort"))
    return problems


def validate_service_entry(spec: Message) -> list[Problem]:
    entry = cast(service_entry_pb2.ServiceEntry, spec)
    problems = []
    if not entry.hosts:
        problems.append(Problem("at least one host is required", "hosts"))
    for index, host in enumerate(entry.hosts):
        reason = validate_egress_host(host)
        if reason:
            problems.append(Problem(reason, f"hosts[{index}]"))
    for index, address in enumerate(entry.addresses):
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            problems.append(Problem(f"invalid address {address!r}", f"addresses[{index}]"))
    if not entry.ports:
        problems.append(Problem("at least one port is required", "ports"))
    names: set[str] = set()
    numbers: set[int] = set()
    for index, port in enumerate(entry.ports):
        path = f"ports[{index}]"
        if not 1 <= port.number <= 65535:
            problems.append(Problem(f"must be in [1, 65535], got {port.number}", f"{path}.number"))
        if port.number in numbers:
            problems.append(Problem(f"port {port.number} is listed twice", f"{path}.number"))
        numbers.add(port.number)
        if port.protocol.upper() not in SERVICE_ENTRY_PROTOCOLS:
            problems.append(
                Problem(
                    f"protocol {port.protocol!r} is not one of "
                    f"{', '.join(SERVICE_ENTRY_PROTOCOLS)}",
                    f"{path}.protocol",
                )
            )
        if not port.name:
            problems.append(Problem("a port name is required", f"{path}.name"))
        elif port.name in names:
            problems.append(Problem(f"port name {port.name!r} is used twice", f"{path}.name"))
        names.add(port.name)
    static = entry.resolution == service_entry_pb2.ServiceEntry.Resolution.STATIC
    if static and not entry.endpoints:
        problems.append(Problem("resolution STATIC needs endpoints", "endpoints"))
    for index, endpoint in enumerate(entry.endpoints):
        path = f"endpoints[{index}]"
        if not endpoint.address:
            problems.append(Problem("address is required", f"{path}.address"))
        elif static:
            try:
                ipaddress.ip_address(endpoint.address)
            except ValueError:
                problems.append(
                    Problem(
                        f"{endpoint.address!r} is not an IP address (resolution STATIC)",
                        f"{path}.address",
                    )
                )
        elif not _valid_fqdn(endpoint.address):
            try:
                ipaddress.ip_address(endpoint.address)
            except ValueError:
                problems.append(
                    Problem(f"{endpoint.address!r} is not a host or IP", f"{path}.address")
                )
        for name, number in endpoint.ports.items():
            if name not in names:
                problems.append(Problem(f"no port named {name!r} in ports", f"{path}.ports.{name}"))
            if not 1 <= number <= 65535:
                problems.append(
                    Problem(f"must be in [1, 65535], got {number}", f"{path}.ports.{name}")
                )
        problems += validate_labels(endpoint.labels, f"{path}.labels")
    return problems


def validate_mixer_rule(spec: Message) -> list[Problem]:
    rule = cast(cfg_pb2.Rule, spec)
    problems = []
    for index, action in enumerate(rule.actions):
        path = f"actions[{index}]"
        if not action.handler:
            problems.append(Problem("handler is required", f"{path}.handler"))
        elif not _MIXER_REFERENCE.match(action.handler):
            problems.append(
                Problem(
                    f"{action.handler!r} is not a handler reference (name.kind[.namespace])",
                    f"{path}.handler",
                )
            )
        if not action.instances:
            problems.append(Problem("at least one instance is required", f"{path}.instances"))
        for position, instance in enumerate(action.instances):
            if not _MIXER_REFERENCE.match(instance):
                problems.append(
                    Problem(
                        f"{instance!r} is not an instance reference (name.kind[.namespace])",
                        f"{path}.instances[{position}]",
                    )
                )
    return problems


def _syntax(text: str, path: str) -> list[Problem]:
    try:
        parse(text)
    except ExpressionError as error:
        return [Problem(f"{text!r}: {error}", path)]
    return []


def validate_mixer_rule_match(spec: Message) -> list[Problem]:
    """The references (validate_mixer_rule), and the match's syntax: its types depend on the
    attribute manifests, checked with them by validate_mixer_expressions and by Mixer."""
    rule = cast(cfg_pb2.Rule, spec)
    problems = validate_mixer_rule(rule)
    if rule.match.strip():
        problems += _syntax(rule.match, "match")
    return problems


def mixer_instance_validator(template: str) -> Callable[[Message], list[Problem]]:
    """The syntax of every expression of an instance of `template`."""
    fields = TEMPLATES[template].fields

    def validate(spec: Message) -> list[Problem]:
        value = message_to_value(spec)
        problems = []
        for field in fields:
            name = _camel(field.name)
            given = value.get(name)
            if isinstance(given, Mapping):
                for key, text in sorted(given.items()):
                    problems += _syntax(str(text), f"{name}.{key}")
            elif isinstance(given, str) and given:
                problems += _syntax(given, name)
        return problems

    return validate


def mixer_handler_validator(params: Object) -> Callable[[Message], list[Problem]]:
    """A built-in adapter's params, typed by its schema (istio.mixersdk.builtin)."""

    def validate(spec: Message) -> list[Problem]:
        _, found = parse_params(params, message_to_value(spec))
        return [Problem(p.message, p.field) for p in found]

    return validate


def validate_mixer_expressions(configs: Iterable[Config]) -> list[Problem]:
    """Rules' matches and instances' fields type-checked against the standard vocabulary plus
    the attribute manifests among `configs`. Mixer checks them again, with the manifests of
    its store, and resolves the rules' references; this is what can be known offline."""
    configs = list(configs)
    manifest = dict(STANDARD_VOCABULARY)
    for config in configs:
        if isinstance(config.spec, cfg_pb2.AttributeManifest):
            for name, info in config.spec.attributes.items():
                manifest.setdefault(name, ValueType(info.value_type))
    problems = []
    for config in configs:
        meta, spec = config.meta, config.spec
        kind, name = meta.kind, f"{meta.namespace}/{meta.name}"
        if isinstance(spec, cfg_pb2.Rule) and spec.match.strip() not in ("", "true"):
            reason = check_expression(spec.match, manifest, ValueType.BOOL)
            if reason:
                problems.append(Problem(reason, "spec.match", kind=kind, name=name))
        template = TEMPLATES.get(meta.kind)
        if (
            template is not None
            and spec.DESCRIPTOR.full_name == f"istio.mixer.template.{template.name}.InstanceParam"
        ):
            _, found = compile_instance(
                f"{meta.name}.{meta.kind}.{meta.namespace}",
                template,
                message_to_value(spec),
                manifest,
            )
            problems += [Problem(p.message, f"spec.{p.field}", kind=kind, name=name) for p in found]
    return problems


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def validate_attribute_manifest(spec: Message) -> list[Problem]:
    manifest = cast(cfg_pb2.AttributeManifest, spec)
    problems = []
    for name, info in manifest.attributes.items():
        # Names as the expression language reads them (0.2 had source.serviceAccount).
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", name):
            problems.append(Problem(f"invalid attribute name {name!r}", f"attributes.{name}"))
        if info.value_type == 0:
            problems.append(Problem("valueType is required", f"attributes.{name}.valueType"))
    return problems


def validate_quota_spec(spec: Message) -> list[Problem]:
    quota_spec = cast(quota_pb2.QuotaSpec, spec)
    problems = []
    for index, rule in enumerate(quota_spec.rules):
        for position, quota in enumerate(rule.quotas):
            path = f"rules[{index}].quotas[{position}]"
            if not quota.quota:
                problems.append(Problem("quota is required", f"{path}.quota"))
            if quota.charge <= 0:
                problems.append(Problem("charge must be positive", f"{path}.charge"))
        for position, match in enumerate(rule.match):
            for name, string_match in match.clause.items():
                clause_path = f"rules[{index}].match[{position}].clause.{name}"
                if string_match.WhichOneof("match_type") == "regex":
                    problems += _check_regex(string_match.regex, clause_path)
    return problems


def validate_quota_spec_binding(spec: Message) -> list[Problem]:
    binding = cast(quota_pb2.QuotaSpecBinding, spec)
    problems = []
    if not binding.services:
        problems.append(Problem("at least one service is required", "services"))
    if not binding.quota_specs:
        problems.append(Problem("at least one quota spec is required", "quotaSpecs"))
    for index, reference in enumerate(binding.quota_specs):
        if not reference.name:
            problems.append(Problem("name is required", f"quotaSpecs[{index}].name"))
    return problems
