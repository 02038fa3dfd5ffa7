"""Talking to a Kubernetes API server from asyncio: finding it (kubeconfig or in-cluster
service account), requests, paginated lists, and list+watch that survives reconnects and 410 Gone.

Used by the CRD config store (istio.configstore.kube) and Pilot's Kubernetes registry; each
converts the raw JSON objects into its own model.
"""

from istio.kube.access import SERVICE_ACCOUNT_DIR, ClusterAccess, load_cluster_access
from istio.kube.client import (
    EventType,
    KubeClient,
    ObjectKey,
    ObjectList,
    WatchEvent,
    object_key,
    resource_version,
)
from istio.kube.errors import AccessError, ApiError, KubeError, Unreachable
from istio.kube.resource import Resource

__all__ = [
    "SERVICE_ACCOUNT_DIR",
    "AccessError",
    "ApiError",
    "ClusterAccess",
    "EventType",
    "KubeClient",
    "KubeError",
    "ObjectKey",
    "ObjectList",
    "Resource",
    "Unreachable",
    "WatchEvent",
    "load_cluster_access",
    "object_key",
    "resource_version",
]
