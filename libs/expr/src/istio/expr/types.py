"""Attribute value types and how each is held in Python.

The numbers are those of istio.mixer.v1.config.descriptor.ValueType, so a manifest's
`value_type` converts with `ValueType(number)`.

| type | Python value |
|---|---|
| STRING, DNS_NAME, EMAIL_ADDRESS, URI | str |
| INT64 | int |
| DOUBLE | float |
| BOOL | bool |
| TIMESTAMP | datetime (timezone-aware) |
| DURATION | timedelta |
| IP_ADDRESS | bytes, 4 or 16 of them (as on the wire) |
| STRING_MAP | Mapping[str, str] |
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime, timedelta

Value = str | int | float | bool | bytes | datetime | timedelta | Mapping[str, str]


class ValueType(enum.IntEnum):
    VALUE_TYPE_UNSPECIFIED = 0
    STRING = 1
    INT64 = 2
    DOUBLE = 3
    BOOL = 4
    TIMESTAMP = 5
    IP_ADDRESS = 6
    EMAIL_ADDRESS = 7
    URI = 8
    DNS_NAME = 9
    DURATION = 10
    STRING_MAP = 11

    def __str__(self) -> str:
        return self.name

    @property
    def is_string_like(self) -> bool:
        """Held as a str: a string literal may stand for one (checked when compiled)."""
        return self in _STRING_LIKE


_STRING_LIKE = frozenset(
    {ValueType.STRING, ValueType.DNS_NAME, ValueType.EMAIL_ADDRESS, ValueType.URI}
)

Manifest = Mapping[str, ValueType]
"""Attribute name -> type: what an attribute manifest declares."""


def python_type_ok(value_type: ValueType, value: object) -> bool:
    """Whether `value` is a valid Python value for `value_type` (see the module's table)."""
    if value_type.is_string_like:
        return isinstance(value, str)
    if value_type is ValueType.INT64:
        return isinstance(value, int) and not isinstance(value, bool)
    if value_type is ValueType.DOUBLE:
        return isinstance(value, float)
    if value_type is ValueType.BOOL:
        return isinstance(value, bool)
    if value_type is ValueType.TIMESTAMP:
        return isinstance(value, datetime)
    if value_type is ValueType.DURATION:
        return isinstance(value, timedelta)
    if value_type is ValueType.IP_ADDRESS:
        return isinstance(value, bytes) and len(value) in (4, 16)
    if value_type is ValueType.STRING_MAP:
        return isinstance(value, Mapping)
    return False
