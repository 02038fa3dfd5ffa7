"""Plain values (parsed YAML/JSON) to protobuf messages and back, with precise errors.

protobuf's json_format would do most of this, but Istio 0.2's YAML needs more and its errors
need less: durations in Go form (`500ms`), enum names in any case, and every problem reported
with its field path (`route[1].weight`) instead of stopping at the first one.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from istio.config import duration
from istio.config.errors import Problem

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_TYPE_NAMES = {
    FieldDescriptor.CPPTYPE_INT32: "an integer",
    FieldDescriptor.CPPTYPE_INT64: "an integer",
    FieldDescriptor.CPPTYPE_UINT32: "a non-negative integer",
    FieldDescriptor.CPPTYPE_UINT64: "a non-negative integer",
    FieldDescriptor.CPPTYPE_DOUBLE: "a number",
    FieldDescriptor.CPPTYPE_FLOAT: "a number",
    FieldDescriptor.CPPTYPE_BOOL: "true or false",
    FieldDescriptor.CPPTYPE_STRING: "a string",
}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def fill_message(value: object, message: Message, path: str = "") -> list[Problem]:
    """Set `message` from a parsed YAML/JSON value; return every problem found."""
    full_name = message.DESCRIPTOR.full_name
    special = _WELL_KNOWN_FROM.get(full_name)
    if special is not None:
        return special(value, message, path)
    if not isinstance(value, Mapping):
        return [Problem(f"expected a mapping, got {_describe(value)}", path)]
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    problems: list[Problem] = []
    seen_oneofs: dict[str, str] = {}
    for key, item in value.items():
        field = _field_by_name(descriptor, key)
        field_path = _join(path, str(key))
        if field is None:
            known = ", ".join(sorted(f.json_name for f in descriptor.fields))
            problems.append(Problem(f"unknown field {key!r} (known fields: {known})", field_path))
            continue
        if item is None:
            continue
        if field.containing_oneof is not None:
            group = field.containing_oneof.name
            if group in seen_oneofs:
                problems.append(
                    Problem(
                        f"only one of {seen_oneofs[group]!r} and {key!r} may be set", field_path
                    )
                )
                continue
            seen_oneofs[group] = str(key)
        problems.extend(_fill_field(item, message, field, field_path))
    return problems


def _field_by_name(descriptor: Descriptor, key: object) -> FieldDescriptor | None:
    if not isinstance(key, str):
        return None
    field = descriptor.fields_by_name.get(key)
    if field is not None:
        return field
    for candidate in descriptor.fields:
        if candidate.json_name == key:
            return candidate
    return None


def _message_type(field: FieldDescriptor) -> Descriptor:
    descriptor = field.message_type
    assert descriptor is not None, field.full_name
    return descriptor


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    descriptor = field.enum_type
    assert descriptor is not None, field.full_name
    return descriptor


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and bool(
        _message_type(field).GetOptions().map_entry
    )


def _fill_field(
    value: object, message: Message, field: FieldDescriptor, path: str
) -> list[Problem]:
    if _is_map(field):
        if not isinstance(value, Mapping):
            return [Problem(f"expected a mapping, got {_describe(value)}", path)]
        problems: list[Problem] = []
        key_field = _message_type(field).fields_by_name["key"]
        value_field = _message_type(field).fields_by_name["value"]
        target = getattr(message, field.name)
        for raw_key, item in value.items():
            item_path = (
                f"{path}[{raw_key!r}]" if not isinstance(raw_key, str) else _join(path, raw_key)
            )
            key, key_problems = _scalar(raw_key, key_field, item_path, map_key=True)
            if key_problems:
                problems.extend(key_problems)
                continue
            if value_field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                problems.extend(fill_message(item, target[key], item_path))
            else:
                converted, item_problems = _scalar(item, value_field, item_path)
                problems.extend(item_problems)
                if not item_problems:
                    target[key] = converted
        return problems
    if field.is_repeated:
        if not isinstance(value, list):
            return [Problem(f"expected a list, got {_describe(value)}", path)]
        problems = []
        target = getattr(message, field.name)
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                problems.extend(fill_message(item, target.add(), item_path))
            else:
                converted, item_problems = _scalar(item, field, item_path)
                problems.extend(item_problems)
                if not item_problems:
                    target.append(converted)
        return problems
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return fill_message(value, getattr(message, field.name), path)
    converted, problems = _scalar(value, field, path)
    if not problems:
        setattr(message, field.name, converted)
    return problems


def _scalar(
    value: object, field: FieldDescriptor, path: str, *, map_key: bool = False
) -> tuple[Any, list[Problem]]:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum(value, _enum_type(field), path)
    if cpp in _INT_RANGES:
        if map_key and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                return None, [Problem(f"expected an integer key, got {value!r}", path)]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return None, [Problem(f"expected {_TYPE_NAMES[cpp]}, got {_describe(value)}", path)]
        low, high = _INT_RANGES[cpp]
        if not low <= value <= high:
            return None, [Problem(f"{value} is out of range [{low}, {high}]", path)]
        return value, []
    if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, [Problem(f"expected a number, got {_describe(value)}", path)]
        if not math.isfinite(value):
            return None, [Problem(f"expected a finite number, got {value}", path)]
        return float(value), []
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        if map_key and value in ("true", "false"):
            return value == "true", []
        if not isinstance(value, bool):
            return None, [Problem(f"expected true or false, got {_describe(value)}", path)]
        return value, []
    if field.type == FieldDescriptor.TYPE_BYTES:
        if not isinstance(value, str):
            return None, [Problem(f"expected base64 text, got {_describe(value)}", path)]
        try:
            return base64.b64decode(value, validate=True), []
        except binascii.Error:
            return None, [Problem("expected base64 text", path)]
    if not isinstance(value, str):
        return None, [Problem(f"expected a string, got {_describe(value)}", path)]
    return value, []


def _enum(value: object, enum: EnumDescriptor, path: str) -> tuple[Any, list[Problem]]:
    names = [v.name for v in enum.values]
    if isinstance(value, str):
        for candidate in enum.values:
            if candidate.name.lower() == value.lower():
                return candidate.number, []
    elif isinstance(value, int) and not isinstance(value, bool) and value in enum.values_by_number:
        return value, []
    return None, [Problem(f"invalid value {value!r}: expected one of {', '.join(names)}", path)]


def _duration_from(value: object, message: Message, path: str) -> list[Problem]:
    assert isinstance(message, Duration)
    if not isinstance(value, str):
        return [Problem(f"expected a duration such as 500ms or 7s, got {_describe(value)}", path)]
    try:
        duration.to_proto(duration.parse_duration(value), message)
    except ValueError as error:
        return [Problem(str(error), path)]
    return []


def _timestamp_from(value: object, message: Message, path: str) -> list[Problem]:
    assert isinstance(message, Timestamp)
    if isinstance(value, datetime):
        message.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
        return []
    if not isinstance(value, str):
        return [Problem(f"expected an RFC 3339 timestamp, got {_describe(value)}", path)]
    try:
        message.FromJsonString(value)
    except ValueError:
        return [Problem(f"invalid timestamp {value!r}: expected RFC 3339", path)]
    return []


def _struct_from(value: object, message: Message, path: str) -> list[Problem]:
    assert isinstance(message, struct_pb2.Struct)
    if not isinstance(value, Mapping):
        return [Problem(f"expected a mapping, got {_describe(value)}", path)]
    try:
        message.update(cast(dict[str, Any], _plain(value)))
    except (ValueError, TypeError) as error:
        return [Problem(f"unsupported value: {error}", path)]
    return []


def _value_from(value: object, message: Message, path: str) -> list[Problem]:
    assert isinstance(message, struct_pb2.Value)
    holder = struct_pb2.Struct()
    try:
        holder.update({"v": cast(Any, _plain(value))})
    except (ValueError, TypeError) as error:
        return [Problem(f"unsupported value: {error}", path)]
    message.CopyFrom(holder.fields["v"])
    return []


def _plain(value: object) -> object:
    """YAML may produce dates and non-string keys; Struct wants JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _any_from(value: object, message: Message, path: str) -> list[Problem]:
    return [Problem("custom (google.protobuf.Any) policies are not supported", path)]


