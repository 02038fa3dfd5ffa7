"""Every ConfigStore backend, opened the way users open them: from a URL.

etcd runs as a real etcd-server on loopback; Kubernetes is the fake API server, because no
cluster runs here (see istio.testing.kube).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from istio.configstore import ConfigStore, open_store

BACKENDS = ["file", "etcd", "kube"]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConfigStore]:
    backend = request.param
    if backend == "file":
        config_store = open_store(f"file://{tmp_path / 'config'}")
        yield config_store
        await config_store.close()
    elif backend == "etcd":
        from istio.testing.etcd import EtcdServer

        async with EtcdServer(tmp_path / "etcd") as etcd:
            config_store = open_store(f"etcd://{etcd.host}:{etcd.port}/istio/config")
            yield config_store
            await config_store.close()
    else:
        from istio.testing.kube import FakeKubeAPI

        async with FakeKubeAPI() as api:
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
            config_store = open_store(f"kube://{kubeconfig}")
            yield config_store
            await config_store.close()
