"""Checking that BUILD deps, imports and pyproject dependencies say the same thing.

A py_library or py_binary must declare exactly the distributions its sources import (workspace
packages as //path labels, third-party ones as @pypi//name), and its pyproject must declare the
same set. A py_test's imports must be covered by its deps. The house rules of DESIGN.md §6 are
checked too: services never import each other, libs never import services.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from buildfiles import Target

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(paths: list[Path]) -> set[str]:
    modules: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module)
                modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


class Workspace:
    """Which distribution provides which module, for workspace packages and installed ones."""

    def __init__(self, targets: dict[str, Target]) -> None:
        self.module_of_package: dict[str, str] = {}
        self.distribution_of_package: dict[str, str] = {}
        self.pyproject_deps: dict[str, set[str]] = {}
        for target in targets.values():
            pyproject = target.directory / "pyproject.toml"
            if target.rule in ("py_library", "py_binary") and pyproject.exists():
                data = tomllib.loads(pyproject.read_text())
                module = data["tool"]["uv"]["build-backend"]["module-name"]
                distribution = normalize(data["project"]["name"])
                self.module_of_package[target.package] = module
                self.distribution_of_package[target.package] = distribution
                self.pyproject_deps[target.package] = {
                    normalize(_NAME.match(d).group(1))  # type: ignore[union-attr]
                    for d in data["project"].get("dependencies", [])
                }
        self.third_party = metadata.packages_distributions()

    def label_for(self, module: str) -> str | None:
        """The dep label that provides `module`, or None for the standard library."""
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
            return None
        if top == "istio":
            best = None
            for package, provided in self.module_of_package.items():
                if (module == provided or module.startswith(provided + ".")) and (
                    best is None or len(provided) > len(self.module_of_package[best])
                ):
                    best = package
            return f"//{best}" if best else f"<unknown workspace module {module}>"
        if top == "google" and module.startswith("google.rpc"):
            return "@pypi//googleapis-common-protos"
        if top == "google":
            return "@pypi//protobuf"
        distributions = self.third_party.get(top)
        if not distributions:
            return f"<module {top} is not installed>"
        return f"@pypi//{normalize(distributions[0])}"

    def label_to_distribution(self, label: str) -> str:
        if label.startswith("@pypi//"):
            return normalize(label.removeprefix("@pypi//"))
        package = label.removeprefix("//").split(":")[0]
        return self.distribution_of_package.get(package, label)


def _sources(target: Target) -> list[Path]:
    return [target.directory / s for s in target.srcs if s.endswith(".py")]


def _needed_labels(workspace: Workspace, target: Target) -> set[str]:
    own = f"//{target.package}"
    labels = set()
    for module in imported_modules(_sources(target)):
        label = workspace.label_for(module)
        if label is not None and label != own:
            labels.add(label)
    # A dotted import names both the package and its submodules; keep the provider of each.
    return labels


def check_all(targets: dict[str, Target]) -> list[str]:
    workspace = Workspace(targets)
    problems: list[str] = []
    for target in sorted(targets.values(), key=lambda t: t.label):
        if target.rule == "proto_library":
            continue
        needed = _needed_labels(workspace, target)
        declared = {d for d in target.deps if not d.startswith(":")}
        local = {f"//{target.package}" for d in target.deps if d.startswith(":")}
        for label in sorted(needed):
            if label.startswith("<"):
                problems.append(f"{target.label}: imports {label.strip('<>')}")
        needed = {n for n in needed if not n.startswith("<")}
        if target.rule == "py_test":
            for label in sorted(needed - declared - local):
                problems.append(f"{target.label}: imports {label} but does not declare it in deps")
            continue
        for label in sorted(needed - declared):
            problems.append(f"{target.label}: imports {label} but BUILD deps do not list it")
        for label in sorted(declared - needed):
            problems.append(f"{target.label}: BUILD deps list {label} but nothing imports it")
        pyproject = workspace.pyproject_deps.get(target.package)
        if pyproject is not None:
            build = {workspace.label_to_distribution(d) for d in declared}
            for name in sorted(build - pyproject):
                problems.append(f"{target.label}: BUILD deps have {name}, pyproject does not")
            for name in sorted(pyproject - build):
                problems.append(f"{target.label}: pyproject has {name}, BUILD deps do not")
        kind = target.package.split("/")[0]
        for label in sorted(declared):
            other = label.removeprefix("//").split("/")[0]
            if label.startswith("//") and other == "services":
                problems.append(
                    f"{target.label}: depends on {label}; "
                    + (
                        "libs never import services"
                        if kind == "libs"
                        else "services never import each other (meet through contracts)"
                    )
                )
    return problems