_WELL_KNOWN_FROM = {
    "google.protobuf.Duration": _duration_from,
    "google.protobuf.Timestamp": _timestamp_from,
    "google.protobuf.Struct": _struct_from,
    "google.protobuf.Value": _value_from,
    "google.protobuf.Any": _any_from,
}


def message_to_value(message: Message) -> dict[str, Any]:
    """The plain mapping users write: camelCase names, Go durations, enum names."""
    result = _to_value(message)
    assert isinstance(result, dict)
    return result


def _to_value(message: Message) -> Any:
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Duration":
        assert isinstance(message, Duration)
        return duration.format_duration(duration.from_proto(message))
    if name == "google.protobuf.Timestamp":
        assert isinstance(message, Timestamp)
        return message.ToJsonString()
    if name == "google.protobuf.Struct":
        assert isinstance(message, struct_pb2.Struct)
        return _struct_plain(message)
    if name == "google.protobuf.Value":
        holder = struct_pb2.Struct()
        holder.fields["v"].CopyFrom(cast(struct_pb2.Value, message))
        return _struct_plain(holder)["v"]
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        out[field.json_name] = _field_to_value(field, value)
    return out


def _struct_plain(message: struct_pb2.Struct) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, struct_pb2.Struct):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, struct_pb2.ListValue):
            return [plain(v) for v in value]
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    return {k: plain(v) for k, v in message.items()}


def _field_to_value(field: FieldDescriptor, value: Any) -> Any:
    if _is_map(field):
        value_field = _message_type(field).fields_by_name["value"]
        return {
            str(k) if not isinstance(k, str) else k: _single(value_field, v)
            for k, v in sorted(value.items())
        }
    if field.is_repeated:
        return [_single(field, v) for v in value]
    return _single(field, value)


def _single(field: FieldDescriptor, value: Any) -> Any:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return _to_value(value)
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        enum_value = _enum_type(field).values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        # float32 fields print as their shortest decimal (50.0, not 50.000001...).
        return float(f"{value:.7g}")
    return value
