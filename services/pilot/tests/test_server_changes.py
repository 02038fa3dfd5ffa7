"""Which kind of change PilotServer hands the ADS server: instances of a DNS-resolved service
live inline in its STRICT_DNS cluster, so their change is a SERVICES change, not EDS only."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from istio.model import Labels, Port, Protocol, Resolution, Service, ServiceInstance
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.registry import Change, RegistrySnapshot, RegistryStatus
from istio.pilot.server import PilotServer
from istio.pilot.xds.resources import Resources

HTTP = Port("http", 80, Protocol.HTTP)
STATIC = Service("reviews.default.svc.cluster.local", (HTTP,), address="10.0.0.12")
DNS = Service("api.example.com", (HTTP,), mesh_external=True, resolution=Resolution.DNS)


def instance(service: Service, address: str) -> ServiceInstance:
    return ServiceInstance(service, HTTP, address, 80, Labels({}))


def snapshot(static: tuple[str, ...], dns: tuple[str, ...]) -> RegistrySnapshot:
    return RegistrySnapshot(
        MappingProxyType({STATIC.hostname: STATIC, DNS.hostname: DNS}),
        MappingProxyType(
            {
                STATIC.hostname: tuple(instance(STATIC, a) for a in static),
                DNS.hostname: tuple(instance(DNS, a) for a in dns),
            }
        ),
    )


def test_change_from_treats_dns_instances_as_services() -> None:
    before = snapshot(("10.1.0.1",), ("api-1.example.com",))
    assert snapshot(("10.1.0.1", "10.1.0.2"), ("api-1.example.com",)).change_from(before) is (
        Change.ENDPOINTS
    )
    assert snapshot(("10.1.0.1",), ("api-2.example.com",)).change_from(before) is Change.SERVICES
    assert snapshot(("10.1.0.1",), ()).change_from(before) is Change.SERVICES


class Registry:
    name = "fake"
    status = RegistryStatus(synced=True, healthy=True)

    def __init__(self) -> None:
        self.current = snapshot(("10.1.0.1",), ("api-1.example.com",))

    def snapshot(self) -> RegistrySnapshot:
        return self.current

    async def run(self, changed: Any) -> None:  # pragma: no cover - not run here
        pass


def _generate(snapshot: MeshSnapshot, proxy: Any) -> Resources:  # pragma: no cover
    return Resources(MappingProxyType({}))


def test_server_pushes_dns_instance_changes_as_services() -> None:
    registry = Registry()
    server = PilotServer(registry, store=None, generate=_generate)  # type: ignore[arg-type]
    pushed: list[Change] = []
    server.ads.push = lambda snapshot, change: pushed.append(change)  # type: ignore[method-assign]
    server._store_synced = True

    server._registry_changed(Change.SERVICES)  # the first push
    registry.current = snapshot(("10.1.0.1", "10.1.0.2"), ("api-1.example.com",))
    server._registry_changed(Change.ENDPOINTS)  # a STATIC service's endpoints: EDS only
    registry.current = snapshot(("10.1.0.1", "10.1.0.2"), ("api-2.example.com",))
    server._registry_changed(Change.ENDPOINTS)  # a DNS service's: inline in its cluster
    assert pushed == [Change.SERVICES, Change.ENDPOINTS, Change.SERVICES]
