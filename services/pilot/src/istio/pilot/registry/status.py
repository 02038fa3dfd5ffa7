"""What every registry does the same way around its source: retry delays, its status, and the
call to `run`'s change callback."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from istio.pilot.registry import Change, ChangeCallback, RegistryStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between retries: exponential from `initial`, capped at `maximum`, jittered so
    that many Pilots losing one source do not retry in step."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` (>= 1) failures in a row."""
        base = min(self.maximum, self.initial * self.factor ** max(0, failures - 1))
        return base * random.uniform(0.5, 1.0)


class StatusBoard:
    """A registry's current status, replaced whole, and a way to wait for one."""

    def __init__(self) -> None:
        self._status = RegistryStatus()
        self._changed = asyncio.Event()

    @property
    def status(self) -> RegistryStatus:
        return self._status

    def set(self, status: RegistryStatus) -> None:
        if status != self._status:
            self._status = status
            self._changed.set()
            self._changed = asyncio.Event()

    def published(
        self, change: Change | None, *, healthy: bool = True, last_error: str = ""
    ) -> Change | None:
        """Record that a complete snapshot was just published, with `change` from the previous
        one; the change to report (the first sync always counts as one)."""
        first = not self._status.synced
        last_change = datetime.now(UTC) if first or change else self._status.last_change
        self.set(RegistryStatus(True, healthy, last_error, last_change))
        return (change or Change.SERVICES) if first else change

    def failed(self, message: str) -> None:
        """The source is unreachable or unusable; the last snapshot stays."""
        self.set(replace(self._status, healthy=False, last_error=message))

    async def wait(self, predicate: Callable[[RegistryStatus], bool]) -> RegistryStatus:
        """Wait until the status satisfies `predicate` (synced, unhealthy, healthy again...)."""
        while not predicate(self._status):
            await self._changed.wait()
        return self._status


def report(changed: ChangeCallback | None, change: Change | None, registry: str) -> None:
    """Tell `run`'s callback (if running) about `change` (if any); a failing callback is
    logged, never raised into the registry's loop."""
    if changed is None or change is None:
        return
    try:
        changed(change)
    except Exception:
        log.exception("%s: the change callback failed", registry)
