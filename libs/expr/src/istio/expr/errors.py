"""Errors of the expression language: at compile time with a column, at run time with a cause."""

from __future__ import annotations


class ExpressionError(Exception):
    """An expression is malformed or ill-typed. `column` is 1-based."""

    def __init__(self, message: str, column: int) -> None:
        self.message = message
        self.column = column
        super().__init__(f"column {column}: {message}")


class EvaluationError(Exception):
    """An expression could not be evaluated for one attribute bag (bad input to ip(), ...)."""


class AttributeAbsent(EvaluationError):
    """An attribute the expression needs is not in the bag (the `|` operator catches it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"attribute {name} is absent")
