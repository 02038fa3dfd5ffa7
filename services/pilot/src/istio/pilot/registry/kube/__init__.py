"""The Kubernetes registry: Services, Endpoints, Pods (labels, service accounts) and Nodes
(localities) in every namespace.

`controller` follows the API server through istio.kube; `conversion` turns the objects into the
mesh model (pure).
"""

from istio.pilot.registry.kube.controller import KubeRegistry

__all__ = ["KubeRegistry"]
