"""The ConfigStore interface that every backend (file, etcd, Kubernetes CRDs) implements.

Consistency promise: a watch stream starts with an ADDED event for every object that exists,
then one SYNCED event (the view is complete: "has synced"), then every later change in the
order the store applied it. A reader that applies the events in order holds the store's view.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Protocol

from istio.config import Config, ConfigError, Problem, SchemaRegistry
from istio.config.model import DEFAULT_NAMESPACE
from istio.config.validation import validate_object_name


class EventType(enum.Enum):
    ADDED = "ADDED"
    UPDATED = "UPDATED"
    DELETED = "DELETED"
    SYNCED = "SYNCED"


@dataclass(frozen=True, slots=True)
class ConfigEvent:
    """A change seen by a watch. `config` is None only for SYNCED; for DELETED it is the
    object as it was last seen."""

    type: EventType
    config: Config | None = None


class ConfigStore(Protocol):
    """Where config lives. Kinds are the exact kind names of the registry's schemas.

    Writes are validated first; a rejected write raises ConfigError and changes nothing.
    """

    @property
    def registry(self) -> SchemaRegistry: ...

    async def get(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> Config | None:
        """The object, or None when it does not exist."""
        ...

    async def list(self, kind: str, namespace: str | None = None) -> list[Config]:
        """Objects of a kind in one namespace (all when None), sorted by namespace and name."""
        ...

    async def create(self, config: Config) -> Config:
        """Store a new object and return it with its resource_version; AlreadyExists if taken."""
        ...

    async def update(self, config: Config) -> Config:
        """Replace an object. NotFound if missing; Conflict if `config`'s resource_version is set
        and is not the stored one (empty means replace whatever is current)."""
        ...

    async def delete(
        self,
        kind: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        resource_version: str = "",
    ) -> None:
        """Remove an object. NotFound if missing; Conflict on a stale resource_version."""
        ...

    def watch(self, kinds: Collection[str] | None = None) -> AsyncIterator[ConfigEvent]:
        """The store's objects and then its changes, as the module docstring promises."""
        ...

    async def close(self) -> None:
        """Release connections and stop watches (they end)."""
        ...


def check_writable(registry: SchemaRegistry, config: Config) -> None:
    """Raise ConfigError unless `config` is a valid object of a known kind.

    Objects made by `parse_object` pass; this guards programmatic writers too.
    """
    meta = config.meta
    schema = registry.by_kind(meta.kind)
    kind, where = meta.kind, f"{meta.namespace}/{meta.name}"
    if schema is None:
        raise ConfigError(Problem(f"unknown kind {meta.kind!r}", "kind", kind=kind, name=where))
    if not isinstance(config.spec, schema.message):
        raise ConfigError(
            Problem(
                f"spec must be a {schema.message.DESCRIPTOR.full_name}",
                "spec",
                kind=kind,
                name=where,
            )
        )
    problems = []
    for field, value in (("metadata.name", meta.name), ("metadata.namespace", meta.namespace)):
        reason = validate_object_name(value)
        if reason:
            problems.append(Problem(reason, field, kind=kind, name=where))
    problems += (
        p.located(field_prefix="spec", kind=kind, name=where) for p in schema.validate(config.spec)
    )
    if problems:
        raise ConfigError(problems)


def known_kind(registry: SchemaRegistry, kind: str) -> str:
    """`kind` if the registry has it exactly; ConfigError otherwise."""
    if registry.by_kind(kind) is None:
        raise ConfigError(Problem(f"unknown kind {kind!r}"))
    return kind
