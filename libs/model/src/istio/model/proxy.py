"""The proxy on the other end of an xDS stream, as its node id and metadata describe it."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field


class NodeType(enum.Enum):
    SIDECAR = "sidecar"
    INGRESS = "ingress"
    EGRESS = "egress"


@dataclass(frozen=True, slots=True)
class Proxy:
    """A proxy: `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.

    `metadata` is the xDS node's metadata (GENERATOR=grpc marks a proxyless gRPC client).
    """

    type: NodeType
    ip: str
    id: str
    domain: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def pod_name(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def namespace(self) -> str:
        _, _, namespace = self.id.partition(".")
        return namespace or self.domain.split(".", 1)[0] or "default"

    @property
    def is_grpc(self) -> bool:
        return self.metadata.get("GENERATOR", "").lower() == "grpc"

    @property
    def node_id(self) -> str:
        return f"{self.type.value}~{self.ip}~{self.id}~{self.domain}"

    @classmethod
    def parse(cls, node_id: str, metadata: Mapping[str, str] | None = None) -> Proxy:
        """Parse a node id; ValueError says which part is wrong."""
        parts = node_id.split("~")
        if len(parts) != 4:
            raise ValueError(f"node id {node_id!r} must have 4 parts: type~ip~pod.namespace~domain")
        kind, ip, identity, domain = parts
        try:
            node_type = NodeType(kind)
        except ValueError:
            raise ValueError(
                f"node id {node_id!r}: type {kind!r} is not sidecar, ingress or egress"
            ) from None
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"node id {node_id!r}: {ip!r} is not an IP address") from None
        if not identity:
            raise ValueError(f"node id {node_id!r}: the pod.namespace part is empty")
        return cls(node_type, ip, identity, domain, dict(metadata or {}))
