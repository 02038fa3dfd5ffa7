"""Errors that name what was wrong and where: file, document, object and field."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one piece of config, with as much of its location as is known."""

    message: str
    field: str = ""
    source: str = ""
    document: int | None = None
    kind: str = ""
    name: str = ""

    def located(
        self,
        *,
        source: str | None = None,
        document: int | None = None,
        kind: str | None = None,
        name: str | None = None,
        field_prefix: str = "",
    ) -> Problem:
        """The same problem with more of its location filled in."""
        field = self.field
        if field_prefix:
            field = (
                f"{field_prefix}.{field}"
                if field and not field.startswith("[")
                else (field_prefix + field)
            )
        return replace(
            self,
            source=self.source or (source or ""),
            document=self.document if self.document is not None else document,
            kind=self.kind or (kind or ""),
            name=self.name or (name or ""),
            field=field,
        )

    def __str__(self) -> str:
        where = []
        if self.source:
            where.append(self.source)
        if self.document is not None:
            where.append(f"document {self.document}")
        if self.kind or self.name:
            where.append(" ".join(p for p in (self.kind, self.name) if p))
        if self.field:
            where.append(self.field)
        return ": ".join([*where, self.message])


class ConfigError(Exception):
    """Config was rejected; `problems` lists every reason, each with its location."""

    def __init__(self, problems: Iterable[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class NotFound(ConfigError):
    """The object does not exist (replace, delete, get of a missing name)."""


class AlreadyExists(ConfigError):
    """An object of that kind, namespace and name exists already (create)."""


class Conflict(ConfigError):
    """The object changed since it was read: its resource_version is stale."""
