"""Pilot's HTTP side (--http-addr): readiness, debug views and Prometheus metrics.

/ready              200 once registries and config store have synced, else 503 with the reason
/debug/syncz        per proxy stream: sent and acked version and nonce per type, last NACK
/debug/adsz         connected streams: node, peer, since, subscriptions
/debug/configz      the routing configs Pilot holds, as YAML documents (?format=json for JSON)
/debug/registryz    each registry: synced, healthy, last error, service and instance counts
/metrics            Prometheus text, from Pilot's own CollectorRegistry
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from istio.config import to_object
from istio.config.parse import dump_yaml
from istio.pilot.ads import ProxyStream
from istio.pilot.registry import Registry
from istio.pilot.xds.resources import PUSH_ORDER, SHORT_NAMES

if TYPE_CHECKING:
    from istio.pilot.server import PilotServer

PILOT_KEY: web.AppKey[PilotServer] = web.AppKey("pilot")


def build_app(pilot: PilotServer) -> web.Application:
    app = web.Application()
    app[PILOT_KEY] = pilot
    app.router.add_get("/ready", ready)
    app.router.add_get("/debug/syncz", syncz)
    app.router.add_get("/debug/adsz", adsz)
    app.router.add_get("/debug/configz", configz)
    app.router.add_get("/debug/registryz", registryz)
    app.router.add_get("/metrics", metrics)
    return app


async def ready(request: web.Request) -> web.Response:
    is_ready, reason = request.app[PILOT_KEY].readiness()
    if is_ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: {reason}\n")


async def syncz(request: web.Request) -> web.Response:
    streams = sorted(request.app[PILOT_KEY].ads.streams, key=lambda s: (s.node_id, s.id))
    return _json([_sync_status(s) for s in streams])


async def adsz(request: web.Request) -> web.Response:
    streams = sorted(request.app[PILOT_KEY].ads.streams, key=lambda s: (s.node_id, s.id))
    return _json(
        [
            {
                "node": s.node_id,
                "stream": s.id,
                "peer": s.peer,
                "type": s.proxy.type.value,
                "ip": s.proxy.ip,
                "metadata": dict(s.proxy.metadata),
                "connected_since": _time(s.connected_since),
                "subscriptions": {
                    SHORT_NAMES[t]: ("*" if state.names is None else sorted(state.names))
                    for t in PUSH_ORDER
                    if (state := s.types.get(t)) is not None
                },
            }
            for s in streams
        ]
    )


async def configz(request: web.Request) -> web.Response:
    objects = [to_object(c) for c in request.app[PILOT_KEY].configs]
    if request.query.get("format") == "json":
        return _json(objects)
    return web.Response(text=dump_yaml(objects) if objects else "", content_type="application/yaml")


async def registryz(request: web.Request) -> web.Response:
    return _json([registry_status(r) for r in request.app[PILOT_KEY].members])


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[PILOT_KEY].metrics)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def registry_status(registry: Registry) -> dict[str, Any]:
    status, snapshot = registry.status, registry.snapshot()
    return {
        "name": registry.name,
        "synced": status.synced,
        "healthy": status.healthy,
        "last_error": status.last_error,
        "last_change": _time(status.last_change),
        "services": len(snapshot.services),
        "instances": sum(len(i) for i in snapshot.instances.values()),
    }


class RegistryCollector:
    """pilot_registry_healthy, _synced, _services and _instances per registry, read at scrape
    time (a registry that lost its source shows 0 healthy and keeps its last counts)."""

    def __init__(self, registries: Sequence[Registry]) -> None:
        self.registries = tuple(registries)

    def collect(self) -> Iterable[Metric]:
        families = {
            "healthy": GaugeMetricFamily(
                "pilot_registry_healthy",
                "1 when the registry's source is reachable",
                labels=["registry"],
            ),
            "synced": GaugeMetricFamily(
                "pilot_registry_synced",
                "1 once the registry has listed its source",
                labels=["registry"],
            ),
            "services": GaugeMetricFamily(
                "pilot_registry_services", "Services the registry knows", labels=["registry"]
            ),
            "instances": GaugeMetricFamily(
                "pilot_registry_instances",
                "Service instances the registry knows",
                labels=["registry"],
            ),
        }
        for registry in self.registries:
            status = registry_status(registry)
            for key, family in families.items():
                family.add_metric([registry.name], float(status[key]))
        return families.values()


def _sync_status(stream: ProxyStream) -> dict[str, Any]:
    types: dict[str, Any] = {}
    for type_url in PUSH_ORDER:
        state = stream.types.get(type_url)
        if state is None:
            continue
        nack = state.last_nack
        types[SHORT_NAMES[type_url]] = {
            "sent_version": state.sent_version,
            "sent_nonce": state.sent_nonce,
            "acked_version": state.acked_version,
            "synced": bool(state.sent_version) and state.acked_version == state.sent_version,
            "last_nack": None
            if nack is None
            else {
                "version": nack.version,
                "nonce": nack.nonce,
                "reason": nack.reason,
                "at": _time(nack.at),
            },
        }
    return {
        "node": stream.node_id,
        "stream": stream.id,
        "connected_since": _time(stream.connected_since),
        "generation_error": stream.generation_error or None,
        "types": types,
    }


def _time(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _json(value: object) -> web.Response:
    return web.Response(
        text=json.dumps(value, indent=2, sort_keys=True) + "\n", content_type="application/json"
    )
