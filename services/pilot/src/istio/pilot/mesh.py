"""The one immutable input of xDS generation: services, instances, traffic rules, mesh config.

Pilot builds a new MeshSnapshot whenever a registry or the config store changes, and hands the
same snapshot to every proxy's generation, so every proxy in one push sees one consistent view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.duration_pb2 import Duration

from istio.api.proxy.v1.config import proxy_mesh_pb2
from istio.config import Config
from istio.model import Service, ServiceInstance

ROUTING_KINDS = ("RouteRule", "DestinationPolicy", "EgressRule", "IngressRule")
# What a sidecar's Mixer filter is told besides attributes: the quotas a service's requests
# are charged (Pilot hands each inbound listener the QuotaSpecs bound to its service).
MIXER_CLIENT_KINDS = ("QuotaSpec", "QuotaSpecBinding")
WATCHED_KINDS = ROUTING_KINDS + MIXER_CLIENT_KINDS


def default_mesh_config() -> proxy_mesh_pb2.MeshConfig:
    """Istio 0.2's shipped defaults (the `istio` config map's `mesh` key)."""
    mesh = proxy_mesh_pb2.MeshConfig(
        proxy_listen_port=15001,
        ingress_class="istio",
        ingress_service="istio-ingress",
        ingress_controller_mode=proxy_mesh_pb2.MeshConfig.IngressControllerMode.STRICT,
        auth_policy=proxy_mesh_pb2.MeshConfig.AuthPolicy.NONE,
        connect_timeout=Duration(seconds=1),
        rds_refresh_delay=Duration(seconds=1),
        mixer_address="",
    )
    proxy = mesh.default_config
    proxy.proxy_admin_port = 15000
    proxy.drain_duration.FromSeconds(2)
    proxy.parent_shutdown_duration.FromSeconds(3)
    proxy.discovery_refresh_delay.FromSeconds(1)
    proxy.connect_timeout.FromSeconds(1)
    proxy.service_cluster = "istio-proxy"
    return mesh


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class MeshSnapshot:
    """Everything generation reads. `configs` holds each watched kind's objects, sorted by
    namespace and name (so generation is deterministic). Compared by identity: generation
    caches what it derives from a snapshot (istio.pilot.xds.index) for as long as it lives."""

    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    instances: Mapping[str, tuple[ServiceInstance, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    configs: Mapping[str, tuple[Config, ...]] = field(default_factory=lambda: MappingProxyType({}))
    mesh: proxy_mesh_pb2.MeshConfig = field(default_factory=default_mesh_config)

    def of_kind(self, kind: str) -> tuple[Config, ...]:
        return self.configs.get(kind, ())
