"""Mixer's config as a dispatch plan: pure, built once per config change.

Theory of operation. `build_plan` reads every Mixer object of the store (rules, handlers of
each adapter kind, instances of each template kind, attribute manifests, QuotaSpecs and their
bindings) and produces a `Plan`, or the list of everything wrong with them. The manifest is
the standard vocabulary plus every attributemanifest plus what attribute producers declare;
each rule's match and each instance's fields are compiled against it; each action's handler
and instance references are resolved (`name.kind` in the rule's namespace, or
`name.kind.namespace`) and checked (the adapter handles the instance's template). Rules are
grouped by namespace and split into TCP rules (a top-level `context.protocol == "tcp"`
conjunct) and the others, as 0.2 did, and each rule's actions are split by variety, so a
request only walks what can apply to it. Nothing here runs per request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from istio.api.mixer.v1.config import cfg_pb2
from istio.api.mixer.v1.config.client import quota_pb2
from istio.config import Config, Problem
from istio.config.convert import message_to_value
from istio.expr import (
    STANDARD_VOCABULARY,
    Expression,
    ExpressionError,
    ValueType,
    compile_expression,
    parse,
)
from istio.expr.syntax import Attribute, Binary, Literal, Node
from istio.mixersdk import TEMPLATES, AdapterInfo, InstanceBuilder, Variety, compile_instance
from istio.mixersdk.params import parse_params

DEFAULT_CONFIG_NAMESPACE = "istio-system"
RULE_KIND = "rule"
MANIFEST_KIND = "attributemanifest"
QUOTA_SPEC_KIND = "QuotaSpec"
QUOTA_BINDING_KIND = "QuotaSpecBinding"


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """A configured handler: `key` is name.kind.namespace; `fingerprint` is the same for two
    specs exactly when a handler built for one serves the other (so it is kept on reload)."""

    key: str
    adapter: AdapterInfo
    params: Mapping[str, Any]
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Instances of one template to hand to one handler."""

    handler: str
    template: str
    instances: tuple[InstanceBuilder, ...]


