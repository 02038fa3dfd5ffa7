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


@dataclass(frozen=True, slots=True)
class Resources:
    """Resources by type URL and name. Treat the messages as immutable."""

    by_type: Mapping[str, Mapping[str, Message]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # Content digests by type and name, when the generator knows them (it caches them for
    # messages many proxies share); others are computed when a version is asked for.
    digests: Mapping[str, Mapping[str, bytes]] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, type_url: str) -> Mapping[str, Message]:
        return self.by_type.get(type_url, MappingProxyType({}))

    def version(self, type_url: str, names: frozenset[str] | None = None) -> str:
        """A content hash of the type's resources (only `names`, when given): equal content,
        equal version, so a no-op change pushes nothing."""
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
