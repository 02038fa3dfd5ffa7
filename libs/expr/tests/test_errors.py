"""Every compile error, word for word, against tests/golden/errors.txt (UPDATE_GOLDEN=1
rewrites it)."""

from __future__ import annotations

import os
from pathlib import Path

from istio.expr import STANDARD_VOCABULARY, ExpressionError, compile_expression

GOLDEN = Path(__file__).parent / "golden" / "errors.txt"

CASES = [
    "",
    "   ",
    "a ==",
    "(request.path",
    'request.path == "x',
    "request.path == `x",
    'request.path == "\\q"',
    "request.path @ 1",
    "12abc",
    "request.",
    'request.headers["a"',
    "match(request.path,",
    "request.path request.host",
    'f(1) == "a"',
    'mach(request.path, "a*")',
    'request.path.startsWith("a")',
    "match(request.path)",
    'match(request.size, "1")',
    "requst.path",
    'request.size == "big"',
    'source.ip == "10.0.0.1"',
    'request.time == "2017-01-01"',
    'ip("10.0.0.300")',
    'timestamp("2017-01-01")',
    'response.duration == "1 minute"',
    "request.path && true",
    "!request.path",
    'request.path < "b"',
    "request.size + 1 == 2",
    "-request.size",
    'request.path["k"]',
    "request.headers[1]",
    "99999999999999999999",
    "request.path | 1",
]


def render() -> str:
    lines = []
    for text in CASES:
        try:
            compile_expression(text, STANDARD_VOCABULARY)
            outcome = "compiles"
        except ExpressionError as error:
            outcome = str(error)
        lines.append(f"{text!r}\n    {outcome}\n")
    return "".join(lines)


def test_error_messages_match_the_golden_file() -> None:
    text = render()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
