"""Follows Consul's catalog over its HTTP API with blocking queries.

Theory of operation. One loop long-polls `GET /v1/catalog/services` to learn which services
exist; each service gets its own long poll on `GET /v1/catalog/service/<name>`. We watch per
service, rather than re-reading every service whenever the services index moves, because that
is the pattern Consul's blocking queries are built for (consul-template and Prometheus' Consul
discovery do the same): Consul keeps an index per service, so a service's query wakes only
when that service changes, and an endpoint change costs one request instead of one per
service. The price is one open connection per service, so the client's connection pool is
unbounded (a large catalog may need the agent's `limits.http_max_conns_per_client` raised).

Every answer is stored as parsed catalog entries; any stored change rebuilds the snapshot with
the pure conversion module and reports the kind of change. Indexes follow Consul's rules for
blocking clients: an index that goes backwards (a snapshot restore) restarts from 0, and an
index of 0 or less is replaced by 1. Any failure (refused, timeout, bad status or body) ends
the whole session: the last snapshot stays, the status says unhealthy with the error, and after
a bounded, jittered exponential backoff a new session re-reads everything from index 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from istio.pilot.registry import ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.consul.conversion import (
    CatalogEntry,
    build_snapshot,
    parse_catalog_service,
    parse_services,
)
from istio.pilot.registry.status import Backoff, StatusBoard, report

log = logging.getLogger(__name__)

DEFAULT_WAIT = 300.0  # Consul's own default for a blocking query (5m); it allows at most 10m
CONNECT_TIMEOUT = 10.0
INDEX_HEADER = "X-Consul-Index"


class ConsulError(ValueError):
    """Consul answered, but not with what a catalog endpoint answers."""


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, by Consul's rules for blocking clients."""
    if returned < previous:
        return 0  # went backwards (e.g. a snapshot restore): start over
    return max(returned, 1)


def go_duration(seconds: float) -> str:
    """A `wait` value Consul parses (Go's time.ParseDuration): 300 -> `300s`."""
    return f"{seconds:g}s"


class ConsulRegistry:
    """The services of one Consul datacenter (the agent's own when `datacenter` is None)."""

    def __init__(
        self,
        url: str,
        datacenter: str | None = None,
        *,
        wait: float = DEFAULT_WAIT,
        backoff: Backoff | None = None,
    ) -> None:
        if not 0 < wait <= 600:
            raise ValueError(f"wait must be in (0, 600] seconds (Consul's limit), got {wait}")
        self._url = url.rstrip("/")
        self._datacenter = datacenter
        self._wait = wait
        self._backoff = backoff or Backoff()
        self._catalog: dict[str, tuple[CatalogEntry, ...]] = {}
        self._snapshot = RegistrySnapshot()
        self._board = StatusBoard()
        self._failures = 0
        self._changed: ChangeCallback | None = None

    @property
    def name(self) -> str:
        suffix = f"?dc={self._datacenter}" if self._datacenter else ""
        return f"consul:{self._url}{suffix}"

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
                try:
                    await self._follow()
                except Exception as exc:
                    self._fail(exc)
                await asyncio.sleep(self._backoff.delay(self._failures))
        finally:
            self._changed = None

    # -- one session -----------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Follow Consul until something fails; the failure propagates."""
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=CONNECT_TIMEOUT,
            # Consul adds up to wait/16 of jitter to a blocking query.
            sock_read=self._wait * 17 / 16 + CONNECT_TIMEOUT,
        )
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
            asyncio.TaskGroup() as watchers_group,
        ):
            watchers: dict[str, asyncio.Task[None]] = {}
            index = 0
            while True:
                body, returned = await self._get(session, "/v1/catalog/services", index)
                index = next_index(index, returned)
                names = set(parse_services(body))
                added = sorted(names - watchers.keys())
                async with asyncio.TaskGroup() as reads:
                    first_reads = {
                        name: reads.create_task(self._read_service(session, name, 0))
                        for name in added
                    }
                for name in watchers.keys() - names:
                    watchers.pop(name).cancel()
                for name in self._catalog.keys() - names:
                    del self._catalog[name]
                for name, read in first_reads.items():
                    entries, service_index = read.result()
                    self._catalog[name] = entries
                    watchers[name] = watchers_group.create_task(
                        self._watch_service(session, name, service_index)
                    )
                self._publish()

    async def _watch_service(self, session: aiohttp.ClientSession, name: str, index: int) -> None:
        while True:
            entries, returned = await self._read_service(session, name, index)
            index = next_index(index, returned)
            if entries != self._catalog.get(name):
                self._catalog[name] = entries
                self._publish()

    async def _read_service(
        self, session: aiohttp.ClientSession, name: str, index: int
    ) -> tuple[tuple[CatalogEntry, ...], int]:
        body, returned = await self._get(
            session, f"/v1/catalog/service/{quote(name, safe='')}", index
        )
        return parse_catalog_service(name, body), returned

    async def _get(self, session: aiohttp.ClientSession, path: str, index: int) -> tuple[Any, int]:
        """GET a catalog endpoint, blocking while its index is still `index` (0: at once)."""
        params: dict[str, str] = {}
        if self._datacenter:
            params["dc"] = self._datacenter
        if index > 0:
            params["index"] = str(index)
            params["wait"] = go_duration(self._wait)
        async with session.get(self._url + path, params=params) as response:
            if response.status != 200:
                detail = (await response.text()).strip()
                raise ConsulError(f"GET {path}: HTTP {response.status} {detail}".rstrip())
            header = response.headers.get(INDEX_HEADER, "")
            if not header.isdigit():
                # Without it every query would return at once: refuse rather than busy-loop.
                raise ConsulError(f"GET {path}: no valid {INDEX_HEADER} header ({header!r})")
            body = await response.json(content_type=None)
        return body, int(header)

    # -- state -----------------------------------------------------------------------------------

    def _publish(self) -> None:
        snapshot = build_snapshot(self._catalog)
        change = snapshot.change_from(self._snapshot)
        self._snapshot = snapshot
        self._failures = 0
        report(self._changed, self._board.published(change), self.name)

    def _fail(self, exc: Exception) -> None:
        self._failures += 1
        message = _describe(exc)
        expected = isinstance(_first_leaf(exc), (aiohttp.ClientError, TimeoutError, ValueError))
        log.warning(
            "%s: %s; keeping the last snapshot and retrying",
            self.name,
            message,
            exc_info=None if expected else exc,
        )
        self._board.failed(message)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    leaf = _first_leaf(exc)
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
