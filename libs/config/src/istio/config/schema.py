"""The kinds of config the mesh knows, how users may name them, and how each is checked."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from istio.api.mixer.templates.checknothing import template_pb2 as checknothing
from istio.api.mixer.templates.listentry import template_pb2 as listentry
from istio.api.mixer.templates.logentry import template_pb2 as logentry
from istio.api.mixer.templates.metric import template_pb2 as metric
from istio.api.mixer.templates.quota import template_pb2 as quota
from istio.api.mixer.templates.reportnothing import template_pb2 as reportnothing
from istio.api.mixer.v1.config import cfg_pb2
from istio.api.mixer.v1.config.client import quota_pb2
from istio.api.networking.v1alpha3 import service_entry_pb2
from istio.api.proxy.v1.config import (
    dest_policy_pb2,
    egress_rule_pb2,
    ingress_rule_pb2,
    route_rule_pb2,
)
from istio.config import validation
from istio.config.errors import ConfigError, Problem
from istio.mixersdk.builtin import HANDLER_PARAMS

Validator = Callable[[Message], list[Problem]]

ISTIO_GROUP = "config.istio.io"
ISTIO_VERSION = "v1alpha2"
NETWORKING_GROUP = "networking.istio.io"
NETWORKING_VERSION = "v1alpha3"


def _no_checks(spec: Message) -> list[Problem]:
    return []


@dataclass(frozen=True, slots=True)
class Schema:
    """One kind: its names, API group and version, spec message and semantic validation.

    `category` groups kinds for readers: "routing", "networking", "mixer-rule",
    "mixer-handler", "mixer-instance", "mixer-client".
    """

    kind: str
    plural: str
    message: type[Message]
    category: str
    group: str = ISTIO_GROUP
    version: str = ISTIO_VERSION
    aliases: tuple[str, ...] = ()
    validate: Validator = _no_checks

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def names(self) -> tuple[str, ...]:
        """Every name istioctl accepts for the kind, in canonical order."""
        return (self.kind, self.plural, *self.aliases)


def _normalize(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


class SchemaRegistry:
    """Looks kinds up by kind, plural or alias, case-insensitively and ignoring dashes."""

    def __init__(self, schemas: Iterable[Schema]) -> None:
        self._schemas = tuple(schemas)
        self._by_kind = {s.kind: s for s in self._schemas}
        self._by_name: dict[str, Schema] = {}
        for schema in self._schemas:
            for name in {schema.kind, schema.kind + "s", schema.plural, *schema.aliases}:
                other = self._by_name.setdefault(_normalize(name), schema)
                if other is not schema:
                    raise ValueError(f"{name!r} names both {other.kind} and {schema.kind}")

    def __iter__(self) -> Iterator[Schema]:
        return iter(self._schemas)

    def __len__(self) -> int:
        return len(self._schemas)

    def by_kind(self, kind: str) -> Schema | None:
        """The schema whose `kind` is exactly `kind` (as written in a document), if any."""
        return self._by_kind.get(kind)

    def resolve(self, name: str) -> Schema:
        """The schema for a user's name for a kind; ConfigError with suggestions otherwise."""
        schema = self._by_name.get(_normalize(name))
        if schema is not None:
            return schema
        close = difflib.get_close_matches(_normalize(name), self._by_name, n=3)
        hint = (
            f"; did you mean {', '.join(sorted({self._by_name[c].kind for c in close}))}?"
            if close
            else "; `istioctl get --help` lists the kinds"
        )
        raise ConfigError(Problem(f"unknown kind {name!r}{hint}"))


def _mixer_handler(kind: str, plural: str) -> Schema:
    # The spec is the adapter's params, typed by its schema in the adapter SDK's contracts.
    return Schema(
        kind,
        plural,
        struct_pb2.Struct,
        "mixer-handler",
        validate=validation.mixer_handler_validator(HANDLER_PARAMS[kind]),
    )


def _mixer_instance(kind: str, plural: str, message: type[Message]) -> Schema:
    return Schema(
        kind, plural, message, "mixer-instance", validate=validation.mixer_instance_validator(kind)
    )