@dataclass(frozen=True, slots=True)
class RuleSpec:
    key: str
    namespace: str
    match: Expression | None  # None: always
    tcp: bool
    check: tuple[Dispatch, ...]
    report: tuple[Dispatch, ...]
    quota: tuple[Dispatch, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a request needs, by namespace: (HTTP rules, TCP rules)."""

    default_namespace: str
    manifest: Mapping[str, ValueType]
    handlers: Mapping[str, HandlerSpec]
    rules: Mapping[str, tuple[tuple[RuleSpec, ...], tuple[RuleSpec, ...]]]
    producers: Mapping[str, tuple[str, ...]]  # attribute -> handler keys that produce it
    quota_specs: tuple[Config, ...] = ()
    quota_bindings: tuple[Config, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)


def object_name(config: Config) -> str:
    """name.kind.namespace: how rules name handlers and instances."""
    return f"{config.meta.name}.{config.meta.kind}.{config.meta.namespace}"


def _problem(config: Config, message: str, field_path: str = "") -> Problem:
    meta = config.meta
    return Problem(message, field_path, kind=meta.kind, name=f"{meta.namespace}/{meta.name}")


def _resolve(reference: str, namespace: str) -> str:
    parts = reference.split(".")
    if len(parts) == 2:
        parts.append(namespace)
    return ".".join(parts)


def _is_tcp_rule(node: Node) -> bool:
    """True when the match has `context.protocol == "tcp"` as a top-level conjunct."""
    if isinstance(node, Binary) and node.op == "&&":
        return _is_tcp_rule(node.left) or _is_tcp_rule(node.right)
    if isinstance(node, Binary) and node.op == "==":
        sides = (node.left, node.right)
        return any(
            isinstance(s, Attribute) and s.name == "context.protocol" for s in sides
        ) and any(isinstance(s, Literal) and s.value == "tcp" for s in sides)
    return False


def fingerprint(adapter: str, params: Mapping[str, Any]) -> str:
    return adapter + ":" + json.dumps(params, sort_keys=True, default=str)


def build_plan(
    configs: Iterable[Config],
    adapters: Mapping[str, AdapterInfo],
    *,
    default_namespace: str = DEFAULT_CONFIG_NAMESPACE,
) -> tuple[Plan | None, list[Problem]]:
    """The plan for `configs` (any kinds; the Mixer ones are used), or every problem."""
    problems: list[Problem] = []
    by_kind: dict[str, list[Config]] = {}
    for config in sorted(configs, key=lambda c: (c.meta.kind, c.meta.namespace, c.meta.name)):
        by_kind.setdefault(config.meta.kind, []).append(config)

    manifest = _manifest(by_kind.get(MANIFEST_KIND, []), adapters, problems)
    handlers: dict[str, HandlerSpec] = {}
    handler_configs: dict[str, Config] = {}
    producers: dict[str, list[str]] = {}
    instances: dict[str, tuple[Config, InstanceBuilder | None]] = {}
    for kind, configs_of_kind in by_kind.items():
        adapter = adapters.get(kind)
        template = TEMPLATES.get(kind)
        for config in configs_of_kind:
            if adapter is not None:
                spec = _handler(config, adapter, problems)
                if spec is not None:
                    handlers[spec.key] = spec
                    handler_configs[spec.key] = config
                    if config.meta.namespace == default_namespace:
                        for name in adapter.produces:
                            producers.setdefault(name, []).append(spec.key)
            elif template is not None:
                params = message_to_value(config.spec)
                builder, found = compile_instance(object_name(config), template, params, manifest)
                problems.extend(_problem(config, p.message, f"spec.{p.field}") for p in found)
                instances[object_name(config)] = (config, builder)

    rules: dict[str, tuple[list[RuleSpec], list[RuleSpec]]] = {}
    for config in by_kind.get(RULE_KIND, []):
        rule = _rule(config, manifest, handlers, instances, problems)
        if rule is not None:
            http, tcp = rules.setdefault(rule.namespace, ([], []))
            (tcp if rule.tcp else http).append(rule)

    specs = tuple(by_kind.get(QUOTA_SPEC_KIND, []))
    bindings = tuple(by_kind.get(QUOTA_BINDING_KIND, []))
    _check_bindings(specs, bindings, problems)
    if problems:
        return None, problems
    return Plan(
        default_namespace=default_namespace,
        manifest=MappingProxyType(manifest),
        handlers=MappingProxyType(handlers),
        rules=MappingProxyType({ns: (tuple(h), tuple(t)) for ns, (h, t) in rules.items()}),
        producers=MappingProxyType({k: tuple(v) for k, v in producers.items()}),
        quota_specs=specs,
        quota_bindings=bindings,
        counts=MappingProxyType(
            {
                "rules": sum(len(h) + len(t) for h, t in rules.values()),
                "handlers": len(handlers),
                "instances": len(instances),
            }
        ),
    ), []


def _manifest(
    manifests: Sequence[Config], adapters: Mapping[str, AdapterInfo], problems: list[Problem]
) -> dict[str, ValueType]:
    manifest = dict(STANDARD_VOCABULARY)
    origin = dict.fromkeys(manifest, "the standard vocabulary")
    for adapter in adapters.values():
        for name, value_type in adapter.produces.items():
            manifest.setdefault(name, value_type)
            origin.setdefault(name, f"adapter {adapter.name}")
    for config in manifests:
        spec = config.spec
        assert isinstance(spec, cfg_pb2.AttributeManifest)
        for name, info in sorted(spec.attributes.items()):
            value_type = ValueType(info.value_type)
            known = manifest.get(name)
            if known is not None and known is not value_type:
                problems.append(
                    _problem(
                        config,
                        f"{name} is {known} in {origin[name]}, not {value_type}",
                        f"attributes.{name}.valueType",
                    )
                )
                continue
            manifest[name] = value_type
            origin.setdefault(name, f"attributemanifest {config.meta.namespace}/{config.meta.name}")
    return manifest


def _handler(config: Config, adapter: AdapterInfo, problems: list[Problem]) -> HandlerSpec | None:
    raw = message_to_value(config.spec)
    params, found = parse_params(adapter.params, raw)
    if found:
        problems.extend(_problem(config, p.message, f"spec.{p.field}") for p in found)
        return None
    return HandlerSpec(object_name(config), adapter, params, fingerprint(adapter.name, params))


def _rule(
    config: Config,
    manifest: Mapping[str, ValueType],
    handlers: Mapping[str, HandlerSpec],
    instances: Mapping[str, tuple[Config, InstanceBuilder | None]],
    problems: list[Problem],
) -> RuleSpec | None:
    rule = config.spec
    assert isinstance(rule, cfg_pb2.Rule)
    namespace = config.meta.namespace
    before = len(problems)
    match: Expression | None = None
    tcp = False
    text = rule.match.strip()
    if text and text != "true":
        try:
            match = compile_expression(text, manifest, ValueType.BOOL)
            tcp = _is_tcp_rule(parse(text))
        except ExpressionError as error:
            problems.append(_problem(config, f"{text!r}: {error}", "spec.match"))
    dispatches: dict[Variety, list[Dispatch]] = {v: [] for v in Variety}
    for index, action in enumerate(rule.actions):
        path = f"spec.actions[{index}]"
        handler_key = _resolve(action.handler, namespace)
        handler = handlers.get(handler_key)
        if handler is None:
            problems.append(_problem(config, f"no handler {handler_key}", f"{path}.handler"))
            continue
        by_template: dict[str, list[InstanceBuilder]] = {}
        for position, reference in enumerate(action.instances):
            instance_key = _resolve(reference, namespace)
            found = instances.get(instance_key)
            where = f"{path}.instances[{position}]"
            if found is None:
                problems.append(_problem(config, f"no instance {instance_key}", where))
                continue
            instance_config, builder = found
            template = instance_config.meta.kind
            if template not in handler.adapter.templates:
                supported = ", ".join(sorted(handler.adapter.templates)) or "none"
                problems.append(
                    _problem(
                        config,
                        f"handler {handler_key} ({handler.adapter.name}) does not handle "
                        f"{template} instances (it handles: {supported})",
                        where,
                    )
                )
                continue
            if builder is not None:
                by_template.setdefault(template, []).append(builder)
        for template, builders in by_template.items():
            variety = TEMPLATES[template].variety
            dispatches[variety].append(Dispatch(handler_key, template, tuple(builders)))
    if len(problems) > before:
        return None
    return RuleSpec(
        key=object_name(config),
        namespace=namespace,
        match=match,
        tcp=tcp,
        check=tuple(dispatches[Variety.CHECK]),
        report=tuple(dispatches[Variety.REPORT]),
        quota=tuple(dispatches[Variety.QUOTA]),
    )


def _check_bindings(
    specs: Sequence[Config], bindings: Sequence[Config], problems: list[Problem]
) -> None:
    known = {(c.meta.namespace, c.meta.name) for c in specs}
    for config in bindings:
        binding = config.spec
        assert isinstance(binding, quota_pb2.QuotaSpecBinding)
        for index, reference in enumerate(binding.quota_specs):
            namespace = reference.namespace or config.meta.namespace
            if (namespace, reference.name) not in known:
                problems.append(
                    _problem(
                        config,
                        f"no QuotaSpec {namespace}/{reference.name}",
                        f"spec.quotaSpecs[{index}]",
                    )
                )
