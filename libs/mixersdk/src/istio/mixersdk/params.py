"""Typed handler parameters: a small schema language for an adapter's `params`.

A handler's spec arrives as free-form YAML/JSON (a protobuf Struct). An adapter declares what
it accepts as an `Object` of `Field`s; `parse_params` turns the spec into plain Python values
(snake_case keys, durations as timedelta, enums upper-case, integers as int) or says, with the
field's path, what is wrong. Field names are accepted in snake_case or lowerCamelCase, as
Istio's protobuf JSON accepted both.

    SCHEMA = Object(
        Field("status", Object(Field("code", Int(), default=7), Field("message", Str()))),
        Field("valid_duration", Duration(), default=timedelta(seconds=5)),
    )
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from istio.expr import parse_duration

_NO_DEFAULT: Any = object()


class ParamType:
    """A type of parameter value; `describe` names it in errors."""

    def describe(self) -> str:
        raise NotImplementedError

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class ParamProblem:
    """What is wrong with one parameter: its path (`quotas[0].max_amount`) and why."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, Sequence):
        return "a list"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class Str(ParamType):
    pattern: str = ""  # a regular expression the whole value must match

    def describe(self) -> str:
        return "a string"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        if not isinstance(value, str):
            problems.append(ParamProblem(path, f"expected a string, got {_type_name(value)}"))
            return ""
        if self.pattern and not re.fullmatch(self.pattern, value):
            problems.append(ParamProblem(path, f"{value!r} does not match {self.pattern}"))
        return value


@dataclass(frozen=True, slots=True)
class Int(ParamType):
    minimum: int | None = None
    maximum: int | None = None

    def describe(self) -> str:
        return "an integer"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        number: int | None = None
        if isinstance(value, bool):
            number = None
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]+", value.strip()):
            # Protobuf JSON writes int64 as strings: charge: "1".
            number = int(value)
        if number is None:
            problems.append(ParamProblem(path, f"expected an integer, got {value!r}"))
            return 0
        if self.minimum is not None and number < self.minimum:
            problems.append(ParamProblem(path, f"must be at least {self.minimum}, got {number}"))
        if self.maximum is not None and number > self.maximum:
            problems.append(ParamProblem(path, f"must be at most {self.maximum}, got {number}"))
        return number


@dataclass(frozen=True, slots=True)
class Double(ParamType):
    minimum: float | None = None
    exclusive_minimum: bool = False

    def describe(self) -> str:
        return "a number"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or math.isnan(number):
            problems.append(ParamProblem(path, f"expected a number, got {value!r}"))
            return 0.0
        if self.minimum is not None and (
            number < self.minimum or (self.exclusive_minimum and number == self.minimum)
        ):
            relation = "greater than" if self.exclusive_minimum else "at least"
            problems.append(ParamProblem(path, f"must be {relation} {self.minimum}, got {number}"))
        return number


@dataclass(frozen=True, slots=True)
class Bool(ParamType):
    def describe(self) -> str:
        return "true or false"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        if not isinstance(value, bool):
            problems.append(ParamProblem(path, f"expected true or false, got {value!r}"))
            return False
        return value


@dataclass(frozen=True, slots=True)
class Duration(ParamType):
    """A Go duration string ("10s", "1m30s", "1.5s")."""

    minimum: timedelta | None = None

    def describe(self) -> str:
        return "a duration such as 10s"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        if isinstance(value, str):
            try:
                duration = parse_duration(value.strip())
            except ValueError:
                duration = None
        else:
            duration = None
        if duration is None:
            problems.append(
                ParamProblem(path, f"expected a duration such as 500ms or 10s, got {value!r}")
            )
            return timedelta(0)
        if self.minimum is not None and duration < self.minimum:
            problems.append(ParamProblem(path, f"must be at least {self.minimum}, got {value}"))
        return duration


@dataclass(frozen=True, slots=True)
class Enum(ParamType):
    """One of `values`, case-insensitively, or its number (protobuf JSON allows both, and 0.2's
    docs wrote `warning: 1`); `numbers` are the values' numbers in the adapter's proto (0, 1,
    ... when not given). The result is the value as declared."""

    values: tuple[str, ...]
    numbers: tuple[int, ...] = ()

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        if isinstance(value, str):
            for candidate in self.values:
                if candidate.lower() == value.lower():
                    return candidate
        if isinstance(value, int | float) and not isinstance(value, bool):
            numbers = self.numbers or tuple(range(len(self.values)))
            for candidate, number in zip(self.values, numbers, strict=True):
                if number == value:
                    return candidate
        problems.append(ParamProblem(path, f"expected {self.describe()}, got {value!r}"))
        return self.values[0]


