"""Every class of bad input gets one precise problem naming file, document, object and field."""

from __future__ import annotations

import textwrap

import pytest

from istio.config import DEFAULT_REGISTRY, ConfigError, parse_documents, parse_object, to_object
from istio.config.parse import dump_yaml

GOOD = """
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: reviews-test-v2
spec:
  destination:
    name: reviews
  precedence: 2
  match:
    request:
      headers:
        cookie:
          regex: "^(.*?;)?(user=jason)(;.*)?$"
  route:
  - labels:
      version: v2
"""


def problems_of(text: str) -> list[str]:
    _, problems = parse_documents(textwrap.dedent(text), "rules.yaml")
    return [str(p) for p in problems]


def test_good_rule_parses_with_defaults() -> None:
    (config,), problems = parse_documents(GOOD, "rules.yaml")
    assert problems == []
    assert config.meta.namespace == "default"
    assert config.meta.api_version == "config.istio.io/v1alpha2"
    assert config.spec.precedence == 2  # type: ignore[attr-defined]


def test_yaml_round_trip_keeps_the_users_forms() -> None:
    text = GOOD + "  httpReqTimeout:\n    simpleTimeout:\n      timeout: 500ms\n"
    (config,), _ = parse_documents(text)
    again, problems = parse_documents(dump_yaml([to_object(config)]))
    assert problems == []
    assert again[0].spec == config.spec
    assert "timeout: 500ms" in dump_yaml([to_object(config)])


