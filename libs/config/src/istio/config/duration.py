"""Durations as Istio 0.2 accepted them: Go's time.ParseDuration forms (`500ms`, `1h30m`)."""

from __future__ import annotations

import re
from decimal import Decimal

from google.protobuf.duration_pb2 import Duration

_UNIT_NANOS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_NANOS = 315_576_000_000 * 1_000_000_000  # protobuf Duration's range: +-10,000 years


def parse_duration(text: str) -> int:
    """Parse `1h30m`, `500ms`, `1.5s`, `0` into nanoseconds; ValueError says what is wrong."""
    original = text
    text = text.strip()
    sign = 1
    if text[:1] in "+-" and text:
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise ValueError(f"invalid duration {original!r}: empty")
    position = 0
    total = Decimal(0)
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        total += Decimal(match.group(1)) * _UNIT_NANOS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(
            f"invalid duration {original!r}: use a number and unit such as 500ms, 7s, 15m, 1h30m"
        )
    nanos = int(total) * sign
    if abs(nanos) > _MAX_NANOS:
        raise ValueError(f"invalid duration {original!r}: out of range")
    return nanos


def format_duration(nanos: int) -> str:
    """The shortest Go form: 500ms, 7s, 1m30s, 1h30m, 1.5s."""
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("us", 1_000), ("ns", 1)):
            if nanos >= size:
                return sign + _decimal(nanos, size) + unit
    hours, rest = divmod(nanos, _UNIT_NANOS["h"])
    minutes, rest = divmod(rest, _UNIT_NANOS["m"])
    out = sign
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if rest:
        out += _decimal(rest, _UNIT_NANOS["s"]) + "s"
    return out


def _decimal(value: int, unit: int) -> str:
    whole, fraction = divmod(value, unit)
    if not fraction:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{fraction:0{digits}d}".rstrip("0")


def to_proto(nanos: int, out: Duration) -> None:
    seconds, rest = divmod(abs(nanos), 1_000_000_000)
    sign = -1 if nanos < 0 else 1
    out.seconds = sign * seconds
    out.nanos = sign * rest


def from_proto(value: Duration) -> int:
    return value.seconds * 1_000_000_000 + value.nanos
