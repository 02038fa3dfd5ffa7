"""The params schema language: names in either case, defaults, conversions, and problems with
their paths."""

from __future__ import annotations

from datetime import timedelta

from istio.mixersdk.builtin import HANDLER_PARAMS, PROMETHEUS
from istio.mixersdk.params import Enum, Field, Int, Object, Str, parse_params


def test_builtin_defaults_and_camel_case() -> None:
    parsed, problems = parse_params(
        HANDLER_PARAMS["memquota"],
        {"quotas": [{"name": "q", "max_amount": "5", "validDuration": "1m30s"}]},
    )
    assert problems == []
    assert parsed == {
        "quotas": [
            {"name": "q", "max_amount": 5, "valid_duration": timedelta(seconds=90), "overrides": []}
        ],
        "min_deduplication_duration": timedelta(seconds=1),
    }


def test_problems_have_paths() -> None:
    _, problems = parse_params(
        PROMETHEUS,
        {
            "metrics": [
                {
                    "name": "bad-name",
                    "instanceName": "x",
                    "kind": "histogram",
                    "buckets": {
                        "linearBuckets": {"numFiniteBuckets": 0, "width": 1},
                        "explicitBuckets": {"bounds": [1, "two"]},
                    },
                    "labelNames": "a",
                }
            ]
        },
    )
    assert [str(p) for p in problems] == [
        "metrics[0].name: 'bad-name' does not match [a-zA-Z_:][a-zA-Z0-9_:]*",
        "metrics[0].kind: expected one of GAUGE, COUNTER, DISTRIBUTION, got 'histogram'",
        "metrics[0].buckets.linearBuckets.numFiniteBuckets: must be at least 1, got 0",
        "metrics[0].buckets.explicitBuckets.bounds[1]: expected a number, got 'two'",
        "metrics[0].buckets: linearBuckets and explicitBuckets are exclusive: set only one",
        "metrics[0].labelNames: expected a list, got a string",
    ]


def test_unknown_and_missing_fields() -> None:
    schema = Object(Field("kind", Enum(("A", "B")), required=True), Field("size", Int()))
    parsed, problems = parse_params(schema, {"sise": 1, "kind": "b"})
    assert parsed == {"kind": "B", "size": None}
    assert [str(p) for p in problems] == [
        "sise: unknown field; did you mean size? (known: kind, size)"
    ]
    _, problems = parse_params(schema, {})
    assert [str(p) for p in problems] == ["kind: is required"]
    _, problems = parse_params(Object(Field("name", Str())), ["not", "a", "mapping"])
    assert [str(p) for p in problems] == ["expected a mapping, got a list"]


def test_every_builtin_adapter_accepts_empty_params_or_says_what_is_required() -> None:
    required = {
        name: sorted(str(p) for p in parse_params(schema, {})[1])
        for name, schema in HANDLER_PARAMS.items()
    }
    assert required == {
        "denier": [],
        "listchecker": [],
        "memquota": [],
        "redisquota": ["redisServerUrl: is required"],
        "prometheus": [],
        "stdio": [],
        "statsd": [],
        "noop": [],
        "kubernetes": [],
    }
