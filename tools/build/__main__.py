"""Read the BUILD files: list targets, build protos, run tests, check declared dependencies.

    python tools/build list                 every target, with its kind
    python tools/build protos [--check]     regenerate (or check) libs/api from proto/
    python tools/build test TARGET...       run a target's tests (//libs/config:tests)
    python tools/build check                fail when a BUILD file's deps differ from what the
                                            package imports or what its pyproject declares

BUILD files use Bazel's syntax. They are evaluated with only the rule functions below in scope,
so they stay declarations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildfiles import ROOT, load_targets
from depcheck import check_all


def main() -> int:
    parser = argparse.ArgumentParser(prog="tools/build", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list targets")
    protos = commands.add_parser("protos", help="generate Python from proto/")
    protos.add_argument("--check", action="store_true", help="fail when libs/api is stale")
    test = commands.add_parser("test", help="run targets' tests")
    test.add_argument("targets", nargs="+", metavar="TARGET")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --, for pytest")
    commands.add_parser("check", help="check BUILD deps against imports and pyproject")
    options = parser.parse_args()

    targets = load_targets()
    if options.command == "list":
        for target in sorted(targets.values(), key=lambda t: t.label):
            print(f"{target.label:<40} {target.rule}")
        return 0
    if options.command == "protos":
        import subprocess

        command = [sys.executable, str(ROOT / "tools" / "protogen")]
        return subprocess.call([*command, "--check"] if options.check else command)
    if options.command == "test":
        import pytest

        paths = []
        for label in options.targets:
            target = targets.get(label) or targets.get(f"{label}:tests")
            if target is None or target.rule != "py_test":
                known = ", ".join(sorted(t.label for t in targets.values() if t.rule == "py_test"))
                print(f"tools/build: no test target {label!r}; test targets: {known}")
                return 2
            paths.extend(str(p) for p in target.test_paths())
        extra = [a for a in options.pytest_args if a != "--"]
        return int(pytest.main([*paths, *extra]))
    problems = check_all(targets)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"tools/build check: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"tools/build check: {len(targets)} targets, dependencies match imports and pyprojects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
