"""Type checking and evaluation: Mixer's semantics for each operator and function."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from istio.expr import (
    STANDARD_VOCABULARY,
    AttributeAbsent,
    EvaluationError,
    ExpressionError,
    MapBag,
    Reference,
    TrackingBag,
    ValueType,
    compile_expression,
    type_of,
)

V = STANDARD_VOCABULARY
MANIFEST = {
    **V,
    "dns": ValueType.DNS_NAME,
    "mail": ValueType.EMAIL_ADDRESS,
    "link": ValueType.URI,
    "ratio": ValueType.DOUBLE,
}


def evaluate(text: str, **attributes: object) -> object:
    bag = MapBag({k.replace("__", "."): v for k, v in attributes.items()})  # type: ignore[misc]
    return compile_expression(text, MANIFEST)(bag)


@pytest.mark.parametrize(
    ("text", "value_type"),
    [
        ('request.headers["x"]', ValueType.STRING),
        ("response.code == 200", ValueType.BOOL),
        ('response.duration | "10ms"', ValueType.DURATION),
        ('ip("::1")', ValueType.IP_ADDRESS),
        ('timestamp("2017-10-01T00:00:00Z")', ValueType.TIMESTAMP),
        ('email("a@b.c")', ValueType.EMAIL_ADDRESS),
        ('dnsName("a.b")', ValueType.DNS_NAME),
        ('uri("http://a/b")', ValueType.URI),
        ("1.5", ValueType.DOUBLE),
        ("source.labels", ValueType.STRING_MAP),
    ],
)
def test_types(text: str, value_type: ValueType) -> None:
    assert type_of(text, MANIFEST) is value_type


def test_string_equality_with_wildcards_on_the_right() -> None:
    assert evaluate('destination.service == "ratings.*"', destination__service="ratings.default")
    assert evaluate('destination.service == "*.default"', destination__service="ratings.default")
    assert not evaluate('destination.service == "*.prod"', destination__service="ratings.default")
    assert evaluate('destination.service != "reviews*"', destination__service="ratings.default")
    # The right side is the pattern, even when it is an attribute.
    assert evaluate('"a.b" == request.path', request__path="a.*")
    assert evaluate('match(request.path, "/api/*")', request__path="/api/v1")
    assert not evaluate('match(request.path, "*/v2")', request__path="/api/v1")


def test_default_operator_skips_absent_empty_and_failing_values() -> None:
    assert evaluate('source.labels["app"] | "unknown"', source__labels={}) == "unknown"
    assert evaluate('source.labels["app"] | "unknown"') == "unknown"
    assert evaluate('source.labels["app"] | "unknown"', source__labels={"app": "x"}) == "x"
    chain = 'source.service | destination.service | "none"'
    assert evaluate(chain, destination__service="d") == "d"
    assert evaluate('ip(request.path) | ip("0.0.0.0")', request__path="bad") == bytes(4)
    assert evaluate("response.code | 0") == 0


def test_absent_attribute_raises_unless_defaulted() -> None:
    with pytest.raises(AttributeAbsent) as caught:
        evaluate('request.path == "/"')
    assert caught.value.name == "request.path"
    with pytest.raises(AttributeAbsent):
        evaluate('request.headers["x"] == ""')


def test_missing_map_key_reads_as_empty() -> None:
    assert evaluate('request.headers["x-user"] == ""', request__headers={})
    assert not evaluate('request.headers["x-user"] == ""', request__headers={"x-user": "jason"})


def test_logic_short_circuits() -> None:
    # The right side would raise (absent attribute) if it were evaluated.
    assert evaluate('context.protocol == "tcp" || request.path == "/"', context__protocol="tcp")
    assert not evaluate('context.protocol == "tcp" && request.path == "/"', context__protocol="x")
    assert evaluate('!(context.protocol == "tcp")', context__protocol="http")


def test_typed_comparisons() -> None:
    assert evaluate('source.ip == ip("10.0.0.1")', source__ip=bytes([10, 0, 0, 1]))
    mapped = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert evaluate('source.ip == ip("10.0.0.1")', source__ip=mapped)
    assert evaluate('dns == "Ratings.Default."', dns="ratings.default")
    assert evaluate('mail == "Jason@EXAMPLE.com"', mail="Jason@example.com")
    assert not evaluate('mail == "jason@example.com"', mail="Jason@example.com")
    assert evaluate('link == "HTTP://Example.com/a"', link="http://example.com/a")
    assert evaluate('response.duration == "1.5s"', response__duration=timedelta(seconds=1.5))
    when = datetime(2017, 10, 1, tzinfo=UTC)
    assert evaluate('request.time == timestamp("2017-10-01T00:00:00Z")', request__time=when)
    assert evaluate("ratio == 0.5", ratio=0.5)
    assert evaluate("connection.mtls == true", connection__mtls=True)


def test_runtime_conversion_errors() -> None:
    with pytest.raises(EvaluationError, match="IP_ADDRESS"):
        evaluate("ip(request.path)", request__path="not-an-ip")
    with pytest.raises(EvaluationError, match="TIMESTAMP"):
        evaluate("timestamp(request.path)", request__path="yesterday")


def test_constants_are_folded() -> None:
    expression = compile_expression('ip("10.0.0.1") == ip("10.0.0.1") && "a" | "b" == "a"', V)
    assert expression.is_constant
    assert expression(MapBag()) is True


def test_expected_type() -> None:
    assert compile_expression('"10s"', V, ValueType.DURATION)(MapBag()) == timedelta(seconds=10)
    with pytest.raises(ExpressionError, match="expected a BOOL expression, got STRING"):
        compile_expression("request.path", V, ValueType.BOOL)


def test_tracking_bag_records_references_for_the_check_cache() -> None:
    bag = TrackingBag(MapBag({"request.headers": {"x-user": "a"}, "request.path": "/"}))
    rule = compile_expression(
        'request.headers["x-user"] == "a" && request.headers["x-other"] == "" '
        '&& request.path == "/" && (source.service | "s") == "s"',
        V,
    )
    assert rule(bag)
    assert list(bag.references()) == [
        Reference("request.headers", "x-user", True),
        Reference("request.headers", "x-other", False),
        Reference("request.path", None, True),
        Reference("source.service", None, False),
    ]


class FailingBag:
    """A bag whose every read fails (as an attribute producer may)."""

    def get(self, name: str, /) -> object:
        raise EvaluationError(f"cannot produce {name}")

    def get_key(self, name: str, key: str, /) -> str | None:
        raise EvaluationError(f"cannot produce {name}")


@pytest.mark.parametrize(
    ("text", "attributes", "expected", "references"),
    [
        ('source.service | "x"', {}, "x", [("source.service", None, False)]),
        ('source.service | "x"', {"source.service": ""}, "x", [("source.service", None, True)]),
        ('source.service | "x"', {"source.service": "s"}, "s", [("source.service", None, True)]),
        ("response.code | 200", {"response.code": 0}, 0, [("response.code", None, True)]),
        ("response.code | 200", {}, 200, [("response.code", None, False)]),
        ('response.duration | "0ms"', {}, timedelta(0), [("response.duration", None, False)]),
        ('source.labels["v"] | "x"', {}, "x", [("source.labels", None, False)]),
        ('source.labels["v"] | "x"', {"source.labels": {}}, "x", [("source.labels", "v", False)]),
        (
            'source.labels["v"] | "x"',
            {"source.labels": {"v": ""}},
            "x",
            [("source.labels", "v", True)],
        ),
        (
            'source.labels["v"] | "x"',
            {"source.labels": {"v": "1"}},
            "1",
            [("source.labels", "v", True)],
        ),
    ],
)
def test_attribute_or_constant(
    text: str, attributes: dict[str, object], expected: object, references: list[tuple[object]]
) -> None:
    bag = TrackingBag(MapBag(attributes))  # type: ignore[arg-type]
    assert compile_expression(text, V)(bag) == expected
    assert list(bag.references()) == [Reference(*r) for r in references]  # type: ignore[misc]


def test_attribute_or_constant_falls_back_when_the_read_fails() -> None:
    assert compile_expression('source.service | "x"', V)(FailingBag()) == "x"
    assert compile_expression('source.labels["v"] | "x"', V)(FailingBag()) == "x"
