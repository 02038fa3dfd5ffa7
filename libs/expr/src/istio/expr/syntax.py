"""Parsing Mixer expressions into a small tree, every node with its column.

The language is the subset of Go expression syntax Istio's Mixer accepted: attribute names
(`request.headers`, dotted selectors flattened into one name), string literals ("..." with Go
escapes, `raw`, and '...'), integers (decimal, 0x hex), doubles, `true`/`false`, calls
`f(a, b)`, map index `m["key"]`, unary `!` and `-` (on numbers), and the binary operators
`||`, `&&`, `==`, `!=` and `|`, with Go's precedences:

    ||  <  &&  <  == != (and the comparisons)  <  | (and + -)  <  (* / ...)

Operators Go has but Mixer does not (`<`, `+`, ...) parse, so that the checker can say they are
not supported at their column, rather than a confusing "unexpected character".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from istio.expr.errors import ExpressionError


@dataclass(frozen=True, slots=True)
class Node:
    column: int  # 1-based; for operators, the operator's column


@dataclass(frozen=True, slots=True)
class Literal(Node):
    value: str | int | float | bool
    text: str


@dataclass(frozen=True, slots=True)
class Attribute(Node):
    name: str


@dataclass(frozen=True, slots=True)
class Index(Node):
    target: Node
    key: Node


@dataclass(frozen=True, slots=True)
class Call(Node):
    name: str
    args: tuple[Node, ...]
    target: Node | None = None  # `a.b.f(x)`: a method call on attribute a.b


@dataclass(frozen=True, slots=True)
class Unary(Node):
    op: str
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary(Node):
    op: str
    left: Node
    right: Node


# Token kinds.
_IDENT, _INT, _FLOAT, _STRING, _OP, _END = "identifier", "int", "float", "string", "op", "end"

_BINARY_PRECEDENCE = {
    "||": 1,
    "&&": 2,
    "==": 3,
    "!=": 3,
    "<": 3,
    "<=": 3,
    ">": 3,
    ">=": 3,
    "|": 4,
    "+": 4,
    "-": 4,
    "^": 4,
    "*": 5,
    "/": 5,
    "%": 5,
    "<<": 5,
    ">>": 5,
    "&": 5,
    "&^": 5,
}
_OPERATORS = sorted({*_BINARY_PRECEDENCE, "!", "(", ")", "[", "]", ",", "."}, key=len, reverse=True)
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    column: int
    value: str | int | float | None = None


def _describe(token: _Token) -> str:
    if token.kind == _END:
        return "end of expression"
    if token.kind == _STRING:
        return f"string {token.text}"
    return f"{token.kind} {token.text!r}" if token.kind != _OP else repr(token.text)


def tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        char = text[position]
        column = position + 1
        if char in " \t\r\n":
            position += 1
            continue
        if char in "\"'`":
            value, end = _string(text, position)
            tokens.append(_Token(_STRING, text[position:end], column, value))
            position = end
            continue
        if char.isdigit() or (char == "." and text[position + 1 : position + 2].isdigit()):
            match = _NUMBER.match(text, position)
            assert match is not None
            literal = match.group()
            end = match.end()
            if end < len(text) and (text[end].isalnum() or text[end] == "_"):
                bad = _IDENT_RE.match(text, end)
                stop = bad.end() if bad else end + 1
                raise ExpressionError(f"malformed number {text[position:stop]!r}", column)
            if literal[:2] in ("0x", "0X"):
                tokens.append(_Token(_INT, literal, column, int(literal, 16)))
            elif any(c in literal for c in ".eE"):
                tokens.append(_Token(_FLOAT, literal, column, float(literal)))
            else:
                tokens.append(_Token(_INT, literal, column, int(literal)))
            position = end
            continue
        match = _IDENT_RE.match(text, position)
        if match:
            tokens.append(_Token(_IDENT, match.group(), column))
            position = match.end()
            continue
        for operator in _OPERATORS:
            if text.startswith(operator, position):
                tokens.append(_Token(_OP, operator, column))
                position += len(operator)
                break
        else:
            raise ExpressionError(f"unexpected character {char!r}", column)
    tokens.append(_Token(_END, "", len(text) + 1))
    return tokens


def _string(text: str, start: int) -> tuple[str, int]:
    """The value of the string literal at `start`, and the index just past it."""
    quote = text[start]
    position = start + 1
    if quote == "`":
        end = text.find("`", position)
        if end < 0:
            raise ExpressionError("unterminated raw string", start + 1)
        return text[position:end], end + 1
    out: list[str] = []
    while position < len(text):
        char = text[position]
        if char == quote:
            return "".join(out), position + 1
        if char == "\n":
            break
        if char != "\\":
            out.append(char)
            position += 1
            continue
        escape = text[position + 1 : position + 2]
        if escape in _ESCAPES:
            out.append(_ESCAPES[escape])
            position += 2
        elif escape in ("'", '"'):
            out.append(escape)
            position += 2
        elif escape in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[escape]
            digits = text[position + 2 : position + 2 + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ExpressionError(f"malformed \\{escape} escape", position + 1)
            out.append(chr(int(digits, 16)))
            position += 2 + width
        else:
            raise ExpressionError(f"unknown escape sequence \\{escape}", position + 1)
    raise ExpressionError("unterminated string", start + 1)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.position = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.position]

    def advance(self) -> _Token:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def expect(self, operator: str) -> _Token:
        token = self.token
        if token.kind != _OP or token.text != operator:
            raise ExpressionError(f"expected {operator!r}, found {_describe(token)}", token.column)
        return self.advance()

    def expression(self, min_precedence: int = 1) -> Node:
        left = self.unary()
        while True:
            token = self.token
            precedence = _BINARY_PRECEDENCE.get(token.text) if token.kind == _OP else None
            if precedence is None or precedence < min_precedence:
                return left
            self.advance()
            right = self.expression(precedence + 1)
            left = Binary(token.column, token.text, left, right)

    def unary(self) -> Node:
        token = self.token
        if token.kind == _OP and token.text in ("!", "-", "+"):
            self.advance()
            operand = self.unary()
            if token.text == "-" and isinstance(operand, Literal):
                value = operand.value
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return Literal(token.column, -value, "-" + operand.text)
            return Unary(token.column, token.text, operand)
        return self.postfix(self.primary())

    def primary(self) -> Node:
        token = self.advance()
        if token.kind in (_INT, _FLOAT, _STRING):
            assert token.value is not None
            return Literal(token.column, token.value, token.text)
        if token.kind == _IDENT:
            if token.text.lower() in ("true", "false"):
                return Literal(token.column, token.text.lower() == "true", token.text)
            return self.selector(token)
        if token.kind == _OP and token.text == "(":
            inner = self.expression()
            self.expect(")")
            return inner
        if token.kind == _END:
            raise ExpressionError("expected an operand, found end of expression", token.column)
        raise ExpressionError(f"expected an operand, found {_describe(token)}", token.column)

    def selector(self, first: _Token) -> Node:
        """`a.b.c` is one attribute; `a.b.f(x)` calls f on attribute a.b; `f(x)` calls f."""
        parts = [first.text]
        while self.token.kind == _OP and self.token.text == ".":
            self.advance()
            name = self.advance()
            if name.kind != _IDENT:
                raise ExpressionError(
                    f"expected a name after '.', found {_describe(name)}", name.column
                )
            parts.append(name.text)
        if self.token.kind == _OP and self.token.text == "(":
            self.advance()
            args = self.arguments()
            if len(parts) == 1:
                return Call(first.column, parts[0], args)
            target = Attribute(first.column, ".".join(parts[:-1]))
            return Call(first.column, parts[-1], args, target)
        return Attribute(first.column, ".".join(parts))

    def arguments(self) -> tuple[Node, ...]:
        args: list[Node] = []
        if self.token.kind == _OP and self.token.text == ")":
            self.advance()
            return ()
        while True:
            args.append(self.expression())
            token = self.advance()
            if token.kind == _OP and token.text == ")":
                return tuple(args)
            if token.kind != _OP or token.text != ",":
                raise ExpressionError(
                    f"expected ',' or ')' in the arguments, found {_describe(token)}",
                    token.column,
                )

    def postfix(self, node: Node) -> Node:
        while self.token.kind == _OP and self.token.text == "[":
            bracket = self.advance()
            key = self.expression()
            self.expect("]")
            node = Index(bracket.column, node, key)
        if self.token.kind == _OP and self.token.text in (".", "("):
            token = self.token
            raise ExpressionError(f"unexpected {token.text!r}", token.column)
        return node


def parse(text: str) -> Node:
    """The tree of one expression; ExpressionError (with its column) when it is malformed."""
    if not text.strip():
        raise ExpressionError("empty expression", 1)
    parser = _Parser(text)
    node = parser.expression()
    token = parser.token
    if token.kind != _END:
        raise ExpressionError(f"unexpected {_describe(token)} after the expression", token.column)
    return node


def unparse(node: Node) -> str:
    """Canonical text for a tree: parse(unparse(t)) == t up to columns."""
    if isinstance(node, Literal):
        value = node.value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return _quote(value)
        if isinstance(value, float):
            return repr(value) if value == value and abs(value) != float("inf") else "0.0"
        return str(value)
    if isinstance(node, Attribute):
        return node.name
    if isinstance(node, Index):
        return f"{unparse(node.target)}[{unparse(node.key)}]"
    if isinstance(node, Call):
        args = ", ".join(unparse(a) for a in node.args)
        prefix = f"{unparse(node.target)}." if node.target is not None else ""
        return f"{prefix}{node.name}({args})"
    if isinstance(node, Unary):
        return f"{node.op}({unparse(node.operand)})"
    assert isinstance(node, Binary)
    return f"({unparse(node.left)} {node.op} {unparse(node.right)})"


def _quote(value: str) -> str:
    out = ['"']
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\U{code:08x}")
    out.append('"')
    return "".join(out)
