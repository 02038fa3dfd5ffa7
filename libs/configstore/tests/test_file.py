"""The file store's own promises: any hand-written layout, last good config kept, atomic
writes, and outside edits reported to watchers."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from istio.config import Problem, parse_object
from istio.configstore import ConfigEvent, EventType, open_store
from istio.configstore.file import FileStore

HAND_WRITTEN = """\
# Bookinfo rules, kept by hand.
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: reviews-default
spec:
  destination: {name: reviews}
  route: [{labels: {version: v1}}]
---
# ratings stays on v1 (this comment must survive edits to the other document)
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata:
  name: ratings-default
spec:
  destination: {name: ratings}
  route: [{labels: {version: v1}}]
"""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FileStore]:
    file_store = open_store(f"file://{tmp_path / 'config'}")
    assert isinstance(file_store, FileStore)
    yield file_store
    await file_store.close()


async def next_event(events: AsyncIterator[ConfigEvent]) -> ConfigEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


def replace_file(path: Path, text: str) -> None:
    """Write as editors do (a hidden temporary file, then a rename): never half a file."""
    descriptor, temporary = tempfile.mkstemp(prefix=".", dir=path.parent)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def test_creates_its_directory(tmp_path: Path) -> None:
    open_store(f"file://{tmp_path / 'a' / 'b'}")
    assert (tmp_path / "a" / "b").is_dir()


async def test_reads_any_file_name_and_nesting(store: FileStore) -> None:
    (store.root / "team-a").mkdir()
    (store.root / "team-a" / "whatever.yml").write_text(HAND_WRITTEN)
    (store.root / "notes.txt").write_text("not config")
    (store.root / ".hidden.yaml").write_text("garbage: [")
    names = [c.meta.name for c in await store.list("RouteRule")]
    assert names == ["ratings-default", "reviews-default"]
    assert store.problems == []


async def test_editing_one_document_keeps_the_others_text(store: FileStore) -> None:
    path = store.root / "bookinfo.yaml"
    path.write_text(HAND_WRITTEN)
    current = await store.get("RouteRule", "reviews-default")
    assert current is not None
    changed = parse_object(
        {
            "kind": "RouteRule",
            "metadata": {"name": "reviews-default"},
            "spec": {"destination": {"name": "reviews"}, "route": [{"labels": {"version": "v3"}}]},
        }
    ).with_meta(resource_version=current.meta.resource_version)
    await store.update(changed)
    text = path.read_text()
    assert "this comment must survive" in text
    assert "version: v3" in text
    await store.delete("RouteRule", "reviews-default")
    assert "reviews-default" not in path.read_text()
    assert "this comment must survive" in path.read_text()
    await store.delete("RouteRule", "ratings-default")
    assert not path.exists()


async def test_a_broken_file_keeps_its_last_good_objects(store: FileStore) -> None:
    path = store.root / "bookinfo.yaml"
    path.write_text(HAND_WRITTEN)
    assert len(await store.list("RouteRule")) == 2
    path.write_text(HAND_WRITTEN.replace("route: [{labels: {version: v1}}]\n---", "route: [\n---"))
    assert len(await store.list("RouteRule")) == 2
    assert [p.source for p in store.problems] == [str(path)]
    assert "malformed YAML" in str(store.problems[0])
    path.write_text(HAND_WRITTEN.split("---")[0])
    assert [c.meta.name for c in await store.list("RouteRule")] == ["reviews-default"]
    assert store.problems == []


async def test_duplicates_across_files_are_reported(store: FileStore) -> None:
    (store.root / "a.yaml").write_text(HAND_WRITTEN)
    (store.root / "b.yaml").write_text(HAND_WRITTEN.split("---")[0])
    assert len(await store.list("RouteRule")) == 2
    assert len(store.problems) == 1
    assert "defined again; the one in" in str(store.problems[0])


async def test_outside_edits_reach_watchers(store: FileStore) -> None:
    events = aiter(store.watch())
    assert (await next_event(events)).type is EventType.SYNCED
    (store.root / "bookinfo.yaml").write_text(HAND_WRITTEN)
    seen = {}
    while len(seen) < 2:
        event = await next_event(events)
        assert event.type is EventType.ADDED
        assert event.config is not None
        seen[event.config.meta.name] = event
    (store.root / "bookinfo.yaml").unlink()
    gone = {(await next_event(events)).type for _ in range(2)}
    assert gone == {EventType.DELETED}
    await events.aclose()  # type: ignore[attr-defined]


async def test_writes_leave_no_temporary_files(store: FileStore) -> None:
    config = parse_object(
        {
            "kind": "EgressRule",
            "metadata": {"name": "google"},
            "spec": {
                "destination": {"service": "*.googleapis.com"},
                "ports": [{"port": 443, "protocol": "https"}],
            },
        }
    )
    await store.create(config)
    files = sorted(p.name for p in store.root.iterdir())
    assert files == [".istio-store.lock", "egressrule-default-google.yaml"]
    assert oct(os.stat(store.root / files[1]).st_mode & 0o777) == "0o644"


async def test_a_file_turning_bad_or_good_is_announced(tmp_path: Path) -> None:
    announced: asyncio.Queue[list[Problem]] = asyncio.Queue()
    store = FileStore(tmp_path / "config", on_problems=announced.put_nowait)
    events = aiter(store.watch())
    assert (await next_event(events)).type is EventType.SYNCED
    path = store.root / "bookinfo.yaml"
    replace_file(path, "garbage: [")
    problems = await asyncio.wait_for(announced.get(), timeout=10)
    assert [p.source for p in problems] == [str(path)]
    assert "malformed YAML" in str(problems[0])
    assert store.problems == problems
    replace_file(path, HAND_WRITTEN)
    assert await asyncio.wait_for(announced.get(), timeout=10) == []
    # The bad file made no event: the first ones are the fixed file's objects.
    added = [await next_event(events) for _ in range(2)]
    assert {e.type for e in added} == {EventType.ADDED}
    assert {e.config.meta.name for e in added if e.config} == {"ratings-default", "reviews-default"}
    await events.aclose()  # type: ignore[attr-defined]
    await store.close()


async def test_directories_moved_in_and_out_are_rescanned(store: FileStore, tmp_path: Path) -> None:
    events = aiter(store.watch())
    assert (await next_event(events)).type is EventType.SYNCED
    outside = tmp_path / "team-a"
    outside.mkdir()
    (outside / "rules.yaml").write_text(HAND_WRITTEN)
    outside.rename(store.root / "team-a")  # no event for the file: only the directory's
    added = [await next_event(events) for _ in range(2)]
    assert {e.type for e in added} == {EventType.ADDED}
    (store.root / "team-a").rename(outside)
    gone = [await next_event(events) for _ in range(2)]
    assert {e.type for e in gone} == {EventType.DELETED}
    assert await store.list("RouteRule") == []
    await events.aclose()  # type: ignore[attr-defined]
