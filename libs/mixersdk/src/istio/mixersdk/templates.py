"""Mixer's templates: what an instance of each kind holds, and how it is built from attributes.

An instance config (kind: metric, logentry, ...) gives, for every field of its template, an
attribute expression. `compile_instance` checks and compiles them once per config change into
an `InstanceBuilder`; `InstanceBuilder.build(bag)` evaluates them for one request and returns
the template's instance dataclass, which is what a handler receives.

| template | variety | fields (expressions; {} a map of them) |
|---|---|---|
| checknothing | check | - |
| listentry | check | value |
| logentry | report | variables{}, timestamp (TIMESTAMP), severity (STRING), |
| | | monitored_resource_type (STRING), monitored_resource_dimensions{} |
| metric | report | value, dimensions{}, monitored_resource_type (STRING), |
| | | monitored_resource_dimensions{} |
| quota | quota | dimensions{} |
| reportnothing | report | - |
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from istio.expr import (
    Bag,
    EvaluationError,
    Expression,
    ExpressionError,
    Manifest,
    MapBag,
    Value,
    ValueType,
)
from istio.expr import compile_expression as _compile


class Variety(enum.Enum):
    """When Mixer calls a template's handlers: Check (preconditions), Report, or quota
    allocation (within Check)."""

    CHECK = "check"
    REPORT = "report"
    QUOTA = "quota"


@dataclass(frozen=True, slots=True)
class CheckNothingInstance:
    name: str


@dataclass(frozen=True, slots=True)
class ListEntryInstance:
    name: str
    value: Value


@dataclass(frozen=True, slots=True)
class LogEntryInstance:
    name: str
    variables: Mapping[str, Value]
    timestamp: datetime | None = None
    severity: str = ""
    monitored_resource_type: str = ""
    monitored_resource_dimensions: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MetricInstance:
    name: str
    value: Value
    dimensions: Mapping[str, Value]
    monitored_resource_type: str = ""
    monitored_resource_dimensions: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QuotaInstance:
    name: str
    dimensions: Mapping[str, Value]


@dataclass(frozen=True, slots=True)
class ReportNothingInstance:
    name: str


Instance = (
    CheckNothingInstance
    | ListEntryInstance
    | LogEntryInstance
    | MetricInstance
    | QuotaInstance
    | ReportNothingInstance
)


@dataclass(frozen=True, slots=True)
class TemplateField:
    """One field of a template: an expression (or, with `is_map`, a map of name ->
    expression); `expected` is its type when the template fixes one."""

    name: str
    expected: ValueType | None = None
    is_map: bool = False
    required: bool = False


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    variety: Variety
    fields: tuple[TemplateField, ...]
    instance_type: type[Any]
    handler_method: str  # what a handler of this template implements

    def field(self, name: str) -> TemplateField | None:
        return next((f for f in self.fields if f.name == name), None)


TEMPLATES: Mapping[str, Template] = MappingProxyType(
    {
        t.name: t
        for t in (
            Template(
                "checknothing", Variety.CHECK, (), CheckNothingInstance, "handle_check_nothing"
            ),
            Template(
                "listentry",
                Variety.CHECK,
                (TemplateField("value", required=True),),
                ListEntryInstance,
                "handle_list_entry",
            ),
            Template(
                "logentry",
                Variety.REPORT,
                (
                    TemplateField("variables", is_map=True),
                    TemplateField("timestamp", ValueType.TIMESTAMP),
                    TemplateField("severity", ValueType.STRING),
                    TemplateField("monitored_resource_type", ValueType.STRING),
                    TemplateField("monitored_resource_dimensions", is_map=True),
                ),
                LogEntryInstance,
                "handle_log_entry",
            ),
            Template(
                "metric",
                Variety.REPORT,
                (
                    TemplateField("value", required=True),
                    TemplateField("dimensions", is_map=True),
                    TemplateField("monitored_resource_type", ValueType.STRING),
                    TemplateField("monitored_resource_dimensions", is_map=True),
                ),
                MetricInstance,
                "handle_metric",
            ),
            Template(
                "quota",
                Variety.QUOTA,
                (TemplateField("dimensions", is_map=True),),
                QuotaInstance,
                "handle_quota",
            ),
            Template(
                "reportnothing",
                Variety.REPORT,
                (),
                ReportNothingInstance,
                "handle_report_nothing",
            ),
        )
    }
)


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """What is wrong with one field of an instance config (`dimensions.source_service`)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


_FieldBuilder = Callable[[Bag], Any]


class _Failed:
    """A memo entry: the field could not be evaluated for this bag."""

    __slots__ = ("error",)

    def __init__(self, error: EvaluationError) -> None:
        self.error = error


