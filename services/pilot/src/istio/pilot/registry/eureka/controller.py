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
from collections.abc import Callable

import aiohttp

from istio.pilot.registry import Change, ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.eureka.conversion import build_snapshot, parse_applications
from istio.pilot.registry.status import Backoff, StatusBoard, report

log = logging.getLogger(__name__)

DEFAULT_REFRESH = 30.0
REQUEST_TIMEOUT = 30.0


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
        self._board = StatusBoard()
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
        return self._board.status

    async def wait_status(self, predicate: Callable[[RegistryStatus], bool]) -> RegistryStatus:
        """Wait until the status satisfies `predicate` (e.g. synced, or healthy again)."""
        return await self._board.wait(predicate)

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
        self._snapshot = snapshot
        self._failures = 0
        reported = self._board.published(change)
        report(self._changed, reported, self.name)
        return reported

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
        self._board.failed(message)
