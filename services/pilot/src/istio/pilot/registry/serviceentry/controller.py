"""Follows a directory of ServiceEntry files (also how VMs join the mesh, and what the local
platform writes).

Theory of operation. The directory is read by the config lib's FileStore, watched for the
ServiceEntry kind: every object at start, SYNCED, then each change other processes make to the
files. The registry keeps the current objects by key and, after SYNCED and after each change,
rebuilds its snapshot with the pure conversion module and reports the kind of change.

Files that do not parse or validate never reach the snapshot: FileStore keeps them out (a file
that turns bad keeps its last good objects) and lists what is wrong, with file, document,
object and field, in `FileStore.problems`; the registry shows those in `status.last_error`,
with hosts that entries define in conflicting ways. FileStore announces new objects but not new
problems, so the registry looks at its problem list every PROBLEM_CHECK seconds (a read of
memory, no I/O) as well as after each change.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from istio.config import Config, ConfigKey, Problem
from istio.configstore import ConfigEvent, EventType
from istio.configstore.file import FileStore
from istio.pilot.registry import Change, ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.serviceentry.conversion import KIND, build_snapshot

log = logging.getLogger(__name__)

PROBLEM_CHECK = 0.5
RETRY_INITIAL = 0.5
RETRY_MAX = 30.0


class ServiceEntryRegistry:
    """The ServiceEntries in the files under `directory` (created when missing)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._configs: dict[ConfigKey, Config] = {}
        self._clashes: tuple[str, ...] = ()
        self._failure = ""
        self._snapshot = RegistrySnapshot()
        self._status = RegistryStatus()
        self._status_changed = asyncio.Event()
        self._changed: ChangeCallback | None = None

    @property
    def name(self) -> str:
        return f"files:{self._directory}"

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    @property
    def status(self) -> RegistryStatus:
        return self._status

    async def wait_status(self, predicate: Callable[[RegistryStatus], bool]) -> RegistryStatus:
        """Wait until the status satisfies `predicate` (synced, healthy, an error shown...)."""
        while not predicate(self._status):
            await self._status_changed.wait()
        return self._status

    async def run(self, changed: ChangeCallback) -> None:
        self._changed = changed
        failures = 0
        try:
            while True:
                store: FileStore | None = None
                try:
                    store = FileStore(self._directory)
                    await self._follow(store)
                    failures = 0
                except Exception as error:  # a bug or a broken directory: retried, never fatal
                    failures += 1
                    self._failure = f"cannot watch {self._directory}: {error}"
                    log.warning("%s; keeping the last snapshot and retrying", self._failure)
                    self._set_status(replace(self._status, healthy=False, last_error=self._failure))
                finally:
                    if store is not None:
                        await store.close()
                delay = min(RETRY_MAX, RETRY_INITIAL * 2 ** max(0, failures - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            self._changed = None

    async def _follow(self, store: FileStore) -> None:
        """Follow the files until the watch fails; the snapshot is replaced only once the
        store has listed every object (a restarted watch lists them all again)."""
        listing: dict[ConfigKey, Config] = {}
        synced = False
        checker = asyncio.create_task(self._check_problems(store))
        try:
            async for event in store.watch([KIND]):
                if not synced:
                    if event.type is EventType.SYNCED:
                        synced, self._configs, self._failure = True, listing, ""
                        self._publish(store)
                    else:
                        _apply(listing, event)
                elif event.config is not None:
                    _apply(self._configs, event)
                    self._publish(store)
        finally:
            checker.cancel()

    async def _check_problems(self, store: FileStore) -> None:
        while True:
            await asyncio.sleep(PROBLEM_CHECK)
            self._set_status(replace(self._status, last_error=self._describe(store.problems)))

    def _publish(self, store: FileStore) -> None:
        conversion = build_snapshot(self._configs.values())
        change = conversion.snapshot.change_from(self._snapshot)
        first = not self._status.synced
        self._snapshot, self._clashes = conversion.snapshot, conversion.clashes
        last_change = datetime.now(UTC) if first or change else self._status.last_change
        self._set_status(RegistryStatus(True, True, self._describe(store.problems), last_change))
        if first or change is not None:
            self._notify(change or Change.SERVICES)

    def _describe(self, problems: list[Problem]) -> str:
        """What is wrong: this registry's failure, bad files (ServiceEntries or documents of
        no known kind; other kinds are other readers' business), conflicting hosts."""
        shown = [str(p) for p in problems if p.kind in ("", KIND)]
        return "; ".join(m for m in (self._failure, *shown, *self._clashes) if m)

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


def _apply(configs: dict[ConfigKey, Config], event: ConfigEvent) -> None:
    if event.config is None:
        return
    if event.type is EventType.DELETED:
        configs.pop(event.config.key, None)
    else:
        configs[event.config.key] = event.config
