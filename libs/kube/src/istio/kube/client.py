"""An asyncio client for the Kubernetes REST API: requests, paginated lists and watches.

Theory of operation (watches). `watch(resources)` works as client-go's reflector does: list each
resource across all namespaces and report every object listed (ADDED), say SYNCED once all are
listed, then watch each resource from its list's resourceVersion, with bookmarks so that a
reconnect resumes from a recent version. A watch the server ends is reopened where it stopped.
A 410 Gone (the server no longer keeps history back to that version) is answered by listing
again and reporting the difference from what this watch reported before, so a reader never
misses a change, though changes made during the gap arrive as one net change. A dropped
connection is retried with exponential backoff, capped at RETRY_MAX seconds; the reader is told
(INTERRUPTED, with the reason) and told again when the resource is followed again (RESUMED), so
that it can show its health. Errors that retrying cannot cure (401, 403, 404: the resource is not
served) end the watch by raising ApiError to the reader, naming the resource.

Each watched resource holds one connection: the session has no connection limit.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from istio.kube.access import ClusterAccess
from istio.kube.errors import ApiError, KubeError, Unreachable
from istio.kube.resource import Resource

log = logging.getLogger(__name__)

JSON = dict[str, Any]
ObjectKey = tuple[str, str]  # (namespace, name); the namespace is "" for cluster-scoped objects

REQUEST_TIMEOUT = 30.0
WATCH_TIMEOUT = 300  # timeoutSeconds asked of the server for one watch request
RETRY_INITIAL = 0.1
RETRY_MAX = 10.0
SHORT_WATCH = 1.0  # a watch that ends sooner, without an event, is retried after a pause
LIST_PAGE = 500
_RETRYABLE = frozenset({429, 500, 502, 503, 504})


class EventType(enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    SYNCED = "SYNCED"  # every resource has been listed: the reader's view is complete
    INTERRUPTED = "INTERRUPTED"  # following a resource failed; retrying (see `reason`)
    RESUMED = "RESUMED"  # the resource is followed again after an interruption


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One thing a watch saw. `object` is set for ADDED, MODIFIED and DELETED (for DELETED, its
    last state seen); `resource` for all but SYNCED; `reason` for INTERRUPTED."""

    type: EventType
    resource: Resource | None = None
    object: JSON | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ObjectList:
    """Every object of a list request (all pages), and the list's resourceVersion."""

    items: builtins.list[JSON]
    resource_version: str


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def resource_version(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("resourceVersion") or "") if isinstance(meta, Mapping) else ""


_Queue = asyncio.Queue[WatchEvent | BaseException | None]


