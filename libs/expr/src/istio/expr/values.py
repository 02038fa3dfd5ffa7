"""Conversions and comparisons of attribute values: Go durations, IP addresses, DNS names,
email addresses, URIs and timestamps, as Mixer's functions read them."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from istio.expr.errors import EvaluationError
from istio.expr.types import ValueType

_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NANOS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DNS_LABEL = re.compile(r"^[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?$")


def parse_duration(text: str) -> timedelta:
    """A Go duration ("300ms", "1h30m", "-1.5h", "0"); ValueError otherwise."""
    if text in ("0", "+0", "-0"):
        return timedelta(0)
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if text[:1] in "+-" else text
    if not body:
        raise ValueError(f"invalid duration {text!r}")
    nanos = 0.0
    position = 0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if not match or match.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        nanos += float(match.group(1)) * _UNIT_NANOS[match.group(2)]
        position = match.end()
    return timedelta(microseconds=sign * nanos / 1000)


def format_duration(value: timedelta) -> str:
    """A duration the way Go prints it: 1.5s, 300ms, 1h2m3s, 0s."""
    nanos = round(value.total_seconds() * 1e9)
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < 1_000:
        return f"{sign}{nanos}ns"
    if nanos < 1_000_000:
        return f"{sign}{_trim(nanos / 1_000)}µs"
    if nanos < 1_000_000_000:
        return f"{sign}{_trim(nanos / 1_000_000)}ms"
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _trim(rest / 1_000_000_000)
    text = f"{seconds}s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return sign + text


def _trim(number: float) -> str:
    return f"{number:.9f}".rstrip("0").rstrip(".")


def parse_ip(text: str) -> bytes:
    """ip("10.0.0.1") -> its 4 (or 16) bytes."""
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        raise EvaluationError(f"could not convert {text!r} to IP_ADDRESS") from None


def normalize_ip(value: bytes) -> bytes:
    """An IPv4-mapped IPv6 address as its IPv4 form, so that both compare equal (Go's
    net.IP.Equal does the same)."""
    if len(value) == 16 and value[:12] == b"\x00" * 10 + b"\xff\xff":
        return value[12:]
    return value


def format_ip(value: bytes) -> str:
    return str(ipaddress.ip_address(normalize_ip(value)))


def parse_timestamp(text: str) -> datetime:
    """timestamp("2017-01-01T00:00:00Z"): RFC 3339 with a zone, as Go's time.RFC3339."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or "T" not in text.upper() or value.tzinfo is None:
        raise EvaluationError(
            f"could not convert {text!r} to TIMESTAMP: expected RFC 3339 such as "
            "2017-01-01T00:00:00Z"
        )
    return value


def check_dns_name(text: str) -> str:
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise EvaluationError(f"{text!r} is not a DNS name")
    return text


def check_email(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at or not local or any(c in local for c in ' \t<>()[],;:"') or "@" in local:
        raise EvaluationError(f"{text!r} is not an email address")
    try:
        check_dns_name(domain)
    except EvaluationError:
        raise EvaluationError(f"{text!r} is not an email address") from None
    return text


def check_uri(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise EvaluationError(f"{text!r} is not a URI")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise EvaluationError(f"{text!r} is not a URI") from None
    if parts.scheme and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*$", parts.scheme):
        raise EvaluationError(f"{text!r} is not a URI")
    return text


def _dns_key(text: str) -> str:
    return text.lower().rstrip(".")


def _email_key(text: str) -> str:
    local, _, domain = text.rpartition("@")
    return f"{local}@{_dns_key(domain)}"


def _uri_key(text: str) -> str:
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    return parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()


def wildcard_match(value: str, pattern: str) -> bool:
    """Mixer's string match: `abc*` is a prefix, `*abc` a suffix, anything else exact."""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def comparison_key(value_type: ValueType) -> Callable[[object], object] | None:
    """How values of a type are put in canonical form before `==` (None: as they are)."""
    if value_type is ValueType.DNS_NAME:
        return lambda v: _dns_key(str(v))
    if value_type is ValueType.EMAIL_ADDRESS:
        return lambda v: _email_key(str(v))
    if value_type is ValueType.URI:
        return lambda v: _uri_key(str(v))
    if value_type is ValueType.IP_ADDRESS:
        return lambda v: normalize_ip(v) if isinstance(v, bytes) else v
    return None
