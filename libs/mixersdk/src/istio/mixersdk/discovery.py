"""Finding adapters: every installed entry point in the group `istio.mixer.adapters`."""

from __future__ import annotations

from importlib.metadata import entry_points

from istio.mixersdk.adapter import AdapterInfo

GROUP = "istio.mixer.adapters"


def discover(group: str = GROUP) -> tuple[dict[str, AdapterInfo], list[str]]:
    """The installed adapters by name, and why any entry point was left out (it failed to
    load, is not an AdapterInfo, names another adapter, is declared badly, or repeats a name:
    the first, in distribution name order, wins)."""
    adapters: dict[str, AdapterInfo] = {}
    problems: list[str] = []
    found = sorted(entry_points(group=group), key=lambda e: (e.dist.name if e.dist else "", e.name))
    for entry in found:
        where = f"entry point {entry.name} = {entry.value}"
        if entry.dist is not None:
            where += f" (from {entry.dist.name})"
        try:
            info = entry.load()
        except Exception as error:  # a broken plugin must not stop Mixer
            problems.append(f"{where}: cannot load: {type(error).__name__}: {error}")
            continue
        if not isinstance(info, AdapterInfo):
            problems.append(f"{where}: is a {type(info).__name__}, not an AdapterInfo")
            continue
        if info.name != entry.name:
            problems.append(f"{where}: declares adapter {info.name!r}, not {entry.name!r}")
            continue
        declared = info.problems()
        if declared:
            problems.extend(f"{where}: {p}" for p in declared)
            continue
        if info.name in adapters:
            problems.append(f"{where}: adapter {info.name} is already provided; ignored")
            continue
        adapters[info.name] = info
    return adapters, problems
