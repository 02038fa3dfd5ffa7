"""Config objects: Kubernetes-style metadata around a protobuf spec."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from google.protobuf.message import Message

DEFAULT_NAMESPACE = "default"


class ConfigKey(NamedTuple):
    """Identifies one object in a store: kind, namespace and name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ConfigMeta:
    """Metadata common to every kind.

    `resource_version` is opaque: a store sets it on every write and compares it on update and
    delete (optimistic concurrency); an empty one means "whatever is current".
    """

    kind: str
    api_version: str
    name: str
    namespace: str = DEFAULT_NAMESPACE
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""
    creation_timestamp: datetime | None = None

    @property
    def key(self) -> ConfigKey:
        return ConfigKey(self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Config:
    """One object. Treat `spec` as immutable: stores and caches share it."""

    meta: ConfigMeta
    spec: Message

    @property
    def key(self) -> ConfigKey:
        return self.meta.key

    def with_meta(self, **changes: Any) -> Config:
        return Config(dataclasses.replace(self.meta, **changes), self.spec)

    def same_content(self, other: Config) -> bool:
        """True when kind, name, labels, annotations and spec are equal (versions aside)."""
        a, b = self.meta, other.meta
        return (
            a.key == b.key
            and dict(a.labels) == dict(b.labels)
            and dict(a.annotations) == dict(b.annotations)
            and self.spec == other.spec
        )
