"""Attribute values as text and as JSON, the way adapters show them (labels, log lines)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from istio.expr import format_duration, format_ip
from istio.expr.types import Value


def text(value: Value | None) -> str:
    """A label value: IP addresses dotted, durations as Go prints them (1.5s), times in RFC
    3339, maps as k=v pairs (sorted)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if type(value) is int or type(value) is float:  # before the ABC checks below
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return format_ip(value) if len(value) in (4, 16) else value.hex()
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def json_value(value: Value | None) -> Any:
    """A JSON-encodable form: numbers and booleans as they are, maps as objects, the rest as
    `text` gives them."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): v for k, v in sorted(value.items())}
    return text(value)


def number(value: Value) -> float:
    """A metric value: numbers as they are, durations in seconds, booleans as 0/1."""
    if type(value) is int or type(value) is float:
        return float(value)
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        return float(value)
    raise ValueError(f"a {type(value).__name__} is not a number")
