"""Service registries: where services and their endpoints come from.

Every registry publishes immutable RegistrySnapshots. Consistency promise: `snapshot()` is at
least as fresh as the last change reported to `run`'s callback, and a snapshot never changes
after it is returned. A registry that loses its source keeps its last snapshot and says so in
`status` (0.2's lesson: a registry outage must not empty the mesh).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Protocol

from istio.model import Resolution, Service, ServiceInstance


class Change(enum.Enum):
    """What changed, so Pilot pushes only what it must."""

    SERVICES = "services"  # services or their ports: clusters, listeners, routes may change
    ENDPOINTS = "endpoints"  # only instances of STATIC services: EDS alone


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """Services by hostname, and each service's instances (every port), by hostname."""

    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    instances: Mapping[str, tuple[ServiceInstance, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def change_from(self, previous: RegistrySnapshot) -> Change | None:
        """The kind of change from `previous` to this snapshot, or None when equal."""
        if dict(self.services) != dict(previous.services):
            return Change.SERVICES
        if dict(self.instances) != dict(previous.instances):
            return Change.SERVICES if dns_instances_changed(previous, self) else Change.ENDPOINTS
        return None


def dns_instances_changed(previous: RegistrySnapshot, current: RegistrySnapshot) -> bool:
    """Did the instances of a DNS-resolved service change? Their endpoints are inline in its
    STRICT_DNS cluster, not in an EDS assignment, so such a change needs CDS (Change.SERVICES)."""
    for snapshot in (previous, current):
        for hostname, service in snapshot.services.items():
            if service.resolution is Resolution.DNS and previous.instances.get(
                hostname
            ) != current.instances.get(hostname):
                return True
    return False


@dataclass(frozen=True, slots=True)
class RegistryStatus:
    """For /debug and /metrics: has it synced once, is its source reachable now."""

    synced: bool = False
    healthy: bool = False
    last_error: str = ""
    last_change: datetime | None = None


ChangeCallback = Callable[[Change], None]


class Registry(Protocol):
    @property
    def name(self) -> str:
        """Short and unique among Pilot's registries: `files:/etc/mesh`, `kubernetes`, ..."""
        ...

    def snapshot(self) -> RegistrySnapshot: ...

    @property
    def status(self) -> RegistryStatus: ...

    async def run(self, changed: ChangeCallback) -> None:
        """Follow the source until cancelled, calling `changed` after each new snapshot.

        The first successful sync also counts as a change (status.synced becomes True).
        Failures are retried with backoff; they never end `run`.
        """
        ...
