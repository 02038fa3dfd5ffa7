"""Type-checking a parsed expression against an attribute manifest and compiling it to a
closure over an attribute bag.

Theory of operation. One pass over the tree gives every node a type and a function
`bag -> value`; constants are folded (so `ip("10.0.0.1")` is converted once, and a bad literal
is an error at its column, not at request time), and the common shapes (`attr == "literal"`,
`map["literal"]`) get closures that do one bag lookup and one comparison. The result is built
once per config change and then only called.

Semantics, as Istio's Mixer had them:
- a missing attribute makes evaluation raise AttributeAbsent; `a | b` yields `b` when `a` is
  absent, empty ("") or fails, and is how an expression supplies defaults;
- a missing key of a present map reads as "";
- `x == "abc*"` is a prefix match and `x == "*abc"` a suffix match (the right side is the
  pattern); DNS names, email domains and URI hosts compare case-insensitively, IP addresses by
  address (an IPv4-mapped IPv6 address equals its IPv4 form);
- a string literal stands for a DURATION (`"10s"`), DNS_NAME, EMAIL_ADDRESS or URI where the
  other operand (or the expected type) needs one, and is checked when compiled.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from istio.expr.bag import Bag
from istio.expr.errors import AttributeAbsent, EvaluationError, ExpressionError
from istio.expr.syntax import Attribute, Binary, Call, Index, Literal, Node, Unary, parse
from istio.expr.types import Manifest, Value, ValueType
from istio.expr.values import (
    check_dns_name,
    check_email,
    check_uri,
    comparison_key,
    parse_duration,
    parse_ip,
    parse_timestamp,
    wildcard_match,
)

Evaluator = Callable[[Bag], Value]
SUPPORTED_OPERATORS = "==, !=, &&, ||, | and !"


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression: its source, its type, and `evaluate(bag)`.

    `evaluate` raises AttributeAbsent or EvaluationError when the bag does not allow a value.
    `attributes` are the attribute names it may read; `constant` is set when it reads none.
    """

    text: str
    type: ValueType
    evaluate: Evaluator = field(repr=False, compare=False)
    attributes: frozenset[str] = frozenset()
    is_constant: bool = False

    def __call__(self, bag: Bag) -> Value:
        return self.evaluate(bag)


@dataclass(frozen=True, slots=True)
class _Typed:
    type: ValueType
    evaluate: Evaluator
    attributes: frozenset[str]
    constant: bool = False
    value: Value | None = None  # the value, when constant
    literal: Literal | None = None  # a string literal, which may stand for other types


@dataclass(frozen=True, slots=True)
class _Function:
    name: str
    args: tuple[ValueType, ...]
    result: ValueType
    call: Callable[..., Value]


def _string_arg(value: Value) -> str:
    assert isinstance(value, str)
    return value


FUNCTIONS: Mapping[str, _Function] = {
    f.name: f
    for f in (
        _Function(
            "match",
            (ValueType.STRING, ValueType.STRING),
            ValueType.BOOL,
            lambda s, p: wildcard_match(_string_arg(s), _string_arg(p)),
        ),
        _Function(
            "ip", (ValueType.STRING,), ValueType.IP_ADDRESS, lambda s: parse_ip(_string_arg(s))
        ),
        _Function(
            "timestamp",
            (ValueType.STRING,),
            ValueType.TIMESTAMP,
            lambda s: parse_timestamp(_string_arg(s)),
        ),
        _Function(
            "email",
            (ValueType.STRING,),
            ValueType.EMAIL_ADDRESS,
            lambda s: check_email(_string_arg(s)),
        ),
        _Function(
            "dnsName",
            (ValueType.STRING,),
            ValueType.DNS_NAME,
            lambda s: check_dns_name(_string_arg(s)),
        ),
        _Function("uri", (ValueType.STRING,), ValueType.URI, lambda s: check_uri(_string_arg(s))),
    )
}


