"""Follows a directory of ServiceEntry files (also how VMs join the mesh, and what the local
platform writes).

Theory of operation. The directory is read by the config lib's FileStore, watched for the
ServiceEntry kind: every object at start, SYNCED, then each change other processes make to the
files. The registry keeps the current objects by key and, after SYNCED and after each change,
rebuilds its snapshot with the pure conversion module and reports the kind of change.

Files that do not parse or validate never reach the snapshot: FileStore keeps them out (a file
that turns bad keeps its last good objects) and lists what is wrong, with file, document,
object and field, in `FileStore.problems`; the registry shows those in `status.last_error`,
with hosts that entries define in conflicting ways and `auth.istio.io/<port>` annotations it
ignored (those are logged too, once each). A file turning bad (or good again) changes
no object, so no watch event tells of it: FileStore calls the registry back with its new
problems instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from istio.config import Config, ConfigKey, Problem
from istio.configstore import ConfigEvent, EventType
from istio.configstore.file import FileStore
from istio.pilot.registry import ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.serviceentry.conversion import KIND, build_snapshot
from istio.pilot.registry.status import Backoff, StatusBoard, report

log = logging.getLogger(__name__)


class ServiceEntryRegistry:
    """The ServiceEntries in the files under `directory` (created when missing)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._configs: dict[ConfigKey, Config] = {}
        self._clashes: tuple[str, ...] = ()
        self._annotation_problems: tuple[str, ...] = ()
        self._failure = ""
        self._snapshot = RegistrySnapshot()
        self._board = StatusBoard()
        self._backoff = Backoff()
        self._changed: ChangeCallback | None = None

    @property
    def name(self) -> str:
        return f"files:{self._directory}"

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    @property
    def status(self) -> RegistryStatus:
        return self._board.status

    async def wait_status(self, predicate: Callable[[RegistryStatus], bool]) -> RegistryStatus:
        """Wait until the status satisfies `predicate` (synced, healthy, an error shown...)."""
        return await self._board.wait(predicate)

    async def run(self, changed: ChangeCallback) -> None:
        self._changed = changed
        failures = 0
        try:
            while True:
                store: FileStore | None = None
                try:
                    store = FileStore(self._directory, on_problems=self._problems_changed)
                    await self._follow(store)
                    failures = 0
                except Exception as error:  # a bug or a broken directory: retried, never fatal
                    failures += 1
                    self._failure = f"cannot watch {self._directory}: {error}"
                    log.warning("%s; keeping the last snapshot and retrying", self._failure)
                    self._board.failed(self._failure)
                finally:
                    if store is not None:
                        await store.close()
                await asyncio.sleep(self._backoff.delay(failures))
        finally:
            self._changed = None

    async def _follow(self, store: FileStore) -> None:
        """Follow the files until the watch fails; the snapshot is replaced only once the
        store has listed every object (a restarted watch lists them all again)."""
        listing: dict[ConfigKey, Config] = {}
        synced = False
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

    def _problems_changed(self, problems: list[Problem]) -> None:
        self._board.set(replace(self._board.status, last_error=self._describe(problems)))

    def _publish(self, store: FileStore) -> None:
        conversion = build_snapshot(self._configs.values())
        change = conversion.snapshot.change_from(self._snapshot)
        self._snapshot, self._clashes = conversion.snapshot, conversion.clashes
        for problem in conversion.annotation_problems:
            if problem not in self._annotation_problems:
                log.warning("%s: %s", self.name, problem)
        self._annotation_problems = conversion.annotation_problems
        change = self._board.published(change, last_error=self._describe(store.problems))
        report(self._changed, change, self.name)

    def _describe(self, problems: list[Problem]) -> str:
        """What is wrong: this registry's failure, bad files (ServiceEntries or documents of
        no known kind; other kinds are other readers' business), conflicting hosts, ignored
        annotations."""
        shown = [str(p) for p in problems if p.kind in ("", KIND)]
        return "; ".join(
            m for m in (self._failure, *shown, *self._clashes, *self._annotation_problems) if m
        )


def _apply(configs: dict[ConfigKey, Config], event: ConfigEvent) -> None:
    if event.config is None:
        return
    if event.type is EventType.DELETED:
        configs.pop(event.config.key, None)
    else:
        configs[event.config.key] = event.config
