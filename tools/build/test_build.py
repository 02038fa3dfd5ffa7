"""tools/build reads BUILD files and catches deps that disagree with imports or pyprojects."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import buildfiles
from depcheck import check_all


def package(root: Path, path: str, module: str, deps: list[str], build: str, code: str) -> None:
    directory = root / path
    source = directory / "src" / Path(*module.split("."))
    source.mkdir(parents=True)
    (source / "__init__.py").write_text(textwrap.dedent(code))
    quoted = ", ".join(f'"{d}"' for d in deps)
    (directory / "pyproject.toml").write_text(
        f'[project]\nname = "{module.replace(".", "-")}"\ndependencies = [{quoted}]\n'
        f'[tool.uv.build-backend]\nmodule-name = "{module}"\n'
    )
    (directory / "BUILD").write_text(textwrap.dedent(build))


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(buildfiles, "ROOT", tmp_path)
    package(
        tmp_path,
        "libs/base",
        "istio.base",
        ["pyyaml"],
        'py_library(name = "base", srcs = glob(["src/**/*.py"]), deps = ["@pypi//pyyaml"])\n',
        "import yaml\n",
    )
    return tmp_path


def test_consistent_tree(tree: Path) -> None:
    targets = buildfiles.load_targets()
    assert list(targets) == ["//libs/base"]
    assert check_all(targets) == []


def test_undeclared_and_unused_deps(tree: Path) -> None:
    package(
        tree,
        "libs/user",
        "istio.user",
        ["istio-base", "aiohttp"],
        'py_library(name = "user", srcs = glob(["src/**/*.py"]), deps = ["@pypi//aiohttp"])\n',
        "import yaml\nfrom istio.base import thing\n",
    )
    assert check_all(buildfiles.load_targets()) == [
        "//libs/user: imports //libs/base but BUILD deps do not list it",
        "//libs/user: imports @pypi//pyyaml but BUILD deps do not list it",
        "//libs/user: BUILD deps list @pypi//aiohttp but nothing imports it",
        "//libs/user: pyproject has istio-base, BUILD deps do not",
    ]


def test_libs_never_depend_on_services(tree: Path) -> None:
    package(
        tree,
        "services/pilot",
        "istio.pilot",
        [],
        'py_binary(name = "pilot", srcs = glob(["src/**/*.py"]))\n',
        "",
    )
    package(
        tree,
        "libs/bad",
        "istio.bad",
        ["istio-pilot"],
        'py_library(name = "bad", srcs = glob(["src/**/*.py"]), deps = ["//services/pilot"])\n',
        "import istio.pilot\n",
    )
    assert check_all(buildfiles.load_targets()) == [
        "//libs/bad: depends on //services/pilot; libs never import services"
    ]


def test_broken_build_file_names_itself(tree: Path) -> None:
    (tree / "libs" / "base" / "BUILD").write_text("py_library(name = 'base', deps = [\n")
    with pytest.raises(buildfiles.BuildFileError, match="libs/base/BUILD"):
        buildfiles.load_targets()
