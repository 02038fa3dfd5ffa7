"""Follows a Kubernetes cluster's Services, Endpoints, Pods and Nodes, in every namespace.

Theory of operation. istio.kube lists and watches the four resources (one list+watch each, with
bookmarks, 410 Gone relists and reconnects; see istio.kube.client). Until the first SYNCED the
objects only fill a fresh state; at SYNCED that state replaces the current one and every
service is converted. After that each event updates the state and re-converts only the
services it can affect: a Service or Endpoints event its own service, a Pod event the services
whose Endpoints list one of the Pod's IPs (and only when what the mesh reads of the Pod changed:
labels, service account, node, IPs), a Node event every service, when its locality changed.
The kind of change is judged per service (the Service record, or only its instances) and
reported once per event.

Only a small digest of Pods and Nodes is kept (PodInfo, a locality string), so a large cluster's
frequent Pod status and Node heartbeat updates cost a comparison each. Watching Nodes needs
cluster-wide read access to them; when that is refused, the registry goes on without localities.

When the API server goes away the last snapshot stays and the status says unhealthy with the
reason; a watch that cannot be resumed is started again after a backoff, listing everything
again, and the new state replaces the old one only once it is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from istio.kube import (
    ApiError,
    EventType,
    KubeClient,
    Resource,
    WatchEvent,
    load_cluster_access,
)
from istio.model import Service, ServiceInstance
from istio.model.service import DEFAULT_DOMAIN
from istio.pilot.registry import Change, ChangeCallback, RegistrySnapshot, RegistryStatus
from istio.pilot.registry.kube.conversion import (
    ObjectKey,
    PodIndex,
    auth_annotation_problems,
    convert_service,
    endpoint_ips,
    node_locality,
    object_key,
    pod_info,
)
from istio.pilot.registry.status import Backoff, StatusBoard, report

log = logging.getLogger(__name__)

SERVICES = Resource("", "v1", "services")
ENDPOINTS = Resource("", "v1", "endpoints")
PODS = Resource("", "v1", "pods")
NODES = Resource("", "v1", "nodes", namespaced=False)

Converted = tuple[Service, tuple[ServiceInstance, ...]]


@dataclass(slots=True)
class _State:
    """What the registry keeps of the cluster, and which services each event affects."""

    services: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)
    pods: PodIndex = field(default_factory=PodIndex)
    localities: dict[str, str] = field(default_factory=dict)
    ips: dict[ObjectKey, set[str]] = field(default_factory=dict)  # Endpoints -> IPs listed
    by_ip: dict[str, set[ObjectKey]] = field(default_factory=dict)  # IP -> Endpoints

    def apply(self, event: WatchEvent) -> set[ObjectKey]:
        """Record an object event; the services (by namespace/name) it may change."""
        assert event.object is not None
        key, deleted = object_key(event.object), event.type is EventType.DELETED
        if event.resource == SERVICES:
            _put(self.services, key, None if deleted else event.object)
            return {key}
        if event.resource == ENDPOINTS:
            _put(self.endpoints, key, None if deleted else event.object)
            self._index_ips(key, set() if deleted else endpoint_ips(event.object))
            return {key}
        if event.resource == PODS:
            before, after = self.pods.get(key), None if deleted else pod_info(event.object)
            if before == after:
                return set()
            if after is None:
                self.pods.remove(key)
            else:
                self.pods.put(key, after)
            ips = {*(before.ips if before else ()), *(after.ips if after else ())}
            return {service for ip in ips for service in self.by_ip.get(ip, ())}
        if event.resource == NODES:
            name, locality = key[1], "" if deleted else node_locality(event.object)
            if self.localities.get(name, "") == locality:
                return set()
            _put(self.localities, name, locality or None)
            return set(self.services)
        return set()

    def _index_ips(self, key: ObjectKey, ips: set[str]) -> None:
        for ip in self.ips.pop(key, set()) - ips:
            keys = self.by_ip[ip]
            keys.discard(key)
            if not keys:
                del self.by_ip[ip]
        for ip in ips:
            self.by_ip.setdefault(ip, set()).add(key)
        if ips:
            self.ips[key] = ips


def _put(table: dict[Any, Any], key: Any, value: Any) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value


class KubeRegistry:
    """The services of one Kubernetes cluster, found as kubectl finds it (see istio.kube)."""

    def __init__(
        self,
        kubeconfig: Path | None = None,
        context: str | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        self._kubeconfig = kubeconfig
        self._context = context
        self._domain = domain
        self._resources = [SERVICES, ENDPOINTS, PODS, NODES]
        self._state = _State()
        self._converted: dict[ObjectKey, Converted] = {}
        # What was logged last about each Service's auth.istio.io annotations: logged again
        # only when it changes, not at every conversion (Endpoints and Pod events).
        self._auth_problems: dict[ObjectKey, tuple[str, ...]] = {}
        self._interrupted: dict[Resource, str] = {}
        self._snapshot = RegistrySnapshot()
        self._board = StatusBoard()
        self._backoff = Backoff()
        self._changed: ChangeCallback | None = None

    @property
    def name(self) -> str:
        return f"kubernetes:{self._context}" if self._context else "kubernetes"

    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    @property
    def status(self) -> RegistryStatus:
        return self._board.status

    async def wait_status(self, predicate: Callable[[RegistryStatus], bool]) -> RegistryStatus:
        """Wait until the status satisfies `predicate` (synced, unhealthy, healthy again...)."""
        return await self._board.wait(predicate)

    async def run(self, changed: ChangeCallback) -> None:
        self._changed = changed
        client: KubeClient | None = None
        failures = 0
        try:
            while True:
                try:
                    if client is None:
                        access = load_cluster_access(self._kubeconfig, self._context)
                        client = KubeClient(access, user_agent="istio-pilot")
                    await self._follow(client)
                    failures = 0
                except ApiError as error:
                    if error.resource == NODES and error.code in (403, 404):
                        log.warning("%s: cannot watch nodes (%s); no localities", self.name, error)
                        self._resources.remove(NODES)
                        continue
                    failures += 1
                    self._fail(f"the API server at {_server(client)} answered {error}")
                except Exception as error:  # retried, never fatal (Registry.run's promise)
                    failures += 1
                    self._fail(str(error) or type(error).__name__)
                await asyncio.sleep(self._backoff.delay(failures))
        finally:
            self._changed = None
            if client is not None:
                await client.close()

    async def _follow(self, client: KubeClient) -> None:
        listing: _State | None = _State()
        self._interrupted.clear()
        async with contextlib.aclosing(client.watch(list(self._resources))) as events:
            async for event in events:
                if event.type is EventType.SYNCED and listing is not None:
                    self._state, listing = listing, None
                    self._publish(self._convert_all(), synced=True)
                elif event.type is EventType.INTERRUPTED and event.resource is not None:
                    self._interrupted[event.resource] = event.reason
                    self._board.failed(event.reason)
                elif event.type is EventType.RESUMED and event.resource is not None:
                    self._interrupted.pop(event.resource, None)
                    self._board.set(
                        replace(
                            self._board.status,
                            healthy=not self._interrupted,
                            last_error=next(iter(self._interrupted.values()), ""),
                        )
                    )
                elif event.object is not None:
                    if listing is not None:
                        listing.apply(event)
                    else:
                        self._publish(self._reconvert(self._state.apply(event)))

    def _convert(self, key: ObjectKey) -> Converted | None:
        service = self._state.services.get(key)
        if service is None:
            self._auth_problems.pop(key, None)
            return None
        problems = auth_annotation_problems(service)
        if problems != self._auth_problems.get(key, ()):
            for problem in problems:
                log.warning("%s: %s", self.name, problem)
            _put(self._auth_problems, key, problems or None)
        return convert_service(
            service,
            self._state.endpoints.get(key),
            self._state.pods,
            self._state.localities,
            self._domain,
        )

    def _convert_all(self) -> Change | None:
        before = self._snapshot
        self._auth_problems = {
            key: problems
            for key, problems in self._auth_problems.items()
            if key in self._state.services
        }
        self._converted = {
            key: converted
            for key in self._state.services
            if (converted := self._convert(key)) is not None
        }
        self._snapshot = self._snapshot_now()
        return self._snapshot.change_from(before)

    def _reconvert(self, keys: Iterable[ObjectKey]) -> Change | None:
        change: Change | None = None
        for key in keys:
            before, after = self._converted.get(key), self._convert(key)
            _put(self._converted, key, after)
            if (before is None) != (after is None) or (
                before is not None and after is not None and before[0] != after[0]
            ):
                change = Change.SERVICES
            elif before != after and change is None:
                change = Change.ENDPOINTS
        if change is not None:
            self._snapshot = self._snapshot_now()
        return change

    def _snapshot_now(self) -> RegistrySnapshot:
        converted = sorted(self._converted.values(), key=lambda c: c[0].hostname)
        return RegistrySnapshot(
            MappingProxyType({service.hostname: service for service, _ in converted}),
            MappingProxyType({service.hostname: found for service, found in converted}),
        )

    def _publish(self, change: Change | None, *, synced: bool = False) -> None:
        """Status and callback after the snapshot was (maybe) replaced; `synced` after a
        complete listing, whose first one counts as a change."""
        if change is None and not synced:
            return
        error = next(iter(self._interrupted.values()), "")
        change = self._board.published(change, healthy=not self._interrupted, last_error=error)
        report(self._changed, change, self.name)

    def _fail(self, message: str) -> None:
        log.warning("%s: %s; keeping the last snapshot and retrying", self.name, message)
        self._board.failed(message)


def _server(client: KubeClient | None) -> str:
    return client.access.server if client is not None else "?"
