"""Generated Envoy resources for one proxy, grouped by xDS type, with content-hash versions."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Pushed in this order so that no proxy sees a listener or route naming a cluster it lacks
# (0.2's periodic 404s came from LDS arriving before CDS/RDS).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
# Clients name the resources they want for these types; the others are sent whole.
NAMED_TYPES = frozenset({ENDPOINT, ROUTE})
SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}


def content_version(digests: Mapping[str, bytes]) -> str:
    """A content hash of named resources given their digests: equal content, equal version."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(digests[name])
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Part:
    """Named messages that many proxies get alike (a namespace's outbound clusters, their
    assignments, a port's routes), with their digests and version, built once per snapshot.
    Proxies whose whole output of a type is one part share its mappings outright."""

    named: Mapping[str, Message]
    digests: Mapping[str, bytes]
    version: str


@dataclass(frozen=True, slots=True)
class Resources:
    """Resources by type URL and name. Treat the messages as immutable."""

    by_type: Mapping[str, Mapping[str, Message]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Content digests by type and name, when the generator knows them (it caches them for
    # messages many proxies share); others are computed when a version is asked for.
    digests: Mapping[str, Mapping[str, bytes]] = field(default_factory=lambda: MappingProxyType({}))
    # The version of each type's whole content, when the generator knows it already.
    versions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # How each type's whole content is made: shared parts, then the names of the proxy's
    # own resources (packing reuses each part's packed form).
    layout: Mapping[str, tuple[tuple[Part, ...], tuple[str, ...]]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def of(self, type_url: str) -> Mapping[str, Message]:
        return self.by_type.get(type_url, MappingProxyType({}))

    def digest(self, type_url: str, name: str) -> bytes:
        """The content digest of one resource."""
        known = self.digests.get(type_url, {}).get(name)
        if known is not None:
            return known
        message = self.of(type_url)[name]
        return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()

    def version(self, type_url: str, names: frozenset[str] | None = None) -> str:
        """A content hash of the type's resources (only `names`, when given): equal content,
        equal version, so a no-op change pushes nothing."""
        whole = self.versions.get(type_url)
        if whole is not None and (names is None or names.issuperset(self.of(type_url).keys())):
            return whole
        known = self.digests.get(type_url, {})
        digest = hashlib.sha256()
        for name, message in sorted(self.of(type_url).items()):
            if names is not None and name not in names:
                continue
            content = (
                known.get(name)
                or hashlib.sha256(message.SerializeToString(deterministic=True)).digest()
            )
            digest.update(name.encode())
            digest.update(b"\0")
            digest.update(content)
        return digest.hexdigest()[:16]
