"""Several registries seen as one (after Istio's pilot/platform/aggregate).

Theory of operation. `run` runs every member concurrently. When a member reports a change, the
merged snapshot is rebuilt from every member's current snapshot and the kind of change of the
merged view is reported (a change hidden by another registry's definition of the same host is
not reported). A hostname defined by two registries is served from the first one listed, and
the clash is shown in `status.last_error`. The status is synced only when every member has
synced and healthy only when every member is healthy; `members` lists them for /debug.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from types import MappingProxyType

from istio.model import Service, ServiceInstance
from istio.pilot.registry import (
    Change,
    ChangeCallback,
    Registry,
    RegistrySnapshot,
    RegistryStatus,
)

log = logging.getLogger(__name__)


class AggregateRegistry:
    def __init__(self, registries: Sequence[Registry]) -> None:
        names = [r.name for r in registries]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"registries must have unique names; repeated: {', '.join(repeated)}")
        self._members = tuple(registries)
        self._snapshot = RegistrySnapshot()
        self._clashes: tuple[str, ...] = ()
        self._synced = False
        self._last_change: datetime | None = None

    @property
    def name(self) -> str:
        return "aggregate"

    @property
    def members(self) -> tuple[Registry, ...]:
        return self._members

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    @property
    def status(self) -> RegistryStatus:
        statuses = [(m.name, m.status) for m in self._members]
        errors = [f"{name}: {s.last_error}" for name, s in statuses if s.last_error]
        return RegistryStatus(
            synced=all(s.synced for _, s in statuses),
            healthy=all(s.healthy for _, s in statuses),
            last_error="; ".join([*errors, *self._clashes]),
            last_change=self._last_change,
        )

    async def run(self, changed: ChangeCallback) -> None:
        def member_changed(_: Change) -> None:
            change = self._merge()
            synced_now = not self._synced and all(m.status.synced for m in self._members)
            self._synced = self._synced or synced_now
            if change is not None or synced_now:
                self._last_change = datetime.now(UTC)
                try:
                    changed(change or Change.SERVICES)
                except Exception:
                    log.exception("%s: the change callback failed", self.name)

        async with asyncio.TaskGroup() as members:
            for member in self._members:
                members.create_task(member.run(member_changed), name=f"registry {member.name}")

    def _merge(self) -> Change | None:
        services: dict[str, Service] = {}
        instances: dict[str, tuple[ServiceInstance, ...]] = {}
        owners: dict[str, str] = {}
        clashes: list[str] = []
        for member in self._members:
            snapshot = member.snapshot()
            for host, service in snapshot.services.items():
                if host in owners:
                    clashes.append(
                        f"host {host} is defined by {owners[host]} and {member.name}; "
                        f"{owners[host]}'s is used"
                    )
                    continue
                owners[host] = member.name
                services[host] = service
                instances[host] = snapshot.instances.get(host, ())
        merged = RegistrySnapshot(MappingProxyType(services), MappingProxyType(instances))
        change = merged.change_from(self._snapshot)
        self._snapshot, self._clashes = merged, tuple(clashes)
        return change