class KubeClient:
    """Requests to one API server. The HTTP session opens on first use; `close` ends every
    watch (their iterators stop) and releases connections. A closed client may be used again."""

    def __init__(self, access: ClusterAccess, *, user_agent: str = "istio") -> None:
        self._access = access
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._watch_queues: set[_Queue] = set()
        self._watch_tasks: set[asyncio.Task[None]] = set()

    @property
    def access(self) -> ClusterAccess:
        return self._access

    async def request(
        self,
        method: str,
        path: str,
        body: JSON | None = None,
        params: Mapping[str, str] | None = None,
    ) -> JSON:
        """One request; its JSON answer. ApiError for an error Status, Unreachable when the
        server cannot be reached, AccessError for unusable credentials."""
        session = self._client()
        try:
            async with session.request(
                method,
                self._access.server + path,
                json=body,
                params=params,
                headers=self._headers(),
                server_hostname=self._access.tls_server_name or None,
            ) as response:
                if response.status >= 400:
                    raise await _api_error(response)
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise self._unreachable(error) from None
        except ValueError:
            raise KubeError(
                f"the API server at {self._access.server} answered {method} {path} with "
                "something that is not JSON"
            ) from None
        if not isinstance(payload, dict):
            raise KubeError(
                f"the API server at {self._access.server} answered {path} with a non-object"
            )
        return payload

    async def list(self, resource: Resource, namespace: str | None = None) -> ObjectList:
        """Every object of a resource in one namespace (all when None), page by page."""
        items: builtins.list[JSON] = []
        params = {"limit": str(LIST_PAGE)}
        version = ""
        while True:
            try:
                page = await self.request("GET", resource.collection(namespace), params=params)
            except ApiError as error:
                error.resource = resource
                raise
            metadata = page.get("metadata") or {}
            version = version or str(metadata.get("resourceVersion", ""))
            items.extend(item for item in page.get("items") or [] if isinstance(item, dict))
            if not metadata.get("continue"):
                return ObjectList(items, version)
            params = {"limit": str(LIST_PAGE), "continue": str(metadata["continue"])}

    def watch(self, resources: Sequence[Resource]) -> AsyncGenerator[WatchEvent, None]:
        """The objects of `resources` in all namespaces, then their changes, as the module
        docstring describes. Listing errors are raised at once. Close it (aclose, or
        contextlib.aclosing) to stop following."""
        return self._watch(resources)

    async def close(self) -> None:
        for queue in self._watch_queues:
            queue.put_nowait(None)
        tasks = builtins.list(self._watch_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- watching --------------------------------------------------------------------------------

    async def _watch(self, resources: Sequence[Resource]) -> AsyncGenerator[WatchEvent, None]:
        listed = await asyncio.gather(*(self.list(r) for r in resources))
        # Followers start now and queue what they see while the listing is being read; each
        # keeps the state of its resource as reported, starting from the listing.
        queue: _Queue = asyncio.Queue()
        tasks = [
            asyncio.create_task(
                self._follow(
                    resource,
                    objects.resource_version,
                    {object_key(o): o for o in objects.items},
                    queue,
                )
            )
            for resource, objects in zip(resources, listed, strict=True)
        ]
        self._watch_queues.add(queue)
        self._watch_tasks.update(tasks)
        try:
            for resource, objects in zip(resources, listed, strict=True):
                for obj in objects.items:
                    yield WatchEvent(EventType.ADDED, resource, obj)
            yield WatchEvent(EventType.SYNCED)
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._watch_tasks.difference_update(tasks)
            self._watch_queues.discard(queue)

    async def _follow(
        self, resource: Resource, version: str, state: dict[ObjectKey, JSON], queue: _Queue
    ) -> None:
        """Watch one resource from `version` for as long as the watch runs, keeping `state`
        equal to what has been reported."""
        loop = asyncio.get_running_loop()
        delay = RETRY_INITIAL
        relist = False
        interrupted = False

        def opened() -> None:
            nonlocal interrupted
            if interrupted:
                interrupted = False
                log.info("watch of %s resumed", resource)
                queue.put_nowait(WatchEvent(EventType.RESUMED, resource))

        while True:
            try:
                if relist:
                    version = await self._relist(resource, state, queue)
                    relist = False
                    opened()
                started, received = loop.time(), False
                async for event_type, obj in self._stream(resource, version, opened):
                    received, delay = True, RETRY_INITIAL
                    if event_type == "ERROR":
                        raise ApiError(int(obj.get("code") or 500), obj, resource)
                    version = resource_version(obj) or version
                    if event_type != "BOOKMARK":
                        for event in _apply(resource, state, event_type, obj):
                            queue.put_nowait(event)
                if received or loop.time() - started >= SHORT_WATCH:
                    continue  # the server ended the watch (timeoutSeconds): resume at once
                reason = "the server ended the watch at once"
            except ApiError as error:
                if error.code == 410:
                    log.info("%s: %s; listing again", resource, error.message)
                    relist = True
                    continue
                if error.code not in _RETRYABLE:
                    queue.put_nowait(error)
                    return
                reason = f"the API server at {self._access.server} answered {error}"
            except Unreachable as error:
                reason = str(error)
            except Exception as error:  # a bug, or bad credentials: tell the reader
                queue.put_nowait(error)
                return
            interrupted = True
            queue.put_nowait(WatchEvent(EventType.INTERRUPTED, resource, reason=reason))
            pause = delay * random.uniform(0.5, 1.0)
            log.warning("watch of %s interrupted (%s); retrying in %.1fs", resource, reason, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, RETRY_MAX)

    async def _stream(
        self, resource: Resource, version: str, opened: Callable[[], None]
    ) -> AsyncIterator[tuple[str, JSON]]:
        """The events of one watch request, as (type, object); `opened` is called once the
        server has accepted the request."""
        params = {
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT),
        }
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=REQUEST_TIMEOUT, sock_read=WATCH_TIMEOUT + REQUEST_TIMEOUT
        )
        try:
            async with self._client().get(
                self._access.server + resource.collection(),
                params=params,
                headers=self._headers(),
                timeout=timeout,
                server_hostname=self._access.tls_server_name or None,
            ) as response:
                if response.status >= 400:
                    error = await _api_error(response)
                    error.resource = resource
                    raise error
                opened()
                pending = b""
                async for chunk in response.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if line.strip():
                            event = json.loads(line)
                            obj = event.get("object")
                            yield str(event.get("type", "")), obj if isinstance(obj, dict) else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise self._unreachable(error) from None

    async def _relist(self, resource: Resource, state: dict[ObjectKey, JSON], queue: _Queue) -> str:
        """List a resource again and report how it differs from `state`; the list's version."""
        objects = await self.list(resource)
        fresh = {object_key(o): o for o in objects.items}
        for key in sorted(state.keys() - fresh.keys()):
            queue.put_nowait(WatchEvent(EventType.DELETED, resource, state.pop(key)))
        for event in _changes(resource, state, fresh.values()):
            queue.put_nowait(event)
        return objects.resource_version

    # -- requests --------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = self._access.ssl_context()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=context if context is not None else True, limit=0
                ),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
                headers={"Accept": "application/json", "User-Agent": self._user_agent},
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        authorization = self._access.authorization()
        return {"Authorization": authorization} if authorization else {}

    def _unreachable(self, error: BaseException) -> Unreachable:
        reason = str(error) or type(error).__name__
        return Unreachable(
            f"cannot reach the Kubernetes API server at {self._access.server} "
            f"({self._access.source}): {reason}"
        )


def _apply(
    resource: Resource, state: dict[ObjectKey, JSON], event_type: str, obj: JSON
) -> builtins.list[WatchEvent]:
    """The events a watch event means for a reader holding `state`; updates `state`."""
    if event_type == "DELETED":
        gone = state.pop(object_key(obj), None)
        return [WatchEvent(EventType.DELETED, resource, obj)] if gone is not None else []
    return builtins.list(_changes(resource, state, [obj]))


def _changes(
    resource: Resource, state: dict[ObjectKey, JSON], objects: Iterable[JSON]
) -> Iterable[WatchEvent]:
    """ADDED or MODIFIED for each object `state` does not hold at its version; updates `state`."""
    for obj in objects:
        key = object_key(obj)
        before = state.get(key)
        if before is not None and resource_version(before) == resource_version(obj):
            continue
        state[key] = obj
        yield WatchEvent(EventType.MODIFIED if before else EventType.ADDED, resource, obj)


async def _api_error(response: aiohttp.ClientResponse) -> ApiError:
    text = await response.text()
    try:
        status = json.loads(text)
    except ValueError:
        status = None
    if not isinstance(status, dict) or status.get("kind") != "Status":
        status = {"message": text.strip()[:300] or response.reason or ""}
    return ApiError(response.status, status)
