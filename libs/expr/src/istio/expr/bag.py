"""Attribute bags: what compiled expressions read.

A bag answers two questions: an attribute's value (None when absent) and one key of a
string-map attribute. `MapBag` is a dict that does both at dict speed. `TrackingBag` wraps
another bag and remembers every question asked and whether the answer was there: Mixer
returns that as a Check's referenced attributes, and the client keys its cache with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from istio.expr.errors import AttributeAbsent
from istio.expr.types import Value


class Bag(Protocol):
    def get(self, name: str, /) -> Value | None:
        """The attribute's value, or None when the bag does not have it."""
        ...

    def get_key(self, name: str, key: str, /) -> str | None:
        """The value of `key` in the string-map attribute `name`; None when the map lacks the
        key; AttributeAbsent when the bag lacks the map."""
        ...


class MapBag(dict[str, Value]):
    """A bag held as a dict of attribute name -> value."""

    __slots__ = ()

    def get_key(self, name: str, key: str, /) -> str | None:
        value = dict.get(self, name)
        if value is None:
            raise AttributeAbsent(name)
        assert type(value) is dict or isinstance(value, Mapping)  # dict: no ABC check per call
        result = value.get(key)
        return result if isinstance(result, str) or result is None else str(result)


@dataclass(frozen=True, slots=True)
class Reference:
    """One question a bag was asked: attribute `name` (its `key`, for a map lookup), and
    whether the answer was there."""

    name: str
    key: str | None
    present: bool


class TrackingBag:
    """Answers from `inner`, remembering what was asked (see `references`)."""

    __slots__ = ("_asked", "_inner")

    def __init__(self, inner: Bag) -> None:
        self._inner = inner
        self._asked: dict[tuple[str, str | None], bool] = {}

    def get(self, name: str, /) -> Value | None:
        value = self._inner.get(name)
        self._asked[(name, None)] = value is not None
        return value

    def get_key(self, name: str, key: str, /) -> str | None:
        try:
            value = self._inner.get_key(name, key)
        except AttributeAbsent:
            self._asked[(name, None)] = False
            raise
        self._asked[(name, key)] = value is not None
        return value

    def references(self) -> Iterator[Reference]:
        """Every question asked, in the order first asked."""
        for (name, key), present in self._asked.items():
            yield Reference(name, key, present)

    def asked(self) -> tuple[tuple[tuple[str, str | None], bool], ...]:
        """The same as `references`, as plain tuples ((name, key), present): cheap to hash,
        for callers that key caches by them."""
        return tuple(self._asked.items())
