"""The platform-agnostic service model (after Istio's pilot/model).

Registries (Kubernetes, Consul, Eureka, ServiceEntry files) convert what they see into these
small immutable records; xDS generation reads nothing else. Keys are pure functions that
round-trip.
"""

from istio.model.identity import spiffe_identity
from istio.model.proxy import NodeType, Proxy
from istio.model.service import (
    AuthPolicy,
    Labels,
    Port,
    Protocol,
    Resolution,
    Service,
    ServiceInstance,
)

__all__ = [
    "AuthPolicy",
    "Labels",
    "NodeType",
    "Port",
    "Protocol",
    "Proxy",
    "Resolution",
    "Service",
    "ServiceInstance",
    "spiffe_identity",
]
