"""Which objects a request is about: a resource's group, version and plural, and its paths."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True, slots=True)
class Resource:
    """A kind of object the API server serves: `Resource("", "v1", "pods")`,
    `Resource("config.istio.io", "v1alpha2", "routerules")`."""

    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool = True

    def collection(self, namespace: str | None = None) -> str:
        """The path of the objects in one namespace, or in all of them when None."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is None or not self.namespaced:
            return f"{base}/{self.plural}"
        return f"{base}/namespaces/{quote(namespace, safe='')}/{self.plural}"

    def item(self, namespace: str | None, name: str) -> str:
        return f"{self.collection(namespace)}/{quote(name, safe='')}"

    def __str__(self) -> str:
        """As kubectl names it: `pods`, `routerules.config.istio.io`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural
