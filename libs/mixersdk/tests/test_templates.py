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
