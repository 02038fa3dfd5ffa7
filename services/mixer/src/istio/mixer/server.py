"""MixerServer: the config store in, the Mixer API, self-monitoring and the Prometheus
adapter's port out.

Theory of operation. A watch of the store's Mixer kinds lists every object, says SYNCED, then
streams changes; each change marks the view dirty, and one updater task hands the newest view
to `Runtime.update` (a burst of changes is applied once). A rejected view is logged with every
problem (kind, namespace/name, field) and shown in /metrics and /debug/configz; the config in
force stays. The gRPC port serves from the start (with no rules until the first config is in
force: every Check passes); /healthz answers once the store has synced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

import grpc
from aiohttp import web
from google.protobuf import struct_pb2
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from istio.config import DEFAULT_REGISTRY, Config, ConfigKey, Schema, SchemaRegistry
from istio.configstore import ConfigStore, EventType
from istio.mixer.adapters.prometheus import text_format
from istio.mixer.api import MixerService
from istio.mixer.metrics import MixerMetrics
from istio.mixer.runtime import Runtime
from istio.mixersdk import AdapterInfo

log = logging.getLogger(__name__)

WATCH_RETRY_MAX = 30.0
MIXER_CATEGORIES = ("mixer-rule", "mixer-handler", "mixer-instance", "mixer-client")


def mixer_registry(
    adapters: Mapping[str, AdapterInfo], base: SchemaRegistry = DEFAULT_REGISTRY
) -> tuple[SchemaRegistry, list[str]]:
    """`base` plus a handler kind for every adapter it lacks (custom adapters), and why any
    adapter could not get one (its name is taken by another kind)."""
    schemas = list(base)
    problems = []
    for name in sorted(adapters):
        if base.by_kind(name) is not None:
            continue
        candidate = Schema(name, name + "s", struct_pb2.Struct, "mixer-handler")
        try:
            SchemaRegistry([*schemas, candidate])
        except ValueError as error:
            problems.append(f"adapter {name}: no handler kind for it: {error}")
            continue
        schemas.append(candidate)
    return SchemaRegistry(schemas), problems


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


class MixerServer:
    """Mixer's wiring. The server owns `store` and `runtime` and closes them on stop."""

    def __init__(self, runtime: Runtime, store: ConfigStore, metrics: MixerMetrics) -> None:
        self.runtime = runtime
        self.store = store
        self.metrics = metrics
        self.grpc_port = 0
        self.monitoring_port = 0
        self.prometheus_port = 0
        self.synced = asyncio.Event()
        self.applied = asyncio.Event()  # set after each view the runtime has taken or refused
        self.applied_views = 0
        self._view: dict[ConfigKey, Config] = {}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.store.registry if s.category in MIXER_CATEGORIES]

    async def start(self, grpc_addr: str, monitoring_addr: str, prometheus_addr: str) -> None:
        """Bind the three ports (port 0 picks one) and start following the store. OSError
        when an address cannot be bound."""
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._grpc.add_generic_rpc_handlers(
            (MixerService(self.runtime, self.metrics).generic_handler(),)
        )
        try:
            self.grpc_port = self._grpc.add_insecure_port(grpc_addr)
        except RuntimeError:
            raise OSError(
                f"cannot listen on {grpc_addr} for gRPC: the address is in use or not local"
            ) from None
        await self._grpc.start()
        self.monitoring_port = await self._serve(
            self._monitoring_app(), monitoring_addr, "monitoring"
        )
        registry = self.runtime.prometheus_registry
        assert isinstance(registry, CollectorRegistry)
        self.prometheus_port = await self._serve(
            _metrics_app(registry), prometheus_addr, "Prometheus"
        )
        self._tasks = [
            asyncio.create_task(self._watch_store(), name="mixer-config-watch"),
            asyncio.create_task(self._apply_changes(), name="mixer-config-apply"),
        ]

    async def _serve(self, app: web.Application, address: str, what: str) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        host, port = split_host_port(address)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as error:
            raise OSError(f"cannot listen on {address} for {what}: {error.strerror}") from None
        return int(runner.addresses[-1][1])

    async def stop(self, grace: float = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._grpc is not None:
            await self._grpc.stop(grace)
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        await self.runtime.close()
        await self.store.close()

    def _monitoring_app(self) -> web.Application:
        app = web.Application()

        async def healthz(request: web.Request) -> web.Response:
            if not self.synced.is_set():
                return web.Response(status=503, text="config store not synced yet\n")
            return web.Response(text="ok\n")

        async def configz(request: web.Request) -> web.Response:
            runtime = self.runtime
            plan = runtime.active.plan
            body = {
                "generation": runtime.active.generation,
                "rejected": bool(runtime.last_problems),
                "problems": [str(p) for p in runtime.last_problems],
                "counts": dict(plan.counts),
                "handlers": sorted(plan.handlers),
                "rules": sorted(
                    r.key for rules in plan.rules.values() for group in rules for r in group
                ),
            }
            return web.json_response(body, dumps=lambda v: json.dumps(v, indent=2))

        app.router.add_get("/healthz", healthz)
        app.router.add_get("/debug/configz", configz)
        app.router.add_get("/metrics", _metrics_handler(self.metrics.registry))
        return app

    async def wait_applied(self, views: int = 1) -> None:
        """Until the runtime has taken (or refused) at least `views` views of the store."""
        while self.applied_views < views:
            self.applied.clear()
            await self.applied.wait()

    async def _watch_store(self) -> None:
        """Follow the store; after a broken watch, list again (the runtime keeps its config
        until the new listing has synced) with backoff."""
        delay = 1.0
        while True:
            view: dict[ConfigKey, Config] = {}
            synced = False
            events = self.store.watch(self.kinds)
            try:
                async for event in events:
                    if event.type is EventType.SYNCED:
                        synced, delay = True, 1.0
                        self._view = view
                        self.synced.set()
                    elif event.config is not None:
                        if event.type is EventType.DELETED:
                            view.pop(event.config.key, None)
                        else:
                            view[event.config.key] = event.config
                        if not synced:
                            continue
                    self._dirty.set()
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

    async def _apply_changes(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            configs = list(self._view.values())
            try:
                problems = await self.runtime.update(configs)
            except Exception:
                log.exception("applying the config failed; the config in force is kept")
                problems = []
            if problems:
                log.error(
                    "config rejected (%d problem%s); generation %d stays in force:\n  %s",
                    len(problems),
                    "" if len(problems) == 1 else "s",
                    self.runtime.active.generation,
                    "\n  ".join(str(p) for p in problems),
                )
            else:
                log.info(
                    "config generation %d in force: %s",
                    self.runtime.active.generation,
                    ", ".join(f"{v} {k}" for k, v in self.runtime.active.plan.counts.items()),
                )
            self.applied_views += 1
            self.applied.set()


def _metrics_handler(
    registry: CollectorRegistry,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


def _metrics_app(registry: CollectorRegistry) -> web.Application:
    """The Prometheus adapter's port: its metrics under their configured names."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=text_format(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
