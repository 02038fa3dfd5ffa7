"""Adapter discovery through entry points, with plugins that are broken in every way a
plugin can be: each is left out with a reason, the good ones are found."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from istio.mixersdk import discover

GROUP = "istio.mixer.adapters.test"

MODULE = """
from istio.mixersdk import AdapterInfo, CheckResult

class Handler:
    def handle_check_nothing(self, instance):
        return CheckResult()
    async def close(self):
        pass

async def build(params, env):
    return Handler()

GOOD = AdapterInfo("good", "a good adapter", build, frozenset({"checknothing"}))
WRONG_NAME = AdapterInfo("other", "x", build, frozenset({"checknothing"}))
BAD_TEMPLATE = AdapterInfo("badtemplate", "x", build, frozenset({"nosuchtemplate"}))
NOT_INFO = object()
"""


def _distribution(root: Path, name: str, entry_points: str) -> None:
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{entry_points}")


def test_discovery_keeps_good_adapters_and_explains_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "plugin_under_test.py").write_text(MODULE)
    _distribution(
        tmp_path,
        "aaa_plugins",
        "good = plugin_under_test:GOOD\n"
        "misnamed = plugin_under_test:WRONG_NAME\n"
        "badtemplate = plugin_under_test:BAD_TEMPLATE\n"
        "notinfo = plugin_under_test:NOT_INFO\n"
        "missing = plugin_under_test_absent:INFO\n",
    )
    _distribution(tmp_path, "zzz_plugins", "good = plugin_under_test:GOOD\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "plugin_under_test", raising=False)
    adapters, problems = discover(GROUP)
    assert sorted(adapters) == ["good"]
    assert problems == [
        "entry point badtemplate = plugin_under_test:BAD_TEMPLATE (from aaa_plugins): "
        "adapter badtemplate: unknown template 'nosuchtemplate'",
        "entry point misnamed = plugin_under_test:WRONG_NAME (from aaa_plugins): declares "
        "adapter 'other', not 'misnamed'",
        "entry point missing = plugin_under_test_absent:INFO (from aaa_plugins): cannot load: "
        "ModuleNotFoundError: No module named 'plugin_under_test_absent'",
        "entry point notinfo = plugin_under_test:NOT_INFO (from aaa_plugins): is a object, "
        "not an AdapterInfo",
        "entry point good = plugin_under_test:GOOD (from zzz_plugins): adapter good is "
        "already provided; ignored",
    ]
