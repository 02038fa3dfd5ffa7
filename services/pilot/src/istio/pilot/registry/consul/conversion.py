"""Consul catalog entries to the mesh model: pure functions, no I/O.

After Istio 0.2's pilot/platform/consul/conversion.go, whose conventions users depend on:

- a service is named `<ServiceName>.service.consul`, Consul's own DNS name for it;
- a tag `key|value` (0.2's form) or `key=value` becomes a label; other tags are ignored;
- a port's protocol comes from a `protocol` tag, else the service's `protocol` meta, else the
  node's `protocol` meta (0.2's only source); HTTP when none says (0.2's default) and TCP when
  the value is not a protocol we know (0.2 guessed HTTP, which breaks non-HTTP traffic);
- the port is named after its protocol (`http`), as 0.2 did, or `http-9080` when the service
  has several ports of that protocol, so names stay unique;
- an instance's address is ServiceAddress, else its node's Address.

Consul has no virtual IPs: services get no address, and proxies are sent the instances (EDS).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from istio.model import Labels, Port, Protocol, Service, ServiceInstance
from istio.pilot.registry import RegistrySnapshot

log = logging.getLogger(__name__)

DOMAIN = "service.consul"
PROTOCOL_KEY = "protocol"
DEFAULT_PROTOCOL = Protocol.HTTP
_LABEL_SEPARATORS = re.compile(r"[|=]")
# Characters that would break the `k=v,k2=v2` and `|`-separated keys labels are written into.
_LABEL_TEXT = re.compile(r"[^\s,|=]+")


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One element of `GET /v1/catalog/service/<name>`: a service instance on a node."""

    node: str
    address: str  # the node's
    service_id: str
    service_name: str
    service_port: int
    service_address: str = ""
    service_tags: tuple[str, ...] = ()
    service_meta: Labels = field(default_factory=Labels)
    node_meta: Labels = field(default_factory=Labels)
    weight: int = 1  # ServiceWeights.Passing


def service_hostname(name: str) -> str:
    """productpage -> productpage.service.consul"""
    return f"{name}.{DOMAIN}"


def parse_services(body: Any) -> dict[str, tuple[str, ...]]:
    """The body of `GET /v1/catalog/services`: service name -> tags."""
    if not isinstance(body, dict):
        raise ValueError(f"/v1/catalog/services: expected an object, got {_kind(body)}")
    services: dict[str, tuple[str, ...]] = {}
    for name, tags in body.items():
        if tags is not None and not _is_str_list(tags):
            raise ValueError(f"/v1/catalog/services: tags of {name!r} are not a list of strings")
        services[name] = tuple(tags or ())
    return services


def parse_catalog_service(name: str, body: Any) -> tuple[CatalogEntry, ...]:
    """The body of `GET /v1/catalog/service/<name>`, in a stable order (node, service id)."""
    where = f"/v1/catalog/service/{name}"
    if body is None:
        return ()
    if not isinstance(body, list):
        raise ValueError(f"{where}: expected a list, got {_kind(body)}")
    entries = [_parse_entry(f"{where}[{i}]", item) for i, item in enumerate(body)]
    return tuple(sorted(entries, key=lambda e: (e.node, e.service_id)))


def _parse_entry(where: str, item: Any) -> CatalogEntry:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {_kind(item)}")

    def text(key: str, *, required: bool = False) -> str:
        value = item.get(key)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value):
            raise ValueError(f"{where}.{key}: expected a non-empty string, got {value!r}")
        return value

    port = item.get("ServicePort", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"{where}.ServicePort: expected a port number, got {port!r}")
    tags = item.get("ServiceTags")
    if tags is not None and not _is_str_list(tags):
        raise ValueError(f"{where}.ServiceTags: expected a list of strings, got {tags!r}")
    weights = item.get("ServiceWeights") or {}
    passing = weights.get("Passing", 1) if isinstance(weights, dict) else 1
    return CatalogEntry(
        node=text("Node", required=True),
        address=text("Address"),
        service_id=text("ServiceID") or text("ServiceName", required=True),
        service_name=text("ServiceName", required=True),
        service_port=port,
        service_address=text("ServiceAddress"),
        service_tags=tuple(tags or ()),
        service_meta=_string_map(f"{where}.ServiceMeta", item.get("ServiceMeta")),
        node_meta=_string_map(f"{where}.NodeMeta", item.get("NodeMeta")),
        weight=passing if isinstance(passing, int) and passing > 0 else 1,
    )