def compile_expression(
    text: str, manifest: Manifest, expected: ValueType | None = None
) -> Expression:
    """Parse, type-check and compile `text`; ExpressionError (with its column) otherwise.

    With `expected`, the expression must have that type (a string literal may stand for a
    duration, DNS name, email address or URI).
    """
    typed = _Compiler(manifest).node(parse(text))
    if expected is not None and typed.type is not expected:
        coerced = _coerce(typed, expected)
        if coerced is None:
            raise ExpressionError(f"expected a {expected} expression, got {typed.type}", 1)
        typed = coerced
    return Expression(text, typed.type, typed.evaluate, typed.attributes, typed.constant)


def type_of(text: str, manifest: Manifest) -> ValueType:
    """The type of an expression (ExpressionError when it has none)."""
    return compile_expression(text, manifest).type


def _constant(value: Value, value_type: ValueType, literal: Literal | None = None) -> _Typed:
    return _Typed(value_type, lambda bag: value, frozenset(), True, value, literal)


def _coerce(typed: _Typed, wanted: ValueType) -> _Typed | None:
    """A string literal as a value of `wanted`, or None when it cannot stand for one."""
    literal = typed.literal
    if literal is None or not isinstance(literal.value, str):
        return None
    text = literal.value
    try:
        if wanted is ValueType.DURATION:
            return _constant(parse_duration(text), wanted)
        if wanted is ValueType.DNS_NAME:
            return _constant(check_dns_name(text), wanted)
        if wanted is ValueType.EMAIL_ADDRESS:
            return _constant(check_email(text), wanted)
        if wanted is ValueType.URI:
            return _constant(check_uri(text), wanted)
    except (ValueError, EvaluationError):
        raise ExpressionError(
            f"{literal.text} is not a valid {wanted} literal", literal.column
        ) from None
    return None