def test_namespace_argument_fills_in_only_missing_ones() -> None:
    text = GOOD + "---\n" + GOOD.replace("name: reviews-test-v2", "name: b\n  namespace: other")
    configs, _ = parse_documents(text, namespace="books")
    assert [c.meta.namespace for c in configs] == ["books", "other"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "kind: RouteRule\nmetadata: {name: a\n",
            "rules.yaml: line 3, column 1: malformed YAML",
        ),
        (
            "kind: Routerule\nmetadata: {name: a}\nspec: {}\n",
            "rules.yaml: document 1: kind: unknown kind 'Routerule'; did you mean RouteRule?",
        ),
        (
            "kind: Frobnicator\nmetadata: {name: a}\nspec: {}\n",
            "rules.yaml: document 1: kind: unknown kind 'Frobnicator'",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec: {destination: {name: reviews}, "
            "routes: []}\n",
            "rules.yaml: document 1: RouteRule default/a: spec.routes: unknown field 'routes'",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec: {destination: {name: reviews}, "
            "precedence: high}\n",
            "rules.yaml: document 1: RouteRule default/a: spec.precedence: expected an integer, "
            "got the string 'high'",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec:\n  destination: {name: reviews}\n"
            "  route: [{labels: {version: v1}, weight: 60}, {labels: {version: v2}, weight: 30}]\n",
            "rules.yaml: document 1: RouteRule default/a: spec.route: route weights must sum to "
            "100, got 90",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec:\n  destination: {name: reviews}\n"
            "  match: {request: {headers: {cookie: {regex: '(user'}}}}\n",
            "rules.yaml: document 1: RouteRule default/a: spec.match.request.headers.cookie.regex: "
            "invalid regex '(user'",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec:\n  destination: {name: reviews}\n"
            "  match: {request: {headers: {Cookie: {exact: x}}}}\n",
            "rules.yaml: document 1: RouteRule default/a: spec.match.request.headers.Cookie: "
            "header name 'Cookie' must be lowercase",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec:\n  destination: {name: reviews}\n"
            "  route: [{labels: {version: v1}}]\n  redirect: {uri: /x}\n",
            "rules.yaml: document 1: RouteRule default/a: spec.redirect: a rule cannot have both "
            "route and redirect",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec:\n  destination: {name: reviews}\n"
            "  rewrite: {uri: /y}\n  redirect: {uri: /x}\n",
            "rules.yaml: document 1: RouteRule default/a: spec.redirect: a rule cannot have both "
            "rewrite and redirect",
        ),
        (
            "kind: RouteRule\nmetadata: {name: a}\nspec:\n  destination: {name: reviews}\n"
            "  httpReqTimeout: {simpleTimeout: {timeout: 7 seconds}}\n",
            "rules.yaml: document 1: RouteRule default/a: "
            "spec.httpReqTimeout.simpleTimeout.timeout: invalid duration '7 seconds'",
        ),
        (
            "kind: EgressRule\nmetadata: {name: a}\nspec:\n  destination: {service: 'foo.*.com'}\n"
            "  ports: [{port: 80, protocol: http}]\n",
            "rules.yaml: document 1: EgressRule default/a: spec.destination.service: 'foo.*.com': "
            "a wildcard may only be the first character",
        ),
        (
            "kind: EgressRule\nmetadata: {name: a}\nspec:\n  destination: {service: '*.foo.com'}\n"
            "  ports: [{port: 80, protocol: http}, {port: 80, protocol: https}]\n",
            "rules.yaml: document 1: EgressRule default/a: spec.ports[1].port: port 80 repeats "
            "ports[0]",
        ),
        (
            "kind: RouteRule\nmetadata: {}\nspec: {destination: {name: reviews}}\n",
            "rules.yaml: document 1: RouteRule: metadata.name: is required",
        ),
        (
            "- just\n- a list\n",
            "rules.yaml: document 1: a document must be a mapping",
        ),
        (
            "kind: DestinationPolicy\nmetadata: {name: a}\nspec:\n  destination: {name: reviews}\n"
            "  loadBalancing: {name: FASTEST}\n",
            "rules.yaml: document 1: DestinationPolicy default/a: spec.loadBalancing.name: invalid "
            "value 'FASTEST': expected one of ROUND_ROBIN, LEAST_CONN, RANDOM",
        ),
    ],
)
def test_bad_input_is_named_precisely(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


def test_a_bad_document_does_not_hide_the_good_ones() -> None:
    text = (
        GOOD
        + "---\nkind: Nope\nmetadata: {name: x}\n---\n"
        + GOOD.replace("reviews-test-v2", "second")
    )
    configs, problems = parse_documents(text, "rules.yaml")
    assert [c.meta.name for c in configs] == ["reviews-test-v2", "second"]
    assert len(problems) == 1
    assert "document 2" in str(problems[0])


def test_enum_like_strings_are_case_insensitive() -> None:
    config = parse_object(
        {
            "kind": "DestinationPolicy",
            "metadata": {"name": "lb"},
            "spec": {"destination": {"name": "reviews"}, "loadBalancing": {"name": "least_conn"}},
        }
    )
    assert to_object(config)["spec"]["loadBalancing"] == {"name": "LEAST_CONN"}
    egress = parse_object(
        {
            "kind": "EgressRule",
            "metadata": {"name": "google"},
            "spec": {
                "destination": {"service": "*.googleapis.com"},
                "ports": [{"port": 443, "protocol": "HTTPS"}, {"port": 80, "protocol": "http"}],
            },
        }
    )
    assert len(egress.spec.ports) == 2  # type: ignore[attr-defined]


def test_parse_object_raises_with_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_object(
            {
                "kind": "RouteRule",
                "metadata": {"name": "a"},
                "spec": {
                    "destination": {"name": "reviews"},
                    "httpFault": {"abort": {"percent": 150, "httpStatus": 700}},
                },
            }
        )
    fields = [p.field for p in caught.value.problems]
    assert fields == ["spec.httpFault.abort.percent", "spec.httpFault.abort.httpStatus"]


def test_registry_aliases() -> None:
    for name in ("route-rule", "routerule", "routerules", "RouteRule", "route-rules"):
        assert DEFAULT_REGISTRY.resolve(name).kind == "RouteRule"
    assert DEFAULT_REGISTRY.resolve("destination-policy").kind == "DestinationPolicy"
    assert DEFAULT_REGISTRY.resolve("egressrules").kind == "EgressRule"
    assert DEFAULT_REGISTRY.resolve("prometheuses").kind == "prometheus"
    assert DEFAULT_REGISTRY.resolve("service-entry").kind == "ServiceEntry"
    with pytest.raises(ConfigError, match="did you mean RouteRule"):
        DEFAULT_REGISTRY.resolve("routerul")


def test_mixer_handler_params_and_instances() -> None:
    handler = parse_object(
        {
            "kind": "memquota",
            "metadata": {"name": "handler", "namespace": "istio-system"},
            "spec": {"quotas": [{"name": "requestcount.quota.istio-system", "maxAmount": 5000}]},
        }
    )
    assert to_object(handler)["spec"] == {
        "quotas": [{"name": "requestcount.quota.istio-system", "maxAmount": 5000}]
    }
    with pytest.raises(ConfigError, match=r"spec\.valu: unknown field"):
        parse_object({"kind": "metric", "metadata": {"name": "m"}, "spec": {"valu": "1"}})
