"""Services, their ports and instances, and the keys that name them."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

DEFAULT_DOMAIN = "svc.cluster.local"


class Protocol(enum.Enum):
    """What a port speaks. Kubernetes and ServiceEntry port names carry it as a prefix."""

    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    HTTPS = "HTTPS"
    MONGO = "MONGO"
    REDIS = "REDIS"
    TCP = "TCP"
    TLS = "TLS"
    UDP = "UDP"

    @property
    def is_http(self) -> bool:
        """Carried through the HTTP connection manager (routes, retries, faults)."""
        return self in (Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC)

    @property
    def is_http2(self) -> bool:
        return self in (Protocol.HTTP2, Protocol.GRPC)

    @classmethod
    def from_port_name(cls, name: str) -> Protocol:
        """0.2's rule: the name's prefix before `-` (http, http-web, grpc, mongo, ...); TCP
        otherwise."""
        prefix = name.lower().split("-", 1)[0]
        try:
            return cls(prefix.upper())
        except ValueError:
            return cls.TCP

    @classmethod
    def parse(cls, text: str) -> Protocol:
        """A protocol written by a user (ServiceEntry, EgressRule), in any case."""
        return cls(text.upper())


class AuthPolicy(enum.Enum):
    """How sidecars talk to each other on a port: plaintext, or mutual TLS with the mesh's
    certificates (MeshConfig.AuthPolicy's values)."""

    NONE = "NONE"
    MUTUAL_TLS = "MUTUAL_TLS"

    @classmethod
    def parse(cls, text: str) -> AuthPolicy:
        """A policy written by a user (a service annotation), in any case; ValueError for
        anything else."""
        return cls(text.strip().upper())


@dataclass(frozen=True, slots=True)
class Port:
    """A service port. `auth_policy` overrides the mesh's authPolicy for this port (0.2's
    Port.AuthenticationPolicy, from the `auth.istio.io/<port>` annotation); None inherits
    it."""

    name: str
    port: int
    protocol: Protocol
    auth_policy: AuthPolicy | None = None


class Labels(Mapping[str, str]):
    """An immutable, hashable label set, written `k=v,k2=v2` (sorted) in keys."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self._items: dict[str, str] = dict(sorted(pairs))
        self._hash = hash(tuple(self._items.items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._items == other._items
        return isinstance(other, Mapping) and self._items == dict(other)

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._items.items())

    def matches(self, selector: Mapping[str, str]) -> bool:
        """True when every label of the selector is here with the same value."""
        return all(self._items.get(k) == v for k, v in selector.items())

    @classmethod
    def parse(cls, text: str) -> Labels:
        if not text:
            return cls()
        pairs = []
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"invalid labels {text!r}: expected k=v[,k=v...]")
            pairs.append((key, value))
        return cls(pairs)


class Resolution(enum.Enum):
    """How a proxy finds a service's endpoints."""

    STATIC = "STATIC"  # endpoints known to the registry (EDS)
    DNS = "DNS"  # the proxy resolves the hostname
    PASSTHROUGH = "PASSTHROUGH"  # forward to the address the client asked for


@dataclass(frozen=True, slots=True)
class Service:
    """A service as the mesh sees it.

    `hostname` is fully qualified (reviews.default.svc.cluster.local, or an external host such
    as api.example.com, possibly a wildcard `*.example.com` for mesh-external services).
    `address` is the VIP, empty for headless or external services.
    """

    hostname: str
    ports: tuple[Port, ...]
    namespace: str = "default"
    address: str = ""
    mesh_external: bool = False
    resolution: Resolution = Resolution.STATIC
    service_accounts: tuple[str, ...] = ()

    def port_named(self, name: str) -> Port | None:
        return next((p for p in self.ports if p.name == name), None)

    def port_numbered(self, number: int) -> Port | None:
        return next((p for p in self.ports if p.port == number), None)

    @property
    def short_name(self) -> str:
        """The first label of the hostname: `reviews` for reviews.default.svc.cluster.local."""
        return self.hostname.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One endpoint of one service port: where to send it, and what the workload is."""

    service: Service
    service_port: Port
    address: str
    port: int
    labels: Labels = field(default_factory=Labels)
    service_account: str = ""
    locality: str = ""  # region/zone/subzone
    weight: int = 1


def service_hostname(name: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """reviews, default -> reviews.default.svc.cluster.local"""
    return f"{name}.{namespace}.{domain}"


def service_key(hostname: str, port_names: Iterable[str] = (), labels: Labels | None = None) -> str:
    """0.2's service key: `hostname|portname,...|k=v,...` (sorted, round-trips)."""
    return "|".join((hostname, ",".join(sorted(port_names)), str(labels or Labels())))


def parse_service_key(key: str) -> tuple[str, tuple[str, ...], Labels]:
    hostname, _, rest = key.partition("|")
    ports, _, labels = rest.partition("|")
    return hostname, tuple(p for p in ports.split(",") if p), Labels.parse(labels)


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


def cluster_name(
    direction: Direction, port: int, hostname: str, labels: Labels | None = None
) -> str:
    """Envoy cluster names: `outbound|9080|version=v1|reviews.default.svc.cluster.local`."""
    return f"{direction.value}|{port}|{labels or Labels()}|{hostname}"


def parse_cluster_name(name: str) -> tuple[Direction, int, str, Labels]:
    """The inverse of cluster_name; ValueError for names it did not make."""
    parts = name.split("|")
    if len(parts) != 4:
        raise ValueError(f"not a mesh cluster name: {name!r}")
    direction, port, labels, hostname = parts
    return Direction(direction), int(port), hostname, Labels.parse(labels)