@dataclass(frozen=True, slots=True)
class InstanceBuilder:
    """Builds one instance config's instance per request. `name` is the instance's full name
    (name.kind.namespace), which handlers see; `attributes` are those it may read."""

    name: str
    template: Template
    attributes: frozenset[str]
    # The instance type's arguments, positionally: the name, then each field's value when it
    # is the same for every request (a default, a constant expression), else None.
    _arguments: tuple[Any, ...] = field(repr=False)
    # The other fields, in order: (their place in `_arguments`, what they evaluate as a memo
    # key (the expression's text and type, or a map's), the builder).
    _variable: tuple[tuple[int, str, _FieldBuilder], ...] = field(repr=False)

    def build(self, bag: Bag, memo: dict[str, Any] | None = None) -> Any:
        """The instance for `bag`; EvaluationError when an expression cannot be evaluated.

        Builders of one config that share `memo` (a new dict per bag) evaluate a field they
        have in common once: Istio's metric instances repeat the same dimensions, so a
        request's four metrics cost one evaluation of them. Instances built so may then share
        their maps (which handlers only read)."""
        arguments = list(self._arguments)
        if memo is None:
            for place, _, build in self._variable:
                arguments[place] = build(bag)
            return self.template.instance_type(*arguments)
        for place, key, build in self._variable:
            value = memo.get(key, memo)
            if value is memo:
                try:
                    value = memo[key] = build(bag)
                except EvaluationError as error:
                    memo[key] = _Failed(error)
                    raise
            elif type(value) is _Failed:
                raise value.error
            arguments[place] = value
        return self.template.instance_type(*arguments)


def _map_builder(expressions: tuple[tuple[str, Expression], ...]) -> _FieldBuilder:
    def build(bag: Bag) -> dict[str, Value]:
        return {key: expression.evaluate(bag) for key, expression in expressions}

    return build


def compile_instance(
    name: str, template: Template, params: Mapping[str, Any], manifest: Manifest
) -> tuple[InstanceBuilder | None, list[FieldProblem]]:
    """Check and compile an instance config's fields (snake_case or lowerCamelCase names, as
    in the spec) against `manifest`."""
    problems: list[FieldProblem] = []
    by_name = {f.name: f for f in template.fields}
    by_name |= {_camel(f.name): f for f in template.fields}
    given: dict[str, object] = {}
    for key, value in params.items():
        spec = by_name.get(key)
        if spec is None:
            known = ", ".join(_camel(f.name) for f in template.fields) or "none"
            problems.append(FieldProblem(key, f"unknown field of {template.name} (known: {known})"))
        else:
            given[spec.name] = value
    builders: list[tuple[str, _FieldBuilder]] = []
    keys: dict[str, str] = {}
    constants: dict[str, Any] = {}  # field -> its value, when no request can change it
    attributes: set[str] = set()
    for spec in template.fields:
        value = given.get(spec.name)
        path = _camel(spec.name)
        if spec.is_map:
            mapping = value if isinstance(value, Mapping) else {}
            if value is not None and not isinstance(value, Mapping):
                problems.append(FieldProblem(path, "expected a mapping of names to expressions"))
            compiled: list[tuple[str, Expression]] = []
            for key, text in sorted(mapping.items()):
                expression = _field_expression(text, spec, manifest, f"{path}.{key}", problems)
                if expression is not None:
                    compiled.append((str(key), expression))
                    attributes |= expression.attributes
            builders.append((spec.name, _map_builder(tuple(compiled))))
            keys[spec.name] = repr(("map", spec.expected, [(k, e.text) for k, e in compiled]))
            if not compiled:
                constants[spec.name] = {}
            continue
        if value in (None, ""):
            if spec.required:
                problems.append(FieldProblem(path, "is required"))
            continue
        expression = _field_expression(value, spec, manifest, path, problems)
        if expression is not None:
            builders.append((spec.name, expression.evaluate))
            keys[spec.name] = repr(("value", spec.expected, expression.text))
            attributes |= expression.attributes
            if expression.is_constant:
                # One that fails fails for every request: left to fail (and be counted) per
                # request.
                with contextlib.suppress(EvaluationError):
                    constants[spec.name] = expression.evaluate(_NO_ATTRIBUTES)
    if problems:
        return None, problems
    # Every field of the instance type, positionally: a field left out gets its default, and
    # one whose value cannot change (a constant expression, an empty map) is made once here.
    given_builders = dict(builders)
    arguments: list[Any] = [name]
    variable: list[tuple[int, str, _FieldBuilder]] = []
    for slot in dataclasses.fields(template.instance_type)[1:]:  # [0] is the name
        build = given_builders.get(slot.name)
        if build is None:
            arguments.append(
                slot.default_factory()  # type: ignore[operator]
                if slot.default is dataclasses.MISSING
                else slot.default
            )
        elif slot.name in constants:
            arguments.append(constants[slot.name])
        else:
            variable.append((len(arguments), keys[slot.name], build))
            arguments.append(None)
    return InstanceBuilder(
        name, template, frozenset(attributes), tuple(arguments), tuple(variable)
    ), []


_NO_ATTRIBUTES = MapBag()


def _field_expression(
    text: object,
    spec: TemplateField,
    manifest: Manifest,
    path: str,
    problems: list[FieldProblem],
) -> Expression | None:
    if not isinstance(text, str):
        problems.append(FieldProblem(path, f"expected an expression (a string), got {text!r}"))
        return None
    try:
        return _compile(text, manifest, spec.expected)
    except ExpressionError as error:
        problems.append(FieldProblem(path, f"{text!r}: {error}"))
        return None


def check_expression(
    text: str, manifest: Manifest, expected: ValueType | None = None
) -> str | None:
    """Why `text` is not a valid expression of type `expected` (any type when None), or
    None when it is."""
    try:
        _compile(text, manifest, expected)
    except ExpressionError as error:
        return f"{text!r}: {error}"
    return None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)
