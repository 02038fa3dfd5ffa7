"""The Bookinfo samples parse and validate cleanly, and hold what their names promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from istio.config import Config, parse_documents
from istio.config.convert import message_to_value

HERE = Path(__file__).parent
JASON = "^(.*?;)?(user=jason)(;.*)?$"
MIXER_NAMESPACE = "istio-system"

# File -> the (kind, namespace, name) of each document, in order.
EXPECTED: dict[str, list[tuple[str, str, str]]] = {
    "route-rule-all-v1.yaml": [
        ("RouteRule", "default", "productpage-default"),
        ("RouteRule", "default", "reviews-default"),
        ("RouteRule", "default", "ratings-default"),
        ("RouteRule", "default", "details-default"),
    ],
    "route-rule-reviews-test-v2.yaml": [("RouteRule", "default", "reviews-test-v2")],
    "route-rule-reviews-50-v3.yaml": [("RouteRule", "default", "reviews-default")],
    "route-rule-reviews-v3.yaml": [("RouteRule", "default", "reviews-default")],
    "route-rule-reviews-v2-v3.yaml": [("RouteRule", "default", "reviews-default")],
    "route-rule-ratings-test-delay.yaml": [("RouteRule", "default", "ratings-test-delay")],
    "route-rule-ratings-test-abort.yaml": [("RouteRule", "default", "ratings-test-abort")],
    "egress-rule-google-apis.yaml": [("EgressRule", "default", "googleapis")],
    "destination-policy-reviews-cb.yaml": [("DestinationPolicy", "default", "reviews-cb")],
    "mixer-rule-deny-label.yaml": [
        ("denier", MIXER_NAMESPACE, "denyreviewsv3handler"),
        ("checknothing", MIXER_NAMESPACE, "denyreviewsv3request"),
        ("rule", MIXER_NAMESPACE, "denyreviewsv3"),
    ],
    "mixer-rule-ratings-ratelimit.yaml": [
        ("memquota", MIXER_NAMESPACE, "handler"),
        ("quota", MIXER_NAMESPACE, "requestcount"),
        ("rule", MIXER_NAMESPACE, "quota"),
        ("QuotaSpec", MIXER_NAMESPACE, "request-count"),
        ("QuotaSpecBinding", MIXER_NAMESPACE, "request-count"),
    ],
    "mixer-rule-ratings-denial.yaml": [
        ("listchecker", MIXER_NAMESPACE, "whitelist"),
        ("listentry", MIXER_NAMESPACE, "appversion"),
        ("rule", MIXER_NAMESPACE, "checkversion"),
    ],
    "mixer-telemetry.yaml": [
        ("metric", MIXER_NAMESPACE, "doublerequestcount"),
        ("prometheus", MIXER_NAMESPACE, "doublehandler"),
        ("rule", MIXER_NAMESPACE, "doubleprom"),
        ("logentry", MIXER_NAMESPACE, "newlog"),
        ("stdio", MIXER_NAMESPACE, "newhandler"),
        ("rule", MIXER_NAMESPACE, "newlogstdio"),
    ],
}


def load(name: str) -> list[Config]:
    path = HERE / name
    configs, problems = parse_documents(path.read_text(), str(path))
    assert not problems, "\n".join(str(p) for p in problems)
    return configs


def spec(config: Config) -> dict[str, Any]:
    return message_to_value(config.spec)


def test_every_sample_is_expected() -> None:
    assert sorted(p.name for p in HERE.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_parses_without_problems(name: str) -> None:
    configs = load(name)
    assert [(c.meta.kind, c.meta.namespace, c.meta.name) for c in configs] == EXPECTED[name]
    assert {c.meta.api_version for c in configs} == {"config.istio.io/v1alpha2"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_states_its_api_version(name: str) -> None:
    # Every document says apiVersion itself rather than relying on istioctl to fill it in.
    text = (HERE / name).read_text()
    assert text.count("apiVersion: config.istio.io/v1alpha2") == len(EXPECTED[name])


def test_all_v1_routes_every_service_to_v1() -> None:
    configs = load("route-rule-all-v1.yaml")
    destinations = set()
    for config in configs:
        value = spec(config)
        destinations.add(value["destination"]["name"])
        assert value["route"] == [{"labels": {"version": "v1"}}]
        assert value["precedence"] == 1
    assert destinations == {"productpage", "reviews", "ratings", "details"}


def test_reviews_test_v2_matches_jason_cookie() -> None:
    (config,) = load("route-rule-reviews-test-v2.yaml")
    value = spec(config)
    assert value["precedence"] == 2
    assert value["match"] == {"request": {"headers": {"cookie": {"regex": JASON}}}}
    assert value["route"] == [{"labels": {"version": "v2"}}]


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("route-rule-reviews-50-v3.yaml", {"v1": 50, "v3": 50}),
        ("route-rule-reviews-v2-v3.yaml", {"v2": 50, "v3": 50}),
        ("route-rule-reviews-v3.yaml", {"v3": 0}),
    ],
)
def test_reviews_weights(name: str, split: dict[str, int]) -> None:
    (config,) = load(name)
    routes = config.spec.route  # type: ignore[attr-defined]
    assert {r.labels["version"]: r.weight for r in routes} == split
    assert config.spec.destination.name == "reviews"  # type: ignore[attr-defined]


def test_ratings_delay_is_seven_seconds_for_jason() -> None:
    (config,) = load("route-rule-ratings-test-delay.yaml")
    value = spec(config)
    assert value["match"] == {"request": {"headers": {"cookie": {"regex": JASON}}}}
    assert value["route"] == [{"labels": {"version": "v1"}}]
    assert value["httpFault"] == {"delay": {"percent": 100.0, "fixedDelay": "7s"}}
    assert config.spec.http_fault.delay.fixed_delay.seconds == 7  # type: ignore[attr-defined]


def test_ratings_abort_is_500_for_jason() -> None:
    (config,) = load("route-rule-ratings-test-abort.yaml")
    value = spec(config)
    assert value["match"] == {"request": {"headers": {"cookie": {"regex": JASON}}}}
    assert value["httpFault"] == {"abort": {"percent": 100.0, "httpStatus": 500}}


def test_egress_rule_for_google_apis() -> None:
    (config,) = load("egress-rule-google-apis.yaml")
    assert config.spec.destination.service == "*.googleapis.com"  # type: ignore[attr-defined]
    ports = {p.port: p.protocol.upper() for p in config.spec.ports}  # type: ignore[attr-defined]
    assert ports == {443: "HTTPS", 80: "HTTP"}


def test_reviews_circuit_breaker() -> None:
    (config,) = load("destination-policy-reviews-cb.yaml")
    value = spec(config)
    assert value["destination"] == {"name": "reviews", "labels": {"version": "v1"}}
    assert value["circuitBreaker"] == {
        "simpleCb": {
            "maxConnections": 100,
            "httpMaxRequests": 1000,
            "sleepWindow": "15m",
            "httpConsecutiveErrors": 7,
            "httpDetectionInterval": "5m",
            "httpMaxRequestsPerConnection": 10,
        }
    }


def by_kind(configs: list[Config]) -> dict[str, list[Config]]:
    out: dict[str, list[Config]] = {}
    for config in configs:
        out.setdefault(config.meta.kind, []).append(config)
    return out


def test_deny_label_rule_joins_denier_and_checknothing() -> None:
    kinds = by_kind(load("mixer-rule-deny-label.yaml"))
    (rule,) = kinds["rule"]
    assert 'source.labels["version"] == "v3"' in rule.spec.match  # type: ignore[attr-defined]
    (action,) = rule.spec.actions  # type: ignore[attr-defined]
    assert action.handler == "denyreviewsv3handler.denier.istio-system"
    assert list(action.instances) == ["denyreviewsv3request.checknothing.istio-system"]
    assert spec(kinds["denier"][0]) == {"status": {"code": 7, "message": "Not allowed"}}


def test_ratelimit_is_one_request_per_second_on_ratings() -> None:
    kinds = by_kind(load("mixer-rule-ratings-ratelimit.yaml"))
    (quota,) = spec(kinds["memquota"][0])["quotas"]
    assert quota["name"] == "requestcount.quota.istio-system"
    assert quota["overrides"] == [
        {"dimensions": {"destination": "ratings"}, "maxAmount": 1, "validDuration": "1s"}
    ]
    assert "destination" in kinds["quota"][0].spec.dimensions  # type: ignore[attr-defined]
    (action,) = kinds["rule"][0].spec.actions  # type: ignore[attr-defined]
    assert (action.handler, list(action.instances)) == ("handler.memquota", ["requestcount.quota"])
    assert spec(kinds["QuotaSpec"][0]) == {
        "rules": [{"quotas": [{"quota": "requestcount", "charge": 1}]}]
    }
    assert spec(kinds["QuotaSpecBinding"][0]) == {
        "services": [{"name": "ratings", "namespace": "default"}],
        "quotaSpecs": [{"name": "request-count", "namespace": "istio-system"}],
    }


def test_ratings_denial_whitelists_versions() -> None:
    kinds = by_kind(load("mixer-rule-ratings-denial.yaml"))
    assert spec(kinds["listchecker"][0]) == {"overrides": ["v1", "v2"], "blacklist": False}
    assert kinds["listentry"][0].spec.value == 'source.labels["version"]'  # type: ignore[attr-defined]
    (action,) = kinds["rule"][0].spec.actions  # type: ignore[attr-defined]
    assert (action.handler, list(action.instances)) == (
        "whitelist.listchecker",
        ["appversion.listentry"],
    )


def test_telemetry_metric_and_log() -> None:
    kinds = by_kind(load("mixer-telemetry.yaml"))
    (metric,) = kinds["metric"]
    assert metric.spec.value == "2"  # type: ignore[attr-defined]
    assert set(metric.spec.dimensions) == {"source", "destination", "message"}  # type: ignore[attr-defined]
    (prometheus_metric,) = spec(kinds["prometheus"][0])["metrics"]
    assert prometheus_metric["name"] == "double_request_count"
    assert prometheus_metric["instance_name"] == "doublerequestcount.metric.istio-system"
    (log,) = kinds["logentry"]
    assert log.spec.timestamp == "request.time"  # type: ignore[attr-defined]
    assert "latency" in log.spec.variables  # type: ignore[attr-defined]
    actions = {
        a.handler: list(a.instances)
        for rule in kinds["rule"]
        for a in rule.spec.actions  # type: ignore[attr-defined]
    }
    assert actions == {
        "doublehandler.prometheus": ["doublerequestcount.metric"],
        "newhandler.stdio": ["newlog.logentry"],
    }


def test_readme_covers_every_sample() -> None:
    readme = (HERE / "README.md").read_text()
    for name in EXPECTED:
        assert f"istioctl create -f samples/bookinfo/{name}" in readme, name


def test_null_spec_as_istio_0_2_wrote_it() -> None:
    """Istio 0.2's docs wrote an empty `spec:` (YAML null) for checknothing instances."""
    text = (
        "apiVersion: config.istio.io/v1alpha2\n"
        "kind: checknothing\n"
        "metadata:\n"
        "  name: denyrequest\n"
        "  namespace: istio-system\n"
        "spec:\n"
    )
    configs, problems = parse_documents(text, "null-spec.yaml")
    assert not problems, "\n".join(str(p) for p in problems)
    assert len(configs) == 1