class _Compiler:
    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def node(self, node: Node) -> _Typed:
        if isinstance(node, Literal):
            return self.literal(node)
        if isinstance(node, Attribute):
            return self.attribute(node)
        if isinstance(node, Index):
            return self.index(node)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, Unary):
            return self.unary(node)
        assert isinstance(node, Binary)
        return self.binary(node)

    def literal(self, node: Literal) -> _Typed:
        value = node.value
        if isinstance(value, bool):
            return _constant(value, ValueType.BOOL)
        if isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise ExpressionError(f"integer {node.text} does not fit in INT64", node.column)
            return _constant(value, ValueType.INT64)
        if isinstance(value, float):
            return _constant(value, ValueType.DOUBLE)
        return _constant(value, ValueType.STRING, node)

    def attribute(self, node: Attribute) -> _Typed:
        name = node.name
        value_type = self.manifest.get(name)
        if value_type is None:
            close = difflib.get_close_matches(name, list(self.manifest), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ExpressionError(f"unknown attribute {name}{hint}", node.column)

        def get(bag: Bag) -> Value:
            value = bag.get(name)
            if value is None:
                raise AttributeAbsent(name)
            return value

        return _Typed(value_type, get, frozenset({name}))

    def index(self, node: Index) -> _Typed:
        target = self.node(node.target)
        if target.type is not ValueType.STRING_MAP:
            raise ExpressionError(
                f"only STRING_MAP values can be indexed, not {target.type}", node.column
            )
        key = self.node(node.key)
        if key.type is not ValueType.STRING:
            raise ExpressionError(f"a map key must be a STRING, not {key.type}", node.key.column)
        attributes = target.attributes | key.attributes
        if isinstance(node.target, Attribute):
            name = node.target.name
            if key.constant:
                constant_key = key.value
                assert isinstance(constant_key, str)

                def lookup(bag: Bag) -> Value:
                    value = bag.get_key(name, constant_key)
                    return "" if value is None else value

                return _Typed(ValueType.STRING, lookup, attributes)
            key_of = key.evaluate

            def lookup_dynamic(bag: Bag) -> Value:
                map_key = key_of(bag)
                assert isinstance(map_key, str)
                value = bag.get_key(name, map_key)
                return "" if value is None else value

            return _Typed(ValueType.STRING, lookup_dynamic, attributes)
        map_of, key_of = target.evaluate, key.evaluate

        def lookup_value(bag: Bag) -> Value:
            mapping, map_key = map_of(bag), key_of(bag)
            assert isinstance(mapping, Mapping)
            assert isinstance(map_key, str)
            return str(mapping.get(map_key, ""))

        return _Typed(ValueType.STRING, lookup_value, attributes)

    def call(self, node: Call) -> _Typed:
        if node.target is not None:
            raise ExpressionError(
                f"unknown method {node.name}(); the functions are "
                + ", ".join(f"{n}()" for n in FUNCTIONS),
                node.column,
            )
        function = FUNCTIONS.get(node.name)
        if function is None:
            close = difflib.get_close_matches(node.name, list(FUNCTIONS), n=1)
            hint = f"; did you mean {close[0]}()?" if close else ""
            raise ExpressionError(f"unknown function {node.name}(){hint}", node.column)
        signature = ", ".join(str(t) for t in function.args)
        if len(node.args) != len(function.args):
            raise ExpressionError(
                f"{function.name}({signature}) takes {len(function.args)} argument"
                f"{'s' if len(function.args) != 1 else ''}, got {len(node.args)}",
                node.column,
            )
        args = [self.node(a) for a in node.args]
        for position, (arg, wanted) in enumerate(zip(args, function.args, strict=True)):
            if arg.type is not wanted and not (
                wanted is ValueType.STRING and arg.type.is_string_like
            ):
                raise ExpressionError(
                    f"argument {position + 1} of {function.name}() must be {wanted}, "
                    f"got {arg.type}",
                    node.args[position].column,
                )
        attributes = frozenset().union(*(a.attributes for a in args))
        call = function.call
        if all(a.constant for a in args):
            try:
                value = call(*(a.value for a in args))
            except EvaluationError as error:
                raise ExpressionError(str(error), node.args[0].column) from None
            return _constant(value, function.result)
        evaluators = [a.evaluate for a in args]
        if len(evaluators) == 1:
            only = evaluators[0]
            return _Typed(function.result, lambda bag: call(only(bag)), attributes)
        first, second = evaluators
        return _Typed(function.result, lambda bag: call(first(bag), second(bag)), attributes)

    def unary(self, node: Unary) -> _Typed:
        if node.op != "!":
            raise ExpressionError(
                f"operator {node.op!r} is not supported; Mixer expressions have "
                f"{SUPPORTED_OPERATORS}",
                node.column,
            )
        operand = self.node(node.operand)
        if operand.type is not ValueType.BOOL:
            raise ExpressionError(f"! needs a BOOL operand, got {operand.type}", node.column)
        if operand.constant:
            return _constant(not operand.value, ValueType.BOOL)
        inner = operand.evaluate
        return _Typed(ValueType.BOOL, lambda bag: not inner(bag), operand.attributes)

    def binary(self, node: Binary) -> _Typed:
        op = node.op
        if op in ("&&", "||"):
            return self.logical(node)
        if op in ("==", "!="):
            return self.equality(node)
        if op == "|":
            return self.default(node)
        raise ExpressionError(
            f"operator {op!r} is not supported; Mixer expressions have {SUPPORTED_OPERATORS}",
            node.column,
        )

    def unify(self, node: Binary) -> tuple[_Typed, _Typed]:
        left, right = self.node(node.left), self.node(node.right)
        if left.type is right.type:
            return left, right
        coerced = _coerce(right, left.type)
        if coerced is not None:
            return left, coerced
        coerced = _coerce(left, right.type)
        if coerced is not None:
            return coerced, right
        hint = ""
        if ValueType.IP_ADDRESS in (left.type, right.type):
            hint = '; write an address as ip("10.0.0.1")'
        elif ValueType.TIMESTAMP in (left.type, right.type):
            hint = '; write a time as timestamp("2017-01-01T00:00:00Z")'
        raise ExpressionError(
            f"{node.op} needs operands of the same type, got {left.type} and {right.type}{hint}",
            node.column,
        )

    def logical(self, node: Binary) -> _Typed:
        left, right = self.node(node.left), self.node(node.right)
        for side, operand in ((left, node.left), (right, node.right)):
            if side.type is not ValueType.BOOL:
                raise ExpressionError(
                    f"{node.op} needs BOOL operands, got {side.type}", operand.column
                )
        attributes = left.attributes | right.attributes
        first, second = left.evaluate, right.evaluate
        if node.op == "&&":
            if left.constant and right.constant:
                return _constant(bool(left.value and right.value), ValueType.BOOL)
            return _Typed(ValueType.BOOL, lambda bag: first(bag) and second(bag), attributes)
        if left.constant and right.constant:
            return _constant(bool(left.value or right.value), ValueType.BOOL)
        return _Typed(ValueType.BOOL, lambda bag: first(bag) or second(bag), attributes)

    def equality(self, node: Binary) -> _Typed:
        left, right = self.unify(node)
        negate = node.op == "!="
        attributes = left.attributes | right.attributes
        equal = _equality(left, right)
        if left.constant and right.constant:
            result = equal(_no_bag)
            return _constant(result != negate, ValueType.BOOL)
        if negate:
            return _Typed(ValueType.BOOL, lambda bag: not equal(bag), attributes)
        return _Typed(ValueType.BOOL, equal, attributes)

    def default(self, node: Binary) -> _Typed:
        left, right = self.unify(node)
        attributes = left.attributes | right.attributes
        if left.constant:
            if left.value not in ("", None):
                return left
            return right
        first, second = left.evaluate, right.evaluate
        fused = _attribute_or_constant(node.left, left, right)
        if fused is not None:
            return _Typed(left.type, fused, attributes, literal=None)

        def first_present(bag: Bag) -> Value:
            try:
                value = first(bag)
            except EvaluationError:
                return second(bag)
            if value == "":
                return second(bag)
            return value

        return _Typed(left.type, first_present, attributes, literal=None)


def _attribute_or_constant(node: Node, left: _Typed, right: _Typed) -> Evaluator | None:
    """`attribute | constant` and `attribute["key"] | constant` (most defaults Istio's configs
    write, evaluated for every request) as one closure instead of three; the same reads of
    the bag and the same answers as the general form."""
    if not right.constant or left.constant:
        return None
    fallback = right.value
    if isinstance(node, Attribute):
        name = node.name

        def attribute_or(bag: Bag) -> Value:
            try:
                value = bag.get(name)
            except EvaluationError:
                return fallback  # type: ignore[return-value]
            if value is None or value == "":
                return fallback  # type: ignore[return-value]
            return value

        return attribute_or
    if (
        isinstance(node, Index)
        and isinstance(node.target, Attribute)
        and isinstance(node.key, Literal)
        and isinstance(node.key.value, str)
    ):
        name, key = node.target.name, node.key.value

        def key_or(bag: Bag) -> Value:
            try:
                value = bag.get_key(name, key)
            except EvaluationError:
                return fallback  # type: ignore[return-value]
            if value is None or value == "":
                return fallback  # type: ignore[return-value]
            return value

        return key_or
    return None


class _NoBag:
    def get(self, name: str, /) -> Value | None:
        raise AssertionError("a constant expression read an attribute")

    def get_key(self, name: str, key: str, /) -> str | None:
        raise AssertionError("a constant expression read an attribute")


_no_bag = _NoBag()


def _equality(left: _Typed, right: _Typed) -> Callable[[Bag], bool]:
    """bag -> left == right, with the type's comparison (wildcards for strings)."""
    first, second = left.evaluate, right.evaluate
    if left.type is ValueType.STRING:
        if right.constant:
            pattern = right.value
            assert isinstance(pattern, str)
            if pattern.endswith("*"):
                prefix = pattern[:-1]
                return lambda bag: _text(first(bag)).startswith(prefix)
            if pattern.startswith("*"):
                suffix = pattern[1:]
                return lambda bag: _text(first(bag)).endswith(suffix)
            return lambda bag: first(bag) == pattern
        return lambda bag: wildcard_match(_text(first(bag)), _text(second(bag)))
    key = comparison_key(left.type)
    if key is None:
        if right.constant:
            constant = right.value
            return lambda bag: first(bag) == constant
        return lambda bag: first(bag) == second(bag)
    if right.constant:
        constant_key = key(right.value)
        return lambda bag: key(first(bag)) == constant_key
    return lambda bag: key(first(bag)) == key(second(bag))


def _text(value: Value) -> str:
    assert isinstance(value, str)
    return value
