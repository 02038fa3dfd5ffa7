"""Building the dispatch plan: what a sound config becomes, and every way one is refused with
the resource and field named."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from istio.config import Config
from istio.mixer.config import build_plan
from istio.mixersdk import AdapterInfo

ParseConfigs = Callable[[str], list[Config]]

HEADER = "apiVersion: config.istio.io/v1alpha2\n"

SOUND = """
kind: denier
metadata: {name: handler, namespace: istio-system}
spec: {status: {code: 7, message: Not allowed}}
---
kind: checknothing
metadata: {name: denyrequest, namespace: istio-system}
spec: {}
---
kind: metric
metadata: {name: requestcount, namespace: istio-system}
spec:
  value: "1"
  dimensions: {source: source.service | "unknown"}
---
kind: noop
metadata: {name: sink, namespace: istio-system}
spec: {}
---
kind: rule
metadata: {name: deny, namespace: istio-system}
spec:
  match: destination.service == "ratings.default.svc.cluster.local"
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
---
kind: rule
metadata: {name: count, namespace: istio-system}
spec:
  actions:
  - handler: sink.noop
    instances: [requestcount.metric, denyrequest.checknothing.istio-system]
---
kind: rule
metadata: {name: tcp, namespace: default}
spec:
  match: context.protocol == "tcp" && destination.port == 27017
  actions:
  - handler: sink.noop.istio-system
    instances: [requestcount.metric.istio-system]
