"""Istio's Mixer expression language.

    >>> from istio.expr import MapBag, compile_expression, STANDARD_VOCABULARY
    >>> rule = compile_expression('request.headers["x-user"] == ""', STANDARD_VOCABULARY)
    >>> rule(MapBag({"request.headers": {}}))
    True

`compile_expression(text, manifest)` parses, type-checks against an attribute manifest (name ->
ValueType) and compiles to a closure over an attribute bag; errors carry the column. Pure: no
I/O, no asyncio.
"""

from istio.expr.bag import Bag, MapBag, Reference, TrackingBag
from istio.expr.compiler import FUNCTIONS, Expression, compile_expression, type_of
from istio.expr.errors import AttributeAbsent, EvaluationError, ExpressionError
from istio.expr.syntax import parse, unparse
from istio.expr.types import Manifest, Value, ValueType, python_type_ok
from istio.expr.values import format_duration, format_ip, parse_duration
from istio.expr.vocabulary import STANDARD_VOCABULARY

__all__ = [
    "FUNCTIONS",
    "STANDARD_VOCABULARY",
    "AttributeAbsent",
    "Bag",
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "Manifest",
    "MapBag",
    "Reference",
    "TrackingBag",
    "Value",
    "ValueType",
    "compile_expression",
    "format_duration",
    "format_ip",
    "parse",
    "parse_duration",
    "python_type_ok",
    "type_of",
    "unparse",
]
