"""Loading BUILD files (Bazel syntax) into Target records."""

from __future__ import annotations

import glob as globbing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RULES = ("py_library", "py_binary", "py_test", "proto_library")


@dataclass(frozen=True)
class Target:
    package: str  # "libs/config"
    name: str
    rule: str
    srcs: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        default = self.package.rsplit("/", 1)[-1]
        return f"//{self.package}" if self.name == default else f"//{self.package}:{self.name}"

    @property
    def directory(self) -> Path:
        return ROOT / self.package

    def test_paths(self) -> list[Path]:
        return sorted({(self.directory / s).parent for s in self.srcs} or {self.directory})


class BuildFileError(Exception):
    pass


def _evaluate(build_file: Path) -> list[Target]:
    package = str(build_file.parent.relative_to(ROOT))
    targets: list[Target] = []

    def glob(patterns: list[str], exclude: list[str] | None = None) -> list[str]:
        found: set[str] = set()
        for pattern in patterns:
            found.update(globbing.glob(pattern, root_dir=build_file.parent, recursive=True))
        for pattern in exclude or []:
            found.difference_update(
                globbing.glob(pattern, root_dir=build_file.parent, recursive=True)
            )
        return sorted(found)

    def rule(kind: str) -> Callable[..., None]:
        def declare(
            *,
            name: str,
            srcs: list[str] | None = None,
            deps: list[str] | None = None,
            **attributes: Any,
        ) -> None:
            targets.append(
                Target(package, name, kind, tuple(srcs or ()), tuple(deps or ()), attributes)
            )

        return declare

    scope: dict[str, Any] = {"__builtins__": {}, "glob": glob}
    scope.update({kind: rule(kind) for kind in RULES})
    try:
        exec(compile(build_file.read_text(), str(build_file), "exec"), scope)
    except Exception as error:  # a BUILD file is user input: report where it broke
        raise BuildFileError(f"{build_file.relative_to(ROOT)}: {error}") from error
    return targets


def build_files() -> list[Path]:
    skip = {".venv", ".git", "node_modules", ".mesh", ".tox"}
    return sorted(
        p for p in ROOT.rglob("BUILD") if not skip.intersection(p.relative_to(ROOT).parts)
    )


def load_targets() -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for build_file in build_files():
        for target in _evaluate(build_file):
            if target.label in targets:
                raise BuildFileError(f"{target.label} is declared twice")
            targets[target.label] = target
    return targets
