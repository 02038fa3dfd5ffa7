"""Every registry conforms to the Registry protocol that Pilot consumes."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from istio.pilot.registry import Registry, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.aggregate import AggregateRegistry
from istio.pilot.registry.consul import ConsulRegistry
from istio.pilot.registry.kube import KubeRegistry
from istio.pilot.registry.serviceentry import ServiceEntryRegistry


def registries(tmp_path: Path) -> list[Registry]:
    """One of each; typed as Registry, so that mypy checks conformance too."""
    files: Registry = ServiceEntryRegistry(tmp_path / "entries")
    kube: Registry = KubeRegistry(tmp_path / "kubeconfig")
    consul: Registry = ConsulRegistry("http://127.0.0.1:8500")
    aggregate: Registry = AggregateRegistry([files, kube, consul])
    return [files, kube, consul, aggregate]


def _kind(member: object) -> str:
    if isinstance(member, property):
        return "property"
    if inspect.iscoroutinefunction(member):
        return "coroutine method"
    return "method" if callable(member) else type(member).__name__


@pytest.mark.parametrize(
    "cls", [ServiceEntryRegistry, KubeRegistry, ConsulRegistry, AggregateRegistry]
)
def test_each_registry_has_the_protocol_members(cls: type) -> None:
    members = [m for m in vars(Registry) if not m.startswith("_")]
    assert sorted(members) == ["name", "run", "snapshot", "status"]
    for name in members:
        wanted, found = vars(Registry)[name], inspect.getattr_static(cls, name, None)
        assert found is not None, f"{cls.__name__} has no {name}"
        assert _kind(found) == _kind(wanted), f"{cls.__name__}.{name} is a {_kind(found)}"
        if callable(wanted) and not isinstance(wanted, property):
            assert list(inspect.signature(found).parameters) == list(
                inspect.signature(wanted).parameters
            ), f"{cls.__name__}.{name} takes other parameters"


def test_registries_answer_before_they_run(tmp_path: Path) -> None:
    for registry in registries(tmp_path):
        assert isinstance(registry.name, str)
        assert registry.name
        assert isinstance(registry.snapshot(), RegistrySnapshot)
        assert registry.status == RegistryStatus()
