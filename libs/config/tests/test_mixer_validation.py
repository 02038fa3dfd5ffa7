"""Mixer config checked offline: built-in handlers' params typed, expressions' syntax per
object, and expressions type-checked against the vocabulary and the manifests of a set."""

from __future__ import annotations

from typing import Any

from istio.config import ConfigError, parse_documents, parse_object
from istio.config.validation import validate_mixer_expressions


def problems_of(kind: str, spec: dict[str, Any]) -> list[str]:
    try:
        parse_object(
            {"kind": kind, "metadata": {"name": "x", "namespace": "istio-system"}, "spec": spec}
        )
    except ConfigError as error:
        return [f"{p.field}: {p.message}" for p in error.problems]
    return []


def test_builtin_handler_params_are_typed() -> None:
    assert problems_of("denier", {"status": {"code": 7}, "validDuration": "5s"}) == []
    assert problems_of("listchecker", {"entryType": "IP_ADDRESS", "blacklist": "yes"}) == [
        "spec.entryType: expected one of STRINGS, CASE_INSENSITIVE_STRINGS, IP_ADDRESSES, "
        "got 'IP_ADDRESS'",
        "spec.blacklist: expected true or false, got 'yes'",
    ]
    assert problems_of("redisquota", {"quotas": [{"name": "q", "maxAmount": 1}]}) == [
        "spec.quotas[0].validDuration: is required",
        "spec.redisServerUrl: is required",
    ]


def test_expression_syntax_per_object() -> None:
    assert problems_of("rule", {"match": 'request.path == "/x', "actions": []}) == [
        "spec.match: 'request.path == \"/x': column 17: unterminated string"
    ]
    assert problems_of(
        "metric", {"value": "1", "dimensions": {"a": "source.labels[", "b": "x"}}
    ) == [
        "spec.dimensions.a: 'source.labels[': column 15: expected an operand, found end of "
        "expression"
    ]
    # Unknown attributes are not known per object: manifests may declare them.
    assert problems_of("listentry", {"value": "custom.attribute"}) == []


SET = """
apiVersion: config.istio.io/v1alpha2
kind: attributemanifest
metadata: {name: custom, namespace: istio-system}
spec:
  attributes:
    app.tier: {valueType: STRING}
---
apiVersion: config.istio.io/v1alpha2
kind: listentry
metadata: {name: tier, namespace: istio-system}
spec: {value: app.tier | "bronze"}
---
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {name: size, namespace: istio-system}
spec: {value: request.size | "0", dimensions: {who: app.tierr}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: gold, namespace: istio-system}
spec:
  match: app.tier == "gold" && response.code
  actions: [{handler: h.denier, instances: [tier.listentry]}]
"""


def test_expressions_type_checked_against_the_set() -> None:
    configs, problems = parse_documents(SET)
    assert problems == []
    assert [str(p) for p in validate_mixer_expressions(configs)] == [
        "metric istio-system/size: spec.value: 'request.size | \"0\"': column 14: | needs "
        "operands of the same type, got INT64 and STRING",
        "metric istio-system/size: spec.dimensions.who: 'app.tierr': column 1: unknown "
        "attribute app.tierr; did you mean app.tier?",
        "rule istio-system/gold: spec.match: 'app.tier == \"gold\" && response.code': column 23: "
        "&& needs BOOL operands, got INT64",
    ]