def dashed_name(kind: str) -> str:
    """The dashed lowercase name 0.2's istioctl printed and accepted: RouteRule -> route-rule."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", kind).lower()


def _istio_kind(
    kind: str,
    plural: str,
    message: type[Message],
    short: str,
    validate: Validator,
    *,
    category: str = "routing",
    group: str = ISTIO_GROUP,
    version: str = ISTIO_VERSION,
) -> Schema:
    """A kind with 0.2's names: RouteRule, routerules, route-rule, route-rules and a short one."""
    dashed = dashed_name(kind)
    dashed_plural = dashed[:-1] + "ies" if plural.endswith("ies") else dashed + "s"
    return Schema(
        kind,
        plural,
        message,
        category,
        group=group,
        version=version,
        aliases=(dashed, dashed_plural, short),
        validate=validate,
    )


ROUTING_SCHEMAS = (
    _istio_kind(
        "RouteRule", "routerules", route_rule_pb2.RouteRule, "rr", validation.validate_route_rule
    ),
    _istio_kind(
        "DestinationPolicy",
        "destinationpolicies",
        dest_policy_pb2.DestinationPolicy,
        "dp",
        validation.validate_destination_policy,
    ),
    _istio_kind(
        "EgressRule",
        "egressrules",
        egress_rule_pb2.EgressRule,
        "er",
        validation.validate_egress_rule,
    ),
    _istio_kind(
        "IngressRule",
        "ingressrules",
        ingress_rule_pb2.IngressRule,
        "ir",
        validation.validate_ingress_rule,
    ),
)

NETWORKING_SCHEMAS = (
    _istio_kind(
        "ServiceEntry",
        "serviceentries",
        service_entry_pb2.ServiceEntry,
        "se",
        validation.validate_service_entry,
        category="networking",
        group=NETWORKING_GROUP,
        version=NETWORKING_VERSION,
    ),
)

MIXER_SCHEMAS = (
    Schema(
        "rule", "rules", cfg_pb2.Rule, "mixer-rule", validate=validation.validate_mixer_rule_match
    ),
    Schema(
        "attributemanifest",
        "attributemanifests",
        cfg_pb2.AttributeManifest,
        "mixer-rule",
        validate=validation.validate_attribute_manifest,
    ),
    Schema(
        "QuotaSpec",
        "quotaspecs",
        quota_pb2.QuotaSpec,
        "mixer-client",
        aliases=("quota-spec", "quota-specs"),
        validate=validation.validate_quota_spec,
    ),
    Schema(
        "QuotaSpecBinding",
        "quotaspecbindings",
        quota_pb2.QuotaSpecBinding,
        "mixer-client",
        aliases=("quota-spec-binding", "quota-spec-bindings"),
        validate=validation.validate_quota_spec_binding,
    ),
    _mixer_handler("denier", "deniers"),
    _mixer_handler("listchecker", "listcheckers"),
    _mixer_handler("memquota", "memquotas"),
    _mixer_handler("redisquota", "redisquotas"),
    _mixer_handler("prometheus", "prometheuses"),
    _mixer_handler("stdio", "stdios"),
    _mixer_handler("statsd", "statsds"),
    _mixer_handler("noop", "noops"),
    _mixer_handler("kubernetes", "kuberneteses"),
    _mixer_instance("metric", "metrics", metric.InstanceParam),
    _mixer_instance("logentry", "logentries", logentry.InstanceParam),
    _mixer_instance("listentry", "listentries", listentry.InstanceParam),
    _mixer_instance("quota", "quotas", quota.InstanceParam),
    _mixer_instance("checknothing", "checknothings", checknothing.InstanceParam),
    _mixer_instance("reportnothing", "reportnothings", reportnothing.InstanceParam),
)

DEFAULT_REGISTRY = SchemaRegistry((*ROUTING_SCHEMAS, *NETWORKING_SCHEMAS, *MIXER_SCHEMAS))
