"""The parser: round trips of generated trees, arbitrary text, columns and precedence."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istio.expr import ExpressionError, parse, unparse
from istio.expr.syntax import Attribute, Binary, Call, Index, Literal, Node, Unary

_NAMES = st.sampled_from(["request.path", "source.labels", "a", "x_1.y2", "context.protocol"])
_STRINGS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_LEAVES = st.one_of(
    _NAMES.map(lambda n: Attribute(0, n)),
    _STRINGS.map(lambda s: Literal(0, s, "")),
    st.integers(min_value=0, max_value=2**63 - 1).map(lambda i: Literal(0, i, "")),
    st.floats(min_value=0, max_value=1e300, allow_nan=False).map(lambda f: Literal(0, f, "")),
    st.booleans().map(lambda b: Literal(0, b, "")),
)


def _extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.one_of(
        st.builds(
            lambda op, a, b: Binary(0, op, a, b),
            st.sampled_from(["==", "!=", "&&", "||", "|"]),
            children,
            children,
        ),
        st.builds(lambda a: Unary(0, "!", a), children),
        st.builds(lambda t, k: Index(0, t, k), _NAMES.map(lambda n: Attribute(0, n)), children),
        st.builds(
            lambda name, args: Call(0, name, tuple(args)),
            st.sampled_from(["match", "ip", "f"]),
            st.lists(children, max_size=3),
        ),
    )


_TREES = st.recursive(_LEAVES, _extend, max_leaves=12)


def _shape(node: Node) -> object:
    """A tree without its columns or literal spellings, for comparing."""
    if isinstance(node, Literal):
        return ("lit", type(node.value).__name__, node.value)
    if isinstance(node, Attribute):
        return ("attr", node.name)
    if isinstance(node, Index):
        return ("index", _shape(node.target), _shape(node.key))
    if isinstance(node, Call):
        return ("call", node.name, tuple(_shape(a) for a in node.args))
    if isinstance(node, Unary):
        return ("unary", node.op, _shape(node.operand))
    assert isinstance(node, Binary)
    return ("binary", node.op, _shape(node.left), _shape(node.right))


@given(_TREES)
@settings(max_examples=300)
def test_unparse_then_parse_gives_the_same_tree(tree: Node) -> None:
    assert _shape(parse(unparse(tree))) == _shape(tree)


@given(st.text(alphabet=string.printable + "µ", max_size=40))
@settings(max_examples=500)
def test_any_text_parses_or_fails_with_a_column(text: str) -> None:
    error: ExpressionError | None = None
    try:
        parse(text)
    except ExpressionError as caught:
        error = caught
    if error is not None:
        assert 1 <= error.column <= len(text) + 1
        assert str(error).startswith(f"column {error.column}: ")


def test_precedence_is_gos() -> None:
    assert unparse(parse('a | b == "x" && c || d')) == '((((a | b) == "x") && c) || d)'
    assert unparse(parse("!a && b")) == "(!(a) && b)"
    assert unparse(parse('m["k"] | "d"')) == '(m["k"] | "d")'


def test_selectors_flatten_into_one_attribute() -> None:
    assert parse("connection.received.bytes_total") == Attribute(
        1, "connection.received.bytes_total"
    )


def test_columns_point_at_operators_and_operands() -> None:
    tree = parse('request.path == "/x"')
    assert isinstance(tree, Binary)
    assert (tree.column, tree.left.column, tree.right.column) == (14, 1, 17)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('"a\\tb\\"c"', 'a\tb"c'),
        ("`raw\\n`", "raw\\n"),
        ("'single'", "single"),
        ('"\\x41\\u00e9"', "Aé"),
        ("0x1F", 31),
        ("1.5e3", 1500.0),
        ("-7", -7),
        ("TRUE", True),
    ],
)
def test_literals(text: str, value: object) -> None:
    node = parse(text)
    assert isinstance(node, Literal)
    assert node.value == value
    assert type(node.value) is type(value)
