"""Instances built from instance configs: field names, expected types, maps, and the
instance each template hands its handlers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from istio.expr import STANDARD_VOCABULARY, AttributeAbsent, MapBag
from istio.mixersdk import TEMPLATES, LogEntryInstance, MetricInstance, compile_instance


def test_metric_instance() -> None:
    builder, problems = compile_instance(
        "requestduration.metric.istio-system",
        TEMPLATES["metric"],
        {
            "value": 'response.duration | "0ms"',
            "dimensions": {"source": 'source.labels["app"] | "unknown"', "code": "response.code"},
            "monitoredResourceType": '"UNSPECIFIED"',
        },
        STANDARD_VOCABULARY,
    )
    assert problems == []
    assert builder is not None
    assert builder.attributes == {"response.duration", "source.labels", "response.code"}
    instance = builder.build(MapBag({"response.code": 200}))
    assert instance == MetricInstance(
        "requestduration.metric.istio-system",
        timedelta(0),
        {"code": 200, "source": "unknown"},
        "UNSPECIFIED",
        {},
    )
    with pytest.raises(AttributeAbsent):
        builder.build(MapBag())


def test_logentry_instance_and_types() -> None:
    builder, problems = compile_instance(
        "accesslog.logentry.istio-system",
        TEMPLATES["logentry"],
        {
            "severity": '"Default"',
            "timestamp": "request.time",
            "variables": {"path": "request.path"},
        },
        STANDARD_VOCABULARY,
    )
    assert problems == []
    assert builder is not None
    when = datetime(2017, 10, 1, tzinfo=UTC)
    instance = builder.build(MapBag({"request.time": when, "request.path": "/"}))
    assert instance == LogEntryInstance(
        "accesslog.logentry.istio-system", {"path": "/"}, when, "Default", "", {}
    )
    _, problems = compile_instance(
        "x", TEMPLATES["logentry"], {"timestamp": '"now"', "extra": "1"}, STANDARD_VOCABULARY
    )
    assert [str(p) for p in problems] == [
        "extra: unknown field of logentry (known: variables, timestamp, severity, "
        "monitoredResourceType, monitoredResourceDimensions)",
        "timestamp: '\"now\"': column 1: expected a TIMESTAMP expression, got STRING",
    ]


def test_templates_have_their_varieties() -> None:
    assert {name: t.variety.value for name, t in TEMPLATES.items()} == {
        "checknothing": "check",
        "listentry": "check",
        "logentry": "report",
        "metric": "report",
        "quota": "quota",
        "reportnothing": "report",
    }


class CountingBag(MapBag):
    """Counts how often each attribute is read."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.reads: dict[str, int] = {}

    def get(self, name: str, /) -> object:  # type: ignore[override]
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().get(name)


def _metric(name: str, value: str, dimensions: dict[str, str]) -> object:
    builder, problems = compile_instance(
        f"{name}.metric.istio-system",
        TEMPLATES["metric"],
        {"value": value, "dimensions": dimensions, "monitoredResourceType": '"UNSPECIFIED"'},
        STANDARD_VOCABULARY,
    )
    assert problems == []
    assert builder is not None
    return builder


def test_builders_sharing_a_memo_evaluate_common_fields_once() -> None:
    dimensions = {"source": "source.service", "code": "response.code | 200"}
    count = _metric("requestcount", "1", dimensions)
    size = _metric("requestsize", "request.size | 0", dimensions)
    other = _metric("other", "request.size | 0", {"source": "source.service"})
    attributes = {"source.service": "a", "request.size": 7}
    bag = CountingBag(attributes)
    memo: dict[str, object] = {}
    built = [b.build(bag, memo) for b in (count, size, other)]  # type: ignore[attr-defined]
    alone = [b.build(MapBag(attributes)) for b in (count, size, other)]  # type: ignore[attr-defined]
    assert built == alone
    assert [i.value for i in built] == [1, 7, 7]
    assert built[0].dimensions == {"source": "a", "code": 200}
    # The dimensions once for the two metrics that share them; request.size once for two.
    assert built[0].dimensions is built[1].dimensions
    assert built[2].dimensions == {"source": "a"}
    assert bag.reads == {"source.service": 2, "response.code": 1, "request.size": 1}


def test_a_field_that_failed_fails_again_from_the_memo() -> None:
    first = _metric("a", "request.size", {})
    second = _metric("b", "request.size", {"x": "source.service"})
    bag = CountingBag({"source.service": "a"})
    memo: dict[str, object] = {}
    with pytest.raises(AttributeAbsent):
        first.build(bag, memo)  # type: ignore[attr-defined]
    with pytest.raises(AttributeAbsent):
        second.build(bag, memo)  # type: ignore[attr-defined]
    assert bag.reads == {"request.size": 1}  # failed once, not evaluated again


def test_constant_fields_are_made_once() -> None:
    builder = _metric("m", "1", {})
    first = builder.build(MapBag())  # type: ignore[attr-defined]
    second = builder.build(MapBag({"request.size": 1}))  # type: ignore[attr-defined]
    assert first == MetricInstance("m.metric.istio-system", 1, {}, "UNSPECIFIED", {})
    assert first.dimensions is second.dimensions  # an empty map, made at compile time
