"""Config stores: a directory of YAML files, etcd v3, or Kubernetes CRDs, behind one interface.

`open_store(url)` picks the backend from a URL: `file:///dir`, `etcd://host:port/prefix`,
`kube://` (the current kubeconfig context) or `kube:///path/to/kubeconfig`.
"""

from istio.configstore.store import ConfigEvent, ConfigStore, EventType
from istio.configstore.url import open_store

__all__ = ["ConfigEvent", "ConfigStore", "EventType", "open_store"]