def tag_labels(tags: Iterable[str]) -> Labels:
    """Tags `key|value` or `key=value` (split at the first separator) as labels.

    The `protocol` tag is not a label: it says what the port speaks. Tags of another form, or
    whose key or value holds a character that cannot appear in a label, are ignored.
    """
    labels: dict[str, str] = {}
    for tag in tags:
        separator = _LABEL_SEPARATORS.search(tag)
        if separator is None:
            log.debug("consul tag %r ignored: not key|value or key=value", tag)
            continue
        key, value = tag[: separator.start()], tag[separator.end() :]
        if not _LABEL_TEXT.fullmatch(key) or (value and not _LABEL_TEXT.fullmatch(value)):
            log.debug("consul tag %r ignored: not usable as a label", tag)
            continue
        if key != PROTOCOL_KEY:
            labels[key] = value
    return Labels(labels)


def entry_protocol(entry: CatalogEntry) -> Protocol:
    """A `protocol` tag, else the service's meta, else the node's meta (0.2); HTTP if none."""
    value = _protocol_tag(entry.service_tags)
    if value is None:
        value = entry.service_meta.get(PROTOCOL_KEY) or entry.node_meta.get(PROTOCOL_KEY) or ""
    if not value:
        return DEFAULT_PROTOCOL
    try:
        return Protocol.parse(value)
    except ValueError:
        log.warning(
            "consul service %s: unknown protocol %r, treating its port as TCP",
            entry.service_name,
            value,
        )
        return Protocol.TCP


def _protocol_tag(tags: Iterable[str]) -> str | None:
    for tag in tags:
        separator = _LABEL_SEPARATORS.search(tag)
        if separator is not None and tag[: separator.start()] == PROTOCOL_KEY:
            return tag[separator.end() :]
    return None


def convert_service(name: str, entries: Sequence[CatalogEntry]) -> Service | None:
    """The service `name` as its instances describe it; None when none has a usable port.

    Instances that disagree on a port's protocol: the first (by node, service id) wins.
    """
    protocols: dict[int, Protocol] = {}
    for entry in entries:
        if entry.service_port == 0:
            continue
        protocol = entry_protocol(entry)
        known = protocols.setdefault(entry.service_port, protocol)
        if known is not protocol:
            log.warning(
                "consul service %s: instances disagree on the protocol of port %d (%s, %s); "
                "using %s",
                name,
                entry.service_port,
                known.value,
                protocol.value,
                known.value,
            )
    if not protocols:
        return None
    per_protocol: dict[Protocol, int] = {}
    for protocol in protocols.values():
        per_protocol[protocol] = per_protocol.get(protocol, 0) + 1
    ports = tuple(
        Port(_port_name(protocol, number, per_protocol[protocol] > 1), number, protocol)
        for number, protocol in sorted(protocols.items())
    )
    return Service(hostname=service_hostname(name), ports=ports)


def _port_name(protocol: Protocol, number: int, shared: bool) -> str:
    name = protocol.value.lower()
    return f"{name}-{number}" if shared else name


def convert_instances(
    service: Service, entries: Sequence[CatalogEntry]
) -> tuple[ServiceInstance, ...]:
    """One instance per catalog entry with a port and an address, in a stable order."""
    instances = []
    for entry in entries:
        port = service.port_numbered(entry.service_port)
        address = entry.service_address or entry.address
        if port is None or not address:
            continue
        instances.append(
            ServiceInstance(
                service=service,
                service_port=port,
                address=address,
                port=entry.service_port,
                labels=tag_labels(entry.service_tags),
                weight=entry.weight,
            )
        )
    return tuple(sorted(instances, key=lambda i: (i.address, i.port, str(i.labels))))


def build_snapshot(catalog: Mapping[str, Sequence[CatalogEntry]]) -> RegistrySnapshot:
    """Services and instances from every service's catalog entries (name -> entries)."""
    services: dict[str, Service] = {}
    instances: dict[str, tuple[ServiceInstance, ...]] = {}
    for name in sorted(catalog):
        service = convert_service(name, catalog[name])
        if service is None:
            continue
        services[service.hostname] = service
        instances[service.hostname] = convert_instances(service, catalog[name])
    return RegistrySnapshot(MappingProxyType(services), MappingProxyType(instances))


def _string_map(where: str, value: Any) -> Labels:
    if value is None:
        return Labels()
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{where}: expected an object of strings, got {value!r}")
    return Labels(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _kind(value: Any) -> str:
    return type(value).__name__