"""


def plan_problems(
    parse_configs: ParseConfigs, adapters: dict[str, AdapterInfo], text: str
) -> list[str]:
    plan, problems = build_plan(parse_configs(SOUND + "---\n" + text), adapters)
    assert (plan is None) == bool(problems)
    return [str(p) for p in problems]


def test_a_sound_config_becomes_a_plan(
    parse_configs: ParseConfigs, adapters: dict[str, AdapterInfo]
) -> None:
    plan, problems = build_plan(parse_configs(SOUND), adapters)
    assert problems == []
    assert plan is not None
    http, tcp = plan.rules["istio-system"]
    assert [r.key for r in http] == ["count.rule.istio-system", "deny.rule.istio-system"]
    assert tcp == ()
    assert [r.key for r in plan.rules["default"][1]] == ["tcp.rule.default"]
    count = http[0]
    assert count.match is None
    assert [(d.handler, d.template) for d in count.report] == [("sink.noop.istio-system", "metric")]
    assert [(d.handler, d.template) for d in count.check] == [
        ("sink.noop.istio-system", "checknothing")
    ]
    assert dict(plan.counts) == {"rules": 3, "handlers": 2, "instances": 2}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "kind: rule\nmetadata: {name: r, namespace: istio-system}\n"
            'spec: {match: requst.path == "/", actions: []}\n',
            "rule istio-system/r: spec.match: 'requst.path == \"/\"': column 1: unknown "
            "attribute requst.path; did you mean request.path?",
        ),
        (
            "kind: rule\nmetadata: {name: r, namespace: istio-system}\n"
            'spec: {match: response.code == "200", actions: []}\n',
            "rule istio-system/r: spec.match: 'response.code == \"200\"': column 15: == needs "
            "operands of the same type, got INT64 and STRING",
        ),
        (
            "kind: rule\nmetadata: {name: r, namespace: istio-system}\n"
            "spec: {match: request.path, actions: []}\n",
            "rule istio-system/r: spec.match: 'request.path': column 1: expected a BOOL "
            "expression, got STRING",
        ),
        (
            "kind: rule\nmetadata: {name: r, namespace: istio-system}\n"
            "spec: {actions: [{handler: nothere.denier, instances: [denyrequest.checknothing]}]}\n",
            "rule istio-system/r: spec.actions[0].handler: no handler nothere.denier.istio-system",
        ),
        (
            "kind: rule\nmetadata: {name: r, namespace: default}\n"
            "spec: {actions: [{handler: handler.denier.istio-system, "
            "instances: [denyrequest.checknothing]}]}\n",
            "rule default/r: spec.actions[0].instances[0]: no instance "
            "denyrequest.checknothing.default",
        ),
        (
            "kind: rule\nmetadata: {name: r, namespace: istio-system}\n"
            "spec: {actions: [{handler: handler.denier, instances: [requestcount.metric]}]}\n",
            "rule istio-system/r: spec.actions[0].instances[0]: handler "
            "handler.denier.istio-system (denier) does not handle metric instances (it handles: "
            "checknothing, listentry, quota)",
        ),
        (
            "kind: metric\nmetadata: {name: m, namespace: istio-system}\n"
            'spec: {value: request.size, dimensions: {d: source.ip | "x"}}\n',
            "metric istio-system/m: spec.dimensions.d: 'source.ip | \"x\"': column 11: | needs "
            "operands of the same type, got IP_ADDRESS and STRING; write an address as "
            'ip("10.0.0.1")',
        ),
        (
            "kind: logentry\nmetadata: {name: l, namespace: istio-system}\n"
            "spec: {severity: request.size}\n",
            "logentry istio-system/l: spec.severity: 'request.size': column 1: expected a STRING "
            "expression, got INT64",
        ),
        (
            "kind: listentry\nmetadata: {name: l, namespace: istio-system}\nspec: {}\n",
            "listentry istio-system/l: spec.value: is required",
        ),
        (
            "kind: prefixlist\nmetadata: {name: q, namespace: istio-system}\n"
            "spec: {statusCode: 99}\n",
            "prefixlist istio-system/q: spec.statusCode: must be at most 16, got 99",
        ),
        (
            "kind: attributemanifest\nmetadata: {name: m, namespace: istio-system}\n"
            "spec: {attributes: {request.size: {valueType: STRING}}}\n",
            "attributemanifest istio-system/m: attributes.request.size.valueType: request.size is "
            "INT64 in the standard vocabulary, not STRING",
        ),
        (
            "kind: QuotaSpecBinding\nmetadata: {name: b, namespace: default}\n"
            "spec: {services: [{name: ratings}], quotaSpecs: [{name: missing}]}\n",
            "QuotaSpecBinding default/b: spec.quotaSpecs[0]: no QuotaSpec default/missing",
        ),
    ],
)
def test_problems_name_the_resource_and_field(
    parse_configs: ParseConfigs, adapters: dict[str, AdapterInfo], text: str, expected: str
) -> None:
    assert expected in plan_problems(parse_configs, adapters, text)


def test_handler_params_problems_are_all_reported(
    parse_configs: ParseConfigs, adapters: dict[str, AdapterInfo]
) -> None:
    # Built-in adapters' params are checked by the store too (libs/config); a custom
    # adapter's only by Mixer, with the schema the adapter declares.
    problems = plan_problems(
        parse_configs,
        adapters,
        "kind: prefixlist\nmetadata: {name: q, namespace: istio-system}\n"
        "spec: {prefixes: /api, statusCod: 7}\n",
    )
    assert sorted(problems) == [
        "prefixlist istio-system/q: spec.prefixes: expected a list, got a string",
        "prefixlist istio-system/q: spec.statusCod: unknown field; did you mean statusCode? "
        "(known: prefixes, statusCode, validDuration)",
    ]


def test_the_store_refuses_bad_builtin_handler_params(
    parse_configs: ParseConfigs,
) -> None:
    with pytest.raises(AssertionError, match=r"spec\.quotas\[0\]\.maxAmount: must be at least 0"):
        parse_configs(
            "kind: memquota\nmetadata: {name: q, namespace: istio-system}\n"
            "spec: {quotas: [{name: a, maxAmount: -1}]}\n"
        )


def test_attribute_manifests_extend_the_vocabulary(
    parse_configs: ParseConfigs, adapters: dict[str, AdapterInfo]
) -> None:
    text = SOUND + (
        "---\nkind: attributemanifest\nmetadata: {name: extra, namespace: istio-system}\n"
        "spec: {attributes: {app.tier: {valueType: STRING}}}\n"
        "---\nkind: rule\nmetadata: {name: tier, namespace: istio-system}\n"
        'spec: {match: app.tier == "gold", actions: []}\n'
    )
    plan, problems = build_plan(parse_configs(text), adapters)
    assert problems == []
    assert plan is not None
    assert str(plan.manifest["app.tier"]) == "STRING"
