"""Eureka applications to the mesh model: pure functions, no I/O.

After Istio 0.2's pilot/platform/eureka/conversion.go, whose conventions users depend on:

- a service is named by its instances' `hostName` (not the application name): instances that
  share a host name are one service, whatever application they registered under;
- only instances whose status is UP count;
- each enabled port (`port`, `securePort`) is a service port named after its number;
- the protocol comes from the `istio.protocol` metadata (tcp, udp, http, http2, https, grpc,
  mongo, redis), TCP when absent or unknown; beyond 0.2, an enabled secure port of an HTTP
  instance is HTTPS (0.2 gave it the plain port's protocol, so TLS bytes were parsed as HTTP);
- every other metadata entry (but Jackson's `@class`) is a label; the address is `ipAddr`.

Eureka's JSON has quirks that real servers emit and this parser accepts: a list of one
application or instance may be a bare object; a port is `{"$": 9080, "@enabled": "true"}`
with the number possibly a string and the flag possibly a boolean.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from istio.model import Labels, Port, Protocol, Service, ServiceInstance
from istio.pilot.registry import RegistrySnapshot

log = logging.getLogger(__name__)

PROTOCOL_METADATA = "istio.protocol"
STATUS_UP = "UP"
DEFAULT_PROTOCOL = Protocol.TCP
_IGNORED_METADATA = frozenset({PROTOCOL_METADATA, "@class"})
# Characters that would break the `k=v,k2=v2` and `|`-separated keys labels are written into.
_LABEL_TEXT = re.compile(r"[^\s,|=]+")


@dataclass(frozen=True, slots=True)
class EurekaInstance:
    """One element of an application's `instance` list, as far as the mesh cares."""

    app: str
    host_name: str
    ip_addr: str
    status: str
    port: int | None = None  # None when disabled
    secure_port: int | None = None  # None when disabled
    metadata: Labels = field(default_factory=Labels)
    instance_id: str = ""


def parse_applications(body: Any) -> tuple[EurekaInstance, ...]:
    """The body of `GET /eureka/v2/apps` (Accept: application/json)."""
    if not isinstance(body, dict) or not isinstance(body.get("applications"), dict):
        raise ValueError("eureka apps: expected an object with an `applications` object")
    instances: list[EurekaInstance] = []
    for i, app in enumerate(_one_or_many(body["applications"].get("application"))):
        where = f"applications.application[{i}]"
        if not isinstance(app, dict):
            raise ValueError(f"{where}: expected an object, got {type(app).__name__}")
        name = app.get("name", "")
        for j, item in enumerate(_one_or_many(app.get("instance"))):
            instances.append(_parse_instance(f"{where}.instance[{j}]", str(name), item))
    return tuple(instances)


def _one_or_many(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _parse_instance(where: str, app: str, item: Any) -> EurekaInstance:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")

    def text(key: str) -> str:
        value = item.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"{where}.{key}: expected a string, got {value!r}")
        return value

    metadata = item.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}.metadata: expected an object, got {metadata!r}")
    return EurekaInstance(
        app=str(item.get("app") or app),
        host_name=text("hostName"),
        ip_addr=text("ipAddr"),
        status=text("status").upper(),
        port=_parse_port(f"{where}.port", item.get("port")),
        secure_port=_parse_port(f"{where}.securePort", item.get("securePort")),
        metadata=Labels({str(k): _scalar(v) for k, v in metadata.items() if v is not None}),
        instance_id=text("instanceId"),
    )


