"""The platform-agnostic service model (after Istio's pilot/model).

Registries (Kubernetes, Consul, Eureka, ServiceEntry files) convert what they see into these
small immutable records; xDS generation reads nothing else. Keys are pure functions that
round-trip.
"""

from istio.model.identity import DEFAULT_TRUST_DOMAIN, SpiffeId, spiffe_identity
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
    "DEFAULT_TRUST_DOMAIN",
    "AuthPolicy",
    "Labels",
    "NodeType",
    "Port",
    "Protocol",
    "Proxy",
    "Resolution",
    "Service",
    "ServiceInstance",
    "SpiffeId",
    "spiffe_identity",
]