@dataclass(frozen=True, slots=True)
class List(ParamType):
    item: ParamType

    def describe(self) -> str:
        return f"a list of {self.item.describe()}"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        if value is None:
            return []
        if isinstance(value, str) or not isinstance(value, Sequence):
            problems.append(ParamProblem(path, f"expected a list, got {_type_name(value)}"))
            return []
        return [self.item.convert(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]


@dataclass(frozen=True, slots=True)
class Map(ParamType):
    value: ParamType

    def describe(self) -> str:
        return f"a mapping of names to {self.value.describe()}"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            problems.append(ParamProblem(path, f"expected a mapping, got {_type_name(value)}"))
            return {}
        return {
            str(k): self.value.convert(v, _join(path, str(k)), problems) for k, v in value.items()
        }


@dataclass(frozen=True, slots=True)
class Field:
    """One named parameter; `name` in snake_case (lowerCamelCase is accepted too)."""

    name: str
    type: ParamType
    default: Any = _NO_DEFAULT
    required: bool = False
    doc: str = ""

    @property
    def camel(self) -> str:
        head, *rest = self.name.split("_")
        return head + "".join(p[:1].upper() + p[1:] for p in rest)

    def default_value(self) -> Any:
        if self.default is not _NO_DEFAULT:
            return self.default() if callable(self.default) else self.default
        if isinstance(self.type, Object):
            return self.type.convert({}, "", [])
        if isinstance(self.type, List):
            return []
        if isinstance(self.type, Map):
            return {}
        return None


@dataclass(frozen=True, slots=True, init=False)
class Object(ParamType):
    """A mapping with the given fields; unknown names are errors (with a suggestion)."""

    fields: tuple[Field, ...] = field(default=())
    one_of: tuple[tuple[str, ...], ...] = ()  # groups of field names of which at most one is set

    def __init__(self, *fields: Field, one_of: tuple[tuple[str, ...], ...] = ()) -> None:
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "one_of", one_of)

    def describe(self) -> str:
        return "a mapping"

    def convert(self, value: object, path: str, problems: list[ParamProblem]) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            problems.append(ParamProblem(path, f"expected a mapping, got {_type_name(value)}"))
            value = {}
        by_name = {f.name: f for f in self.fields} | {f.camel: f for f in self.fields}
        result: dict[str, Any] = {}
        seen: set[str] = set()
        order = {f.name: i for i, f in enumerate(self.fields)}
        # Declared order, unknown names after (sorted): the same problems in the same order
        # whatever order the mapping came in (a protobuf Struct's order is not fixed).
        items = sorted(
            value.items(),
            key=lambda kv: (
                order.get(by_name[kv[0]].name, 0) if kv[0] in by_name else len(order),
                str(kv[0]),
            ),
        )
        for key, item in items:
            spec = by_name.get(str(key))
            if spec is None:
                close = difflib.get_close_matches(str(key), list(by_name), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                known = ", ".join(f.camel for f in self.fields) or "none"
                problems.append(
                    ParamProblem(_join(path, str(key)), f"unknown field{hint} (known: {known})")
                )
                continue
            if spec.name in seen:
                problems.append(ParamProblem(_join(path, str(key)), "set twice"))
                continue
            seen.add(spec.name)
            result[spec.name] = spec.type.convert(item, _join(path, spec.camel), problems)
        for spec in self.fields:
            if spec.name in seen:
                continue
            if spec.required:
                problems.append(ParamProblem(_join(path, spec.camel), "is required"))
            result[spec.name] = spec.default_value()
        for group in self.one_of:
            chosen = [name for name in group if name in seen]
            if len(chosen) > 1:
                names = " and ".join(by_name[n].camel for n in chosen)
                problems.append(ParamProblem(path, f"{names} are exclusive: set only one"))
        return result


NO_PARAMS = Object()


def parse_params(schema: Object, value: object) -> tuple[dict[str, Any], list[ParamProblem]]:
    """The params as Python values, and every problem found (paths in lowerCamelCase)."""
    problems: list[ParamProblem] = []
    result = schema.convert(value, "", problems)
    return result, problems