def _parse_port(where: str, value: Any) -> int | None:
    """`{"$": 9080, "@enabled": "true"}` -> 9080; None when disabled or absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f'{where}: expected {{"$": port, "@enabled": ...}}, got {value!r}')
    enabled = value.get("@enabled", False)
    if not (enabled is True or (isinstance(enabled, str) and enabled.lower() == "true")):
        return None
    number = value.get("$")
    if isinstance(number, str) and number.isdigit():
        number = int(number)
    if not isinstance(number, int) or isinstance(number, bool) or not 0 < number <= 65535:
        raise ValueError(f"{where}.$: expected a port number, got {number!r}")
    return number


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def instance_protocol(metadata: Mapping[str, str]) -> Protocol:
    """The `istio.protocol` metadata, in any case; TCP when absent or unknown (0.2)."""
    value = metadata.get(PROTOCOL_METADATA, "")
    if not value:
        return DEFAULT_PROTOCOL
    try:
        return Protocol.parse(value)
    except ValueError:
        log.warning("eureka: unknown %s %r, treating the port as TCP", PROTOCOL_METADATA, value)
        return DEFAULT_PROTOCOL


def instance_ports(instance: EurekaInstance) -> tuple[Port, ...]:
    """The instance's enabled ports (0 to 2), named after their numbers."""
    protocol = instance_protocol(instance.metadata)
    ports = []
    if instance.port is not None:
        ports.append(Port(str(instance.port), instance.port, protocol))
    if instance.secure_port is not None:
        secure = Protocol.HTTPS if protocol.is_http else protocol
        ports.append(Port(str(instance.secure_port), instance.secure_port, secure))
    return tuple(ports)


def instance_labels(metadata: Mapping[str, str]) -> Labels:
    """Metadata as labels, without `istio.protocol`, `@class` or entries unusable as labels."""
    labels = {}
    for key, value in metadata.items():
        if key in _IGNORED_METADATA:
            continue
        if not _LABEL_TEXT.fullmatch(key) or (value and not _LABEL_TEXT.fullmatch(value)):
            log.debug("eureka metadata %s=%r ignored: not usable as a label", key, value)
            continue
        labels[key] = value
    return Labels(labels)


def service_hostname(instance: EurekaInstance) -> str:
    """The instance's host name, lower-cased (DNS names are case-insensitive)."""
    return instance.host_name.lower()


def build_snapshot(instances: Iterable[EurekaInstance]) -> RegistrySnapshot:
    """Services (by host name) and their instances from every UP instance with a port.

    Instances that disagree on a port's protocol: the first (by app, host, address) wins.
    """
    usable = sorted(
        (i for i in instances if i.status == STATUS_UP and i.host_name and i.ip_addr),
        key=lambda i: (i.app, service_hostname(i), i.ip_addr, i.port or 0, i.instance_id),
    )
    ports_by_host: dict[str, dict[int, Port]] = {}
    for instance in usable:
        hostname = service_hostname(instance)
        for port in instance_ports(instance):
            known = ports_by_host.setdefault(hostname, {}).setdefault(port.port, port)
            if known.protocol is not port.protocol:
                log.warning(
                    "eureka: %s:%d has conflicting protocols %s, %s; using %s",
                    hostname,
                    port.port,
                    known.protocol.value,
                    port.protocol.value,
                    known.protocol.value,
                )
    services = {
        hostname: Service(hostname=hostname, ports=tuple(ports[n] for n in sorted(ports)))
        for hostname, ports in sorted(ports_by_host.items())
        if ports
    }
    found: dict[str, list[ServiceInstance]] = {hostname: [] for hostname in services}
    for instance in usable:
        service = services.get(service_hostname(instance))
        if service is None:
            continue
        labels = instance_labels(instance.metadata)
        for port in instance_ports(instance):
            found[service.hostname].append(
                ServiceInstance(
                    service=service,
                    service_port=_service_port(service, port.port),
                    address=instance.ip_addr,
                    port=port.port,
                    labels=labels,
                )
            )
    return RegistrySnapshot(
        MappingProxyType(services),
        MappingProxyType(
            {
                hostname: tuple(sorted(items, key=lambda i: (i.address, i.port, str(i.labels))))
                for hostname, items in found.items()
            }
        ),
    )


def _service_port(service: Service, number: int) -> Port:
    port = service.port_numbered(number)
    if port is None:
        raise AssertionError(f"{service.hostname} lacks port {number} of its own instance")
    return port
