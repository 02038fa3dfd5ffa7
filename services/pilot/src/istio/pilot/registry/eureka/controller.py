"""Polls a Eureka server's REST API for its applications.

Eureka has no watch: `run` fetches `GET <base>/apps` every `refresh` seconds (Eureka clients
themselves poll every 30) and reports a change only when the converted snapshot differs.
A failed fetch keeps the last snapshot, marks the registry unhealthy with the error, and is
retried after a bounded, jittered exponential backoff (never slower than `refresh`).
`refresh_now` fetches at once; tests use it instead of waiting for the poll.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import aiohttp

from istio.pilot.registry import Change, ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.eureka.conversion import build_snapshot, parse_applications

log = logging.getLogger(__name__)

DEFAULT_REFRESH = 30.0
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between retries: exponential from `initial`, capped at `maximum`, jittered so
    that many Pilots losing one Eureka do not retry in step."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` (>= 1) failures in a row."""
        base = min(self.maximum, self.initial * self.factor ** max(0, failures - 1))
        return base * random.uniform(0.5, 1.0)


class EurekaError(ValueError):
    """Eureka answered, but not with its applications."""


def apps_url(base: str) -> str:
    """The applications URL for a server's base URL.

    `http://eureka:8080` -> `http://eureka:8080/eureka/v2/apps` (Netflix's path);
    a base already ending in `/eureka/v2` or `/eureka` (Spring Cloud's) gets `/apps`.
    """
    base = base.rstrip("/")
    if base.endswith(("/eureka/v2", "/eureka")):
        return f"{base}/apps"
    return f"{base}/eureka/v2/apps"


class EurekaRegistry:
    """The UP instances of one Eureka server, refreshed every `refresh` seconds."""

    def __init__(
        self,
        url: str,
        refresh: float = DEFAULT_REFRESH,
        *,
        backoff: Backoff | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if refresh <= 0:
            raise ValueError(f"refresh must be a positive number of seconds, got {refresh}")
        self._url = url.rstrip("/")
        self._apps_url = apps_url(url)
        self._refresh = refresh
        self._backoff = backoff or Backoff()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._snapshot = RegistrySnapshot()
        self._status = RegistryStatus()
        self._status_changed = asyncio.Event()
        self._failures = 0
        self._fetching = asyncio.Lock()
        self._changed: ChangeCallback | None = None

    @property
    def name(self) -> str:
        return f"eureka:{self._url}"

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    @property
    def status(self) -> RegistryStatus:
        return self._status

    async def wait_status(self, predicate: Callable[[RegistryStatus], bool]) -> RegistryStatus:
        """Wait until the status satisfies `predicate` (e.g. synced, or healthy again)."""
        while not predicate(self._status):
            event = self._status_changed
            await event.wait()
        return self._status

    async def run(self, changed: ChangeCallback) -> None:
        self._changed = changed
        try:
            while True:
                await self.refresh_now()
                if self._failures:
                    await asyncio.sleep(min(self._refresh, self._backoff.delay(self._failures)))
                else:
                    await asyncio.sleep(self._refresh)
        finally:
            self._changed = None

    async def refresh_now(self) -> Change | None:
        """Fetch the applications now; the change it made (reported to `run`'s callback, if
        running), or None. A failure is recorded in `status`, never raised."""
        async with self._fetching:
            try:
                instances = parse_applications(await self._fetch())
                snapshot = build_snapshot(instances)
            except Exception as exc:
                self._fail(exc)
                return None
            return self._publish(snapshot)

    async def _fetch(self) -> object:
        async with (
            aiohttp.ClientSession(timeout=self._timeout) as session,
            session.get(self._apps_url, headers={"Accept": "application/json"}) as response,
        ):
            if response.status != 200:
                detail = (await response.text()).strip()[:200]
                raise EurekaError(f"GET {self._apps_url}: HTTP {response.status} {detail}".rstrip())
            return await response.json(content_type=None)

    def _publish(self, snapshot: RegistrySnapshot) -> Change | None:
        change = snapshot.change_from(self._snapshot)
        first = not self._status.synced
        self._snapshot = snapshot
        self._failures = 0
        last_change = datetime.now(UTC) if first or change else self._status.last_change
        self._set_status(RegistryStatus(True, True, "", last_change))
        if first:
            change = change or Change.SERVICES
        if change is not None:
            self._notify(change)
        return change

    def _fail(self, exc: Exception) -> None:
        self._failures += 1
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        expected = isinstance(exc, (aiohttp.ClientError, TimeoutError, ValueError))
        log.warning(
            "%s: %s; keeping the last snapshot and retrying",
            self.name,
            message,
            exc_info=None if expected else exc,
        )
        self._set_status(replace(self._status, healthy=False, last_error=message))

    def _set_status(self, status: RegistryStatus) -> None:
        if status != self._status:
            self._status = status
            self._status_changed.set()
            self._status_changed = asyncio.Event()

    def _notify(self, change: Change) -> None:
        if self._changed is None:
            return
        try:
            self._changed(change)
        except Exception:
            log.exception("%s: the change callback failed", self.name)
