"""PilotServer: registries and the config store in, MeshSnapshots out to the ADS server.

Theory of operation. Two sources feed one snapshot: the (aggregate) registry, whose callback
says a new RegistrySnapshot is ready, and a ConfigStore watch of the routing kinds, which lists
every object, says SYNCED, then streams changes. Each change rebuilds the MeshSnapshot (cheap:
it shares the registry's maps and the sorted config tuples) and hands it to `AdsServer.push`,
which debounces. Nothing is pushed until every registry has synced and the store has sent
SYNCED: a proxy never sees a half-listed mesh, and /ready says so until then (0.2 reported
ready too early). A registry that loses its source keeps its last snapshot; its status shows
in /debug/registryz and pilot_registry_healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.config import Config, ConfigKey
from istio.configstore import ConfigStore, EventType
from istio.pilot.ads import (
    DEFAULT_DEBOUNCE,
    AdsMetrics,
    AdsServer,
    Debounce,
    EndpointChanges,
    Generator,
)
from istio.pilot.debug import RegistryCollector, build_app
from istio.pilot.mesh import WATCHED_KINDS, MeshSnapshot, default_mesh_config
from istio.pilot.registry import Change, Registry, RegistrySnapshot, dns_instances_changed

log = logging.getLogger(__name__)

WATCH_RETRY_MAX = 30.0


class PilotServer:
    """Pilot's wiring. `registry` is the aggregate; `members` are the registries it combines
    (for /debug/registryz and /metrics; by default just `registry`). The server owns `store`
    and closes it on stop."""

    def __init__(
        self,
        registry: Registry,
        store: ConfigStore,
        generate: Generator,
        *,
        members: Sequence[Registry] | None = None,
        mesh: proxy_mesh_pb2.MeshConfig | None = None,
        debounce: Debounce = DEFAULT_DEBOUNCE,
        endpoint_changes: EndpointChanges | None = None,
        config_sources: Sequence[ConfigSource] = (),
    ) -> None:
        self.registry = registry
        # Configs from elsewhere than the store (Kubernetes Ingresses as IngressRules).
        self.config_sources = tuple(config_sources)
        self.members = tuple(members) if members is not None else (registry,)
        self.store = store
        self.mesh = mesh or default_mesh_config()
        self.metrics = CollectorRegistry()
        self.ads = AdsServer(
            generate,
            debounce=debounce,
            metrics=AdsMetrics(self.metrics),
            endpoint_changes=endpoint_changes,
        )
        self.metrics.register(RegistryCollector(self.members))
        self.grpc_port = 0
        self.http_port = 0
        self._configs: dict[ConfigKey, Config] = {}
        self._configs_by_kind: Mapping[str, tuple[Config, ...]] = MappingProxyType({})
        self._store_synced = False
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._published: RegistrySnapshot | None = None

    # Lifecycle.

    async def start(self, grpc_addr: str, http_addr: str) -> None:
        """Bind both ports (port 0 picks one: see grpc_port, http_port) and start following
        the registry and the store. OSError when an address cannot be bound."""
        # No SO_REUSEPORT: a second Pilot on the same port must fail, not share it.
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.ads.add_to(self._grpc)
        try:
            self.grpc_port = self._grpc.add_insecure_port(grpc_addr)
        except RuntimeError:
            raise OSError(
                f"cannot listen on {grpc_addr} for xDS: the address is in use or not local"
            ) from None
        await self._grpc.start()
        self._http = web.AppRunner(build_app(self), access_log=None)
        await self._http.setup()
        host, port = split_host_port(http_addr)
        try:
            await web.TCPSite(self._http, host, port).start()
        except OSError as error:
            raise OSError(f"cannot listen on {http_addr} for HTTP: {error.strerror}") from None
        self.http_port = self._http.addresses[0][1]
        self._tasks = [
            asyncio.create_task(self._run_registry(), name="pilot-registry"),
            asyncio.create_task(self._watch_store(), name="pilot-config-watch"),
            *(
                asyncio.create_task(self._run_source(source), name="pilot-config-source")
                for source in self.config_sources
            ),
        ]

    async def stop(self, grace: float = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None:
            await self._http.cleanup()
        await self.store.close()

    # Readiness and views for /debug.

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): ready once every registry has synced and the store sent SYNCED."""
        waiting = [r.name for r in self.members if not r.status.synced]
        reasons = []
        if waiting:
            reasons.append("registries not synced yet: " + ", ".join(waiting))
        if not self._store_synced:
            reasons.append("config store not synced yet")
        if not all(source.synced.is_set() for source in self.config_sources):
            reasons.append("Kubernetes Ingresses not synced yet")
        if not reasons and not self._ready.is_set():
            reasons.append("no snapshot pushed yet")
        return not reasons, "; ".join(reasons)

    async def wait_ready(self) -> None:
        """Until the first snapshot has been pushed (everything synced)."""
        await self._ready.wait()

    @property
    def configs(self) -> tuple[Config, ...]:
        """The configs Pilot holds now (routing, then quota specs and bindings), by kind, then
        namespace and name."""
        return tuple(c for kind in WATCHED_KINDS for c in self._configs_by_kind.get(kind, ()))

    # Sources.

    async def _run_registry(self) -> None:
        try:
            await self.registry.run(self._registry_changed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("registry %s stopped; Pilot keeps its last snapshot", self.registry.name)

    def _registry_changed(self, change: Change) -> None:
        self._publish(change)

    async def _watch_store(self) -> None:
        """Follow the store; after a broken watch, list again (keeping the old view until the
        new one has synced) with backoff."""
        delay = 1.0
        while True:
            view: dict[ConfigKey, Config] = {}
            synced = False
            events = self.store.watch(WATCHED_KINDS)
            try:
                async for event in events:
                    if event.type is EventType.SYNCED:
                        synced, delay = True, 1.0
                        self._configs = view
                        self._store_synced = True
                    elif event.config is not None:
                        if event.type is EventType.DELETED:
                            view.pop(event.config.key, None)
                        else:
                            view[event.config.key] = event.config
                        if not synced:
                            continue
                    self._configs_changed()
                log.warning("config store watch ended; watching again in %.0fs", delay)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("config store watch failed (%s); retrying in %.0fs", error, delay)
            finally:
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, WATCH_RETRY_MAX)

    async def _run_source(self, source: ConfigSource) -> None:
        await source.run(self._configs_changed)

    def _configs_changed(self) -> None:
        by_kind: dict[str, list[Config]] = {}
        for config in self._configs.values():
            by_kind.setdefault(config.meta.kind, []).append(config)
        for source in self.config_sources:
            for config in source.configs:
                by_kind.setdefault(config.meta.kind, []).append(config)
        self._configs_by_kind = MappingProxyType(
            {
                kind: tuple(sorted(configs, key=lambda c: (c.meta.namespace, c.meta.name)))
                for kind, configs in sorted(by_kind.items())
            }
        )
        self._publish(Change.SERVICES)

    def _publish(self, change: Change) -> None:
        """Push a new snapshot, once everything has synced. The first push is a full one."""
        first = not self._ready.is_set()
        if first:
            if not (
                self._store_synced
                and all(r.status.synced for r in self.members)
                and all(s.synced.is_set() for s in self.config_sources)
            ):
                return
            change = Change.SERVICES
        registry = self.registry.snapshot()
        if (
            change is Change.ENDPOINTS
            and self._published is not None
            and dns_instances_changed(self._published, registry)
        ):
            # A DNS-resolved service's endpoints are inline in its STRICT_DNS cluster: an
            # EDS-only push would never reach them.
            change = Change.SERVICES
        self._published = registry
        self.ads.push(
            MeshSnapshot(
                services=registry.services,
                instances=registry.instances,
                configs=self._configs_by_kind,
                mesh=self.mesh,
            ),
            change,
        )
        if first:
            self._ready.set()
            log.info("registries and config store synced: serving xDS")


class ConfigSource(Protocol):
    """Configs Pilot gets from elsewhere than the store, merged with the store's by kind."""

    configs: tuple[Config, ...]
    synced: asyncio.Event

    async def run(self, changed: Callable[[], None]) -> None: ...


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: port {port!r} is not a number from 0 to 65535")
    return host, int(port)
