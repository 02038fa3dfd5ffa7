"""ServiceEntry objects to the mesh model: pure functions, no I/O.

After Istio's pilot/pkg/serviceregistry/external/conversion.go:

- one Service per host, the hostname as written, in the object's namespace; its address is the
  first of `addresses` (a VIP or CIDR) when there is one; `location` MESH_EXTERNAL marks it
  mesh-external; resolution STATIC, DNS, and NONE (the proxy forwards to the address the caller
  asked for) as PASSTHROUGH; each port's protocol is its `protocol`, in any case;
- one instance per endpoint and port: the endpoint's address, its `ports[name]` when it gives
  one (else the service port), its labels, locality, weight and service account;
- DNS resolution without endpoints: each host (wildcards aside) is its own endpoint, resolved by
  the proxy, as Istio does;
- the identities callers verify under mutual TLS (Service.service_accounts) are the entry's
  subjectAltNames plus the SPIFFE identities of its endpoints' service accounts;
- the annotation `auth.istio.io/<port number>: NONE | MUTUAL_TLS` in the entry's metadata
  overrides the mesh's authPolicy for that port of each of its hosts, as on a Kubernetes
  Service (istio.pilot.registry.auth); a bad one is reported and ignored.

Several entries may name one host (each VM of a service may register itself with its own
entry): their endpoints are merged when they agree on the service (ports, address, location,
resolution); an entry that disagrees loses to the first (ordered by namespace and name) and the
clash is reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from types import MappingProxyType

from istio.api.networking.v1alpha3 import service_entry_pb2
from istio.config import Config
from istio.model import (
    Labels,
    Port,
    Protocol,
    Resolution,
    Service,
    ServiceInstance,
    spiffe_identity,
)
from istio.pilot.registry import RegistrySnapshot
from istio.pilot.registry.auth import port_auth_policies

KIND = "ServiceEntry"

_Entry = service_entry_pb2.ServiceEntry
_RESOLUTIONS = {
    _Entry.Resolution.STATIC: Resolution.STATIC,
    _Entry.Resolution.DNS: Resolution.DNS,
    _Entry.Resolution.NONE: Resolution.PASSTHROUGH,
}


@dataclass(frozen=True, slots=True)
class Conversion:
    """What a set of ServiceEntries means: the snapshot, hosts defined in conflicting ways,
    and `auth.istio.io/<port>` annotations that were ignored."""

    snapshot: RegistrySnapshot
    clashes: tuple[str, ...] = ()
    annotation_problems: tuple[str, ...] = ()


def convert_entry(config: Config) -> list[tuple[Service, tuple[ServiceInstance, ...]]]:
    """One ServiceEntry's services, each with its instances (ordered by service port, address
    and port), in the order of its hosts."""
    entry = config.spec
    if not isinstance(entry, _Entry):
        raise TypeError(f"{config.key} is not a ServiceEntry")
    namespace = config.meta.namespace
    ports, _ = _annotated_ports(config, entry)
    accounts = set(entry.subject_alt_names) | {
        spiffe_identity(namespace, e.service_account) for e in entry.endpoints if e.service_account
    }
    converted = []
    for host in entry.hosts:
        service = Service(
            hostname=host,
            ports=ports,
            namespace=namespace,
            address=entry.addresses[0] if entry.addresses else "",
            mesh_external=entry.location == _Entry.Location.MESH_EXTERNAL,
            resolution=_RESOLUTIONS[entry.resolution],
            service_accounts=tuple(sorted(accounts)),
        )
        converted.append((service, _instances(service, entry)))
    return converted


def auth_annotation_problems(config: Config) -> tuple[str, ...]:
    """What is wrong with an entry's `auth.istio.io/<port>` annotations (each message names
    the entry and the annotation); convert_entry ignores those annotations."""
    entry = config.spec
    if not isinstance(entry, _Entry):
        raise TypeError(f"{config.key} is not a ServiceEntry")
    return _annotated_ports(config, entry)[1]


def _annotated_ports(config: Config, entry: _Entry) -> tuple[tuple[Port, ...], tuple[str, ...]]:
    ports = tuple(Port(p.name, p.number, Protocol.parse(p.protocol)) for p in entry.ports)
    where = f"{KIND} {config.meta.namespace}/{config.meta.name}"
    return port_auth_policies(ports, config.meta.annotations, where)


def _instances(
    service: Service, entry: service_entry_pb2.ServiceEntry
) -> tuple[ServiceInstance, ...]:
    if not entry.endpoints:
        if service.resolution is not Resolution.DNS or service.hostname.startswith("*"):
            return ()
        return tuple(
            ServiceInstance(service, port, service.hostname, port.port) for port in service.ports
        )
    instances = (
        ServiceInstance(
            service,
            port,
            endpoint.address,
            endpoint.ports.get(port.name, port.port),
            Labels(endpoint.labels),
            service_account=endpoint.service_account,
            locality=endpoint.locality,
            weight=endpoint.weight or 1,
        )
        for endpoint in entry.endpoints
        for port in service.ports
    )
    return tuple(sorted(instances, key=_instance_order))


def build_snapshot(configs: Iterable[Config]) -> Conversion:
    """The registry's view of every ServiceEntry (any order in, a deterministic result out)."""
    services: dict[str, Service] = {}
    instances: dict[str, list[ServiceInstance]] = {}
    owners: dict[str, str] = {}
    clashes: list[str] = []
    problems: list[str] = []
    for config in sorted(configs, key=lambda c: (c.meta.namespace, c.meta.name)):
        where = f"{config.meta.namespace}/{config.meta.name}"
        problems.extend(auth_annotation_problems(config))
        for service, found in convert_entry(config):
            host = service.hostname
            first = services.get(host)
            if first is None:
                services[host], instances[host], owners[host] = service, list(found), where
            elif _same_definition(first, service):
                services[host] = _merge_accounts(first, service)
                instances[host].extend(found)
            else:
                clashes.append(
                    f"{KIND} {where}: host {host} is defined differently by {owners[host]}, "
                    "whose definition is used"
                )
    return Conversion(
        RegistrySnapshot(
            MappingProxyType(services),
            MappingProxyType(
                {host: _bound(services[host], found) for host, found in instances.items()}
            ),
        ),
        tuple(clashes),
        tuple(problems),
    )


def _same_definition(a: Service, b: Service) -> bool:
    return replace(a, service_accounts=()) == replace(b, service_accounts=())


def _merge_accounts(a: Service, b: Service) -> Service:
    return replace(a, service_accounts=tuple(sorted({*a.service_accounts, *b.service_accounts})))


def _bound(service: Service, instances: Iterable[ServiceInstance]) -> tuple[ServiceInstance, ...]:
    """The instances, in order, each naming `service` (merged entries share one Service)."""
    return tuple(
        sorted(
            (i if i.service is service else replace(i, service=service) for i in instances),
            key=_instance_order,
        )
    )


def _instance_order(instance: ServiceInstance) -> tuple[int, str, int]:
    return instance.service_port.port, instance.address, instance.port
