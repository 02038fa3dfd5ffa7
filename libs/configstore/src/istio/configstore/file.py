"""A directory of YAML/JSON files as a config store (`file:///dir`).

Theory of operation. The directory is the truth: every `*.yaml`, `*.yml` and `*.json` under it
(hidden files aside), multi-document, any name, hand-written or not. The store keeps a view
(key -> object and the file it came from) rebuilt by scanning; files whose size, mtime and
inode are unchanged are not parsed again. A file that stops parsing keeps its last good objects
in the view and its problems in `problems`, so a typo in an editor never drops live config.

Writes take an flock on `.istio-store.lock` (other processes, such as istioctl beside a running
Pilot, write too), rescan, check, then write one file per object atomically: a temporary file
in the same directory, fsync, rename, fsync of the directory. A crash leaves the old file or
the new one, never half of one. An object that lives in a hand-written multi-document file is
replaced or removed within that file, leaving the other documents' text as it was.

Watches get this store's own writes as ordered events at once; edits made by others are found
through filesystem notifications (watchfiles) and reported as the difference between two scans,
so a burst of outside edits may arrive as one net change. Notifications for config files and
for directories coming or going start a rescan: a directory moved in whole, or one whose files
were written before its own watch began, is read by that scan. A file that turns bad (or good
again) changes no object, so it makes no event; `on_problems` hears of it instead.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import watchfiles

from istio.config import (
    DEFAULT_REGISTRY,
    AlreadyExists,
    Config,
    ConfigError,
    ConfigKey,
    Conflict,
    NotFound,
    Problem,
    SchemaRegistry,
    parse_documents,
    to_object,
)
from istio.config.model import DEFAULT_NAMESPACE
from istio.config.parse import dump_yaml
from istio.configstore.store import ConfigEvent, EventType, check_writable, known_kind

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
LOCK_NAME = ".istio-store.lock"
_DOCUMENT_START = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)


@dataclass(slots=True)
class _FileState:
    stamp: tuple[int, int, int]
    configs: list[Config]
    problems: list[Problem]


@dataclass(frozen=True, slots=True)
class _Entry:
    config: Config
    path: Path


@dataclass(slots=True)
class _Watcher:
    kinds: frozenset[str] | None
    queue: asyncio.Queue[ConfigEvent] = field(default_factory=asyncio.Queue)

    def offer(self, event: ConfigEvent) -> None:
        if event.config is None or self.kinds is None or event.config.meta.kind in self.kinds:
            self.queue.put_nowait(event)


def content_version(config: Config) -> str:
    """The resource version of a file-backed object: a hash of what the user wrote."""
    document = to_object(config, with_status_fields=False)
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
    return digest[:16]


ProblemsCallback = Callable[[list[Problem]], None]


class FileStore:
    """The files under `root` (created when missing).

    `on_problems`, when given, is called with the new `problems` each time a scan finds them
    changed: on reads and writes, and while a watch runs, after outside edits. It runs inside
    the store, so it must not block or call the store back.
    """

    def __init__(
        self,
        root: Path,
        *,
        registry: SchemaRegistry = DEFAULT_REGISTRY,
        on_problems: ProblemsCallback | None = None,
    ) -> None:
        self.root = root
        self._registry = registry
        self._on_problems = on_problems
        self._files: dict[Path, _FileState] = {}
        self._directories: set[str] = set()
        self._view: dict[ConfigKey, _Entry] = {}
        self._problems: builtins.list[Problem] = []
        self._lock = asyncio.Lock()
        self._watchers: builtins.list[_Watcher] = []
        self._notifier: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        root.mkdir(parents=True, exist_ok=True)

    @property
    def registry(self) -> SchemaRegistry:
        return self._registry

    @property
    def problems(self) -> builtins.list[Problem]:
        """What is wrong with the files as they are now (each file's objects stay as last good)."""
        return list(self._problems)

    async def get(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> Config | None:
        known_kind(self._registry, kind)
        async with self._lock:
            self._refresh()
            entry = self._view.get(ConfigKey(kind, namespace, name))
            return entry.config if entry else None

    async def list(self, kind: str, namespace: str | None = None) -> list[Config]:
        known_kind(self._registry, kind)
        async with self._lock:
            self._refresh()
            found = [
                e.config
                for key, e in self._view.items()
                if key.kind == kind and (namespace is None or key.namespace == namespace)
            ]
        return sorted(found, key=lambda c: (c.meta.namespace, c.meta.name))

    async def create(self, config: Config) -> Config:
        check_writable(self._registry, config)
        async with self._locked():
            if config.key in self._view:
                raise AlreadyExists(_problem(config.key, "already exists"))
            stored = self._stamp(config, datetime.now(UTC).replace(microsecond=0))
            path = self._new_path(config.key)
            _write_atomically(path, dump_yaml([to_object(stored, with_status_fields=False)]))
            self._record_write(path, stored)
            return stored

    async def update(self, config: Config) -> Config:
        check_writable(self._registry, config)
        async with self._locked():
            current = self._current(config.key, config.meta.resource_version)
            stored = self._stamp(config, current.config.meta.creation_timestamp)
            self._rewrite(current.path, config.key, stored)
            self._record_write(current.path, stored, previous=current.config)
            return stored

    async def delete(
        self,
        kind: str,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        resource_version: str = "",
    ) -> None:
        known_kind(self._registry, kind)
        key = ConfigKey(kind, namespace, name)
        async with self._locked():
            current = self._current(key, resource_version)
            self._rewrite(current.path, key, None)
            self._refresh_file(current.path)
            del self._view[key]
            self._broadcast(ConfigEvent(EventType.DELETED, current.config))

    async def watch(self, kinds: Collection[str] | None = None) -> AsyncIterator[ConfigEvent]:
        for kind in kinds or ():
            known_kind(self._registry, kind)
        watcher = _Watcher(frozenset(kinds) if kinds is not None else None)
        async with self._lock:
            self._refresh()
            for key in sorted(self._view):
                watcher.offer(ConfigEvent(EventType.ADDED, self._view[key].config))
            watcher.offer(ConfigEvent(EventType.SYNCED))
            self._watchers.append(watcher)
            if self._notifier is None:
                self._notifier = asyncio.create_task(self._follow_files())
        try:
            while True:
                event = await watcher.queue.get()
                if event.type is EventType.SYNCED and event.config is None and self._stop.is_set():
                    return
                yield event
        finally:
            self._watchers.remove(watcher)

    async def close(self) -> None:
        self._stop.set()
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notifier
            self._notifier = None
        for watcher in self._watchers:
            # A SYNCED event after stop tells the watch to end.
            watcher.queue.put_nowait(ConfigEvent(EventType.SYNCED))

    # -- internals ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        async with self._lock:
            lock_file = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                await asyncio.to_thread(fcntl.flock, lock_file, fcntl.LOCK_EX)
                self._refresh()
                yield
            finally:
                os.close(lock_file)

    def _current(self, key: ConfigKey, resource_version: str) -> _Entry:
        entry = self._view.get(key)
        if entry is None:
            raise NotFound(_problem(key, "not found"))
        if resource_version and resource_version != entry.config.meta.resource_version:
            raise Conflict(
                _problem(
                    key,
                    f"changed since it was read (resource version {resource_version} is stale, "
                    f"current is {entry.config.meta.resource_version}); get it and try again",
                )
            )
        return entry

    def _stamp(self, config: Config, created: datetime | None) -> Config:
        config = config.with_meta(creation_timestamp=created, resource_version="")
        return config.with_meta(resource_version=content_version(config))

    def _new_path(self, key: ConfigKey) -> Path:
        stem = f"{key.kind.lower()}-{key.namespace}-{key.name}"
        path = self.root / f"{stem}.yaml"
        counter = 1
        while path.exists():
            path = self.root / f"{stem}-{counter}.yaml"
            counter += 1
        return path

    def _rewrite(self, path: Path, key: ConfigKey, replacement: Config | None) -> None:
        """Replace (or with None remove) the object `key` in `path`, keeping other documents."""
        text = path.read_text()
        chunks = _split_documents(text)
        kept: list[str] = []
        found = False
        for chunk in chunks:
            configs, _ = parse_documents(chunk, str(path), registry=self._registry)
            if any(c.key == key for c in configs):
                found = True
                if replacement is not None:
                    kept.append(dump_yaml([to_object(replacement, with_status_fields=False)]))
            elif chunk.strip():
                kept.append(chunk if chunk.endswith("\n") else chunk + "\n")
        if not found:
            raise ConfigError(
                _problem(key, f"could not be found in {path} to rewrite; edit that file by hand")
            )
        if any(_has_content(k) for k in kept):
            _write_atomically(path, "---\n".join(kept))
        else:
            path.unlink()
            _fsync_directory(path.parent)

    def _record_write(self, path: Path, stored: Config, previous: Config | None = None) -> None:
        self._refresh_file(path)
        self._view[stored.key] = _Entry(stored, path)
        kind = EventType.UPDATED if previous is not None else EventType.ADDED
        self._broadcast(ConfigEvent(kind, stored))

    def _broadcast(self, event: ConfigEvent) -> None:
        for watcher in self._watchers:
            watcher.offer(event)

    async def _follow_files(self) -> None:
        async for _ in watchfiles.awatch(
            self.root, stop_event=self._stop, watch_filter=self._needs_rescan, recursive=True
        ):
            async with self._lock:
                self._refresh()

    def _refresh(self) -> None:
        """Rescan, update the view, and tell watchers what others changed."""
        paths = self._config_files()
        for gone in set(self._files) - paths:
            del self._files[gone]
        for path in paths:
            self._refresh_file(path)
        view, problems = self._build_view()
        for key in sorted(set(self._view) | set(view)):
            old, new = self._view.get(key), view.get(key)
            if new is None and old is not None:
                self._broadcast(ConfigEvent(EventType.DELETED, old.config))
            elif new is not None and old is None:
                self._broadcast(ConfigEvent(EventType.ADDED, new.config))
            elif (
                new is not None
                and old is not None
                and (new.config.meta.resource_version != old.config.meta.resource_version)
            ):
                self._broadcast(ConfigEvent(EventType.UPDATED, new.config))
        self._view = view
        if problems != self._problems:
            for problem in problems:
                if problem not in self._problems:
                    log.warning("config file rejected: %s", problem)
            self._problems = problems
            if self._on_problems is not None:
                try:
                    self._on_problems(list(problems))
                except Exception:
                    log.exception("the problems callback of the file store at %s failed", self.root)

    def _refresh_file(self, path: Path) -> None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._files.pop(path, None)
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        state = self._files.get(path)
        if state is not None and state.stamp == stamp:
            return
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            problems = [Problem(f"cannot read: {error}", source=str(path))]
            configs = state.configs if state else []
            self._files[path] = _FileState(stamp, configs, problems)
            return
        configs, problems = parse_documents(text, str(path), registry=self._registry)
        if problems and state is not None:
            configs = state.configs  # the last good objects stay in force
        created = datetime.fromtimestamp(stat.st_mtime, UTC).replace(microsecond=0)
        configs = [
            self._stamp(c, c.meta.creation_timestamp or created)
            if not c.meta.resource_version or c.meta.creation_timestamp is None
            else c
            for c in configs
        ]
        self._files[path] = _FileState(stamp, configs, problems)

    def _build_view(self) -> tuple[dict[ConfigKey, _Entry], builtins.list[Problem]]:
        view: dict[ConfigKey, _Entry] = {}
        problems: builtins.list[Problem] = []
        for path in sorted(self._files):
            state = self._files[path]
            problems.extend(state.problems)
            for config in state.configs:
                other = view.get(config.key)
                if other is not None:
                    problems.append(
                        Problem(
                            f"defined again; the one in {other.path} is used",
                            source=str(path),
                            kind=config.meta.kind,
                            name=f"{config.meta.namespace}/{config.meta.name}",
                        )
                    )
                    continue
                view[config.key] = _Entry(config, path)
        return view, problems

    def _config_files(self) -> set[Path]:
        """Every config file under the root; the directories walked are remembered, so that
        the watch knows one when it goes away."""
        found: set[Path] = set()
        directories: set[str] = set()
        for directory, subdirectories, files in os.walk(self.root):
            directories.add(os.path.abspath(directory))
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
            found.update(
                Path(directory) / name
                for name in files
                if not name.startswith(".") and name.endswith(SUFFIXES)
            )
        self._directories = directories
        return found

    def _needs_rescan(self, change: watchfiles.Change, path: str) -> bool:
        """The watch filter: config files, and directories created or removed (hidden names
        aside); other files are not ours."""
        name = os.path.basename(path)
        if name.startswith("."):
            return False
        if name.endswith(SUFFIXES):
            return True
        if change is watchfiles.Change.added:
            return os.path.isdir(path)
        if change is watchfiles.Change.deleted:
            return os.path.abspath(path) in self._directories
        return False


def _problem(key: ConfigKey, message: str) -> Problem:
    return Problem(message, kind=key.kind, name=f"{key.namespace}/{key.name}")


def _split_documents(text: str) -> list[str]:
    starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
    bounds = [0, *starts, len(text)]
    chunks = []
    for begin, end in itertools.pairwise(bounds):
        chunk = text[begin:end]
        if chunk.startswith("---"):
            chunk = chunk.split("\n", 1)[1] if "\n" in chunk else ""
        chunks.append(chunk)
    return chunks


def _has_content(chunk: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in chunk.splitlines())


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
