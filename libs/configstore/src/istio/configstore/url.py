"""Choosing a store from a URL: file:///dir, etcd://host:port/prefix, kube://[/kubeconfig]."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from istio.config import DEFAULT_REGISTRY, ConfigError, Problem, SchemaRegistry
from istio.configstore.store import ConfigStore

DEFAULT_ETCD_PREFIX = "/istio/config"
STORE_ENV = "ISTIO_CONFIG_STORE"
MESH_DIR_ENV = "MESH_DIR"


def default_store_url() -> str:
    """Where every command looks when not told: $ISTIO_CONFIG_STORE, else the local mesh's
    store, $MESH_DIR/config (MESH_DIR defaults to .mesh in the current directory)."""
    if url := os.environ.get(STORE_ENV):
        return url
    mesh_dir = Path(os.environ.get(MESH_DIR_ENV, ".mesh")).resolve()
    return f"file://{mesh_dir / 'config'}"


def open_store(url: str, *, registry: SchemaRegistry = DEFAULT_REGISTRY) -> ConfigStore:
    """The store a URL names. Connections are made lazily, on first use."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(Problem(f"{url}: file URLs take an absolute path (file:///dir)"))
        from istio.configstore.file import FileStore

        return FileStore(Path(parts.path), registry=registry)
    if parts.scheme == "etcd":
        from istio.configstore.etcd import EtcdStore

        if not parts.hostname:
            raise ConfigError(Problem(f"{url}: etcd URLs name a host (etcd://host:port/prefix)"))
        return EtcdStore(
            parts.hostname,
            parts.port or 2379,
            prefix=parts.path.rstrip("/") or DEFAULT_ETCD_PREFIX,
            registry=registry,
        )
    if parts.scheme == "kube":
        from istio.configstore.kube import KubeStore

        kubeconfig = Path(parts.path) if parts.path not in ("", "/") else None
        return KubeStore(kubeconfig=kubeconfig, context=parts.netloc or None, registry=registry)
    raise ConfigError(
        Problem(
            f"unsupported config store {url!r}: use file:///dir, etcd://host:port/prefix or kube://"
        )
    )
