from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio.config.duration import format_duration, parse_duration

SECOND = 1_000_000_000


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("500ms", SECOND // 2),
        ("7s", 7 * SECOND),
        ("15m", 900 * SECOND),
        ("1h30m", 5400 * SECOND),
        ("1.5s", 3 * SECOND // 2),
        ("0", 0),
        ("2h45m30.5s", (2 * 3600 + 45 * 60 + 30) * SECOND + SECOND // 2),
        ("300us", 300_000),
        ("10ns", 10),
    ],
)
def test_go_forms(text: str, nanos: int) -> None:
    assert parse_duration(text) == nanos


@pytest.mark.parametrize("text", ["", "7", "s", "7 s", "1d", "1h-30m", "5ms7", "ms"])
def test_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("nanos", "text"),
    [(SECOND // 2, "500ms"), (7 * SECOND, "7s"), (5400 * SECOND, "1h30m"), (90 * SECOND, "1m30s")],
)
def test_format_is_short(nanos: int, text: str) -> None:
    assert format_duration(nanos) == text


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_format_round_trips(nanos: int) -> None:
    assert parse_duration(format_duration(nanos)) == nanos
