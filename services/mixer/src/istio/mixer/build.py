"""`mixs build`: a Mixer that includes custom adapters, as wheels and a ready virtualenv.

    mixs build --adapter PATH [--adapter PATH...] --out DIR [--workspace ROOT]

Builds a wheel for Mixer and every workspace library it needs, and for each adapter project
(a directory with a pyproject.toml that declares its adapter in the entry point group
`istio.mixer.adapters`), into DIR/wheels; then makes DIR/venv and installs them there, with
third-party packages pinned to the versions this environment has (from uv's cache, or the
package index for what the cache lacks).
DIR/venv/bin/mixs is the custom Mixer; the build fails unless it lists every adapter the
projects declare. The wheels alone install anywhere with `pip install DIR/wheels/*.whl`.

uv does the building and installing (it is what `make setup` uses).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import istio.mixer

ENTRY_POINT_GROUP = "istio.mixer.adapters"
MIXER_DISTRIBUTION = "istio-mixer"


class BuildError(Exception):
    """The build cannot go on; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Project:
    name: str
    directory: Path
    dependencies: tuple[str, ...]
    adapters: tuple[str, ...]  # entry point names in istio.mixer.adapters


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_project(directory: Path) -> Project:
    path = directory / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise BuildError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise BuildError(f"{path}: not TOML: {error}") from None
    project = data.get("project", {})
    if "name" not in project:
        raise BuildError(f"{path}: [project] has no name")
    requirements = project.get("dependencies", [])
    names = tuple(
        _normalize(match.group(0))
        for r in requirements
        if (match := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r))
    )
    adapters = tuple(project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {}))
    return Project(_normalize(project["name"]), directory.resolve(), names, adapters)


def find_workspace(start: Path) -> Path:
    """The uv workspace root at or above `start`."""
    for directory in (start, *start.parents):
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and "[tool.uv.workspace]" in pyproject.read_text():
            return directory
    raise BuildError(
        f"no uv workspace (a pyproject.toml with [tool.uv.workspace]) at or above {start}; "
        "pass --workspace ROOT, the directory of the mesh's sources"
    )


def workspace_members(root: Path) -> dict[str, Project]:
    data = tomllib.loads((root / "pyproject.toml").read_text())
    members: dict[str, Project] = {}
    for pattern in data["tool"]["uv"]["workspace"]["members"]:
        for directory in sorted(root.glob(pattern)):
            if (directory / "pyproject.toml").is_file():
                project = read_project(directory)
                members[project.name] = project
    return members


def needed(roots: Iterable[Project], members: dict[str, Project]) -> list[Project]:
    """The projects and every workspace member they depend on, transitively (sorted)."""
    found: dict[str, Project] = {}
    pending = list(roots)
    while pending:
        project = pending.pop()
        if project.name in found:
            continue
        found[project.name] = project
        pending.extend(members[d] for d in project.dependencies if d in members)
    return sorted(found.values(), key=lambda p: p.name)


def _uv() -> list[str]:
    found = shutil.which("uv")
    if found:
        return [found]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    raise BuildError("uv is not installed: run `make setup` (or `pip install uv`)")


def _run(command: Sequence[str], what: str) -> str:
    environment = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    environment.pop("VIRTUAL_ENV", None)
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed:\n{tail}")
    return result.stdout


def constraints(uv: list[str]) -> str:
    """This environment's third-party packages, pinned (workspace packages left out)."""
    frozen = _run([*uv, "pip", "freeze", "--python", sys.executable], "listing installed packages")
    return "\n".join(
        line
        for line in frozen.splitlines()
        if "==" in line and not _normalize(line.split("==")[0]).startswith("istio-")
    )


def build(adapter_dirs: Sequence[Path], out: Path, workspace: Path | None = None) -> Path:
    """Build the custom Mixer; returns the path of its `mixs`."""
    uv = _uv()
    root = workspace or find_workspace(Path(istio.mixer.__file__).resolve().parent)
    members = workspace_members(root)
    if MIXER_DISTRIBUTION not in members:
        raise BuildError(f"{root} has no {MIXER_DISTRIBUTION} member")
    adapters = [read_project(d) for d in adapter_dirs]
    for adapter in adapters:
        if not adapter.adapters:
            raise BuildError(
                f"{adapter.directory}/pyproject.toml declares no adapter: add "
                f'[project.entry-points."{ENTRY_POINT_GROUP}"] NAME = "module:INFO"'
            )
    projects = needed([members[MIXER_DISTRIBUTION], *adapters], members)
    wheels = out / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    for project in projects:
        _run(
            [
                *uv,
                "build",
                "--wheel",
                "--offline",
                "--out-dir",
                str(wheels),
                str(project.directory),
            ],
            f"building {project.name}",
        )
    venv = out / "venv"
    _run([*uv, "venv", "--clear", "--python", sys.executable, str(venv)], "making the virtualenv")
    pins = out / "constraints.txt"
    pins.write_text(constraints(uv) + "\n")
    python = venv / "bin" / "python"
    _run(
        [
            *uv,
            "pip",
            "install",
            "--python",
            str(python),
            "--constraint",
            str(pins),
            *sorted(str(w) for w in wheels.glob("*.whl")),
        ],
        "installing the wheels",
    )
    mixs = venv / "bin" / "mixs"
    listed = _run([str(mixs), "adapters"], "listing the built Mixer's adapters")
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    missing = sorted({a for p in adapters for a in p.adapters} - names)
    if missing:
        raise BuildError(f"the built Mixer does not load adapter(s) {', '.join(missing)}")
    return mixs
