"""Config stores: a directory of YAML files, etcd v3, or Kubernetes CRDs, behind one interface.

`open_store(url)` picks the backend from a URL: `file:///dir`, `etcd://host:port/prefix`,
`kube://` (the current kubeconfig context) or `kube:///path/to/kubeconfig`.
"""

from istio.configstore.store import ConfigEvent, ConfigStore, EventType
from istio.configstore.url import STORE_ENV, default_store_url, open_store

__all__ = [
    "STORE_ENV",
    "ConfigEvent",
    "ConfigStore",
    "EventType",
    "default_store_url",
    "open_store",
]
