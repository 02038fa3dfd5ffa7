"""What only the Kubernetes store does: CRDs, watches across 410 Gone and reconnects,
custom resources written around istioctl, and finding the API server from a kubeconfig."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from istio.config import DEFAULT_REGISTRY, Config, ConfigError, parse_object
from istio.configstore import ConfigEvent, EventType, open_store
from istio.configstore import kube as kube_store
from istio.configstore.crds import render_crds
from istio.configstore.kube import KubeStore, load_cluster_access
from istio.testing.kube import KUBERNETES_VERSION, FakeKubeAPI

REPO = Path(__file__).resolve().parents[3]
CRDS = REPO / "install" / "kubernetes" / "crds.yaml"
RULES = "/apis/config.istio.io/v1alpha2/namespaces/default/routerules"


def route_rule(name: str, service: str = "reviews") -> Config:
    return parse_object(
        {
            "kind": "RouteRule",
            "metadata": {"name": name},
            "spec": {"destination": {"name": service}, "precedence": 1},
        }
    )


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI() as server:
        yield server


@pytest.fixture
async def store(api: FakeKubeAPI, tmp_path: Path) -> AsyncIterator[KubeStore]:
    opened = KubeStore(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"))
    yield opened
    await opened.close()


async def next_event(events: AsyncIterator[ConfigEvent]) -> ConfigEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


def summary(event: ConfigEvent) -> tuple[EventType, str]:
    return event.type, event.config.meta.name if event.config else ""


async def post(api: FakeKubeAPI, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers=api.headers) as session,
        session.post(api.url + path, json=body) as response,
    ):
        assert response.status == 201, await response.text()
        result: dict[str, Any] = await response.json()
        return result


# -- the CRDs ------------------------------------------------------------------------------------


def test_crds_golden() -> None:
    rendered = render_crds(DEFAULT_REGISTRY)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        CRDS.parent.mkdir(parents=True, exist_ok=True)
        CRDS.write_text(rendered)
    assert CRDS.read_text() == rendered, "stale CRDs: rerun with UPDATE_GOLDEN=1"


def test_every_kind_has_a_valid_crd() -> None:
    crds = list(yaml.safe_load_all(CRDS.read_text()))
    for crd in crds:
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
    served = {
        (c["spec"]["group"], c["spec"]["versions"][0]["name"], c["spec"]["names"]["kind"])
        for c in crds
    }
    assert served == {(s.group, s.version, s.kind) for s in DEFAULT_REGISTRY}


async def test_objects_are_custom_resources(api: FakeKubeAPI, store: KubeStore) -> None:
    created = await store.create(route_rule("reviews-default"))
    stored = api.get_object("config.istio.io/v1alpha2", "RouteRule", "reviews-default", "default")
    assert stored is not None
    assert stored["spec"] == {"destination": {"name": "reviews"}, "precedence": 1}
    assert stored["metadata"]["resourceVersion"] == created.meta.resource_version


async def test_missing_crds_are_named(tmp_path: Path) -> None:
    async with FakeKubeAPI(crds=[]) as api:
        store = KubeStore(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"))
        with pytest.raises(ConfigError, match=r"does not serve routerules\.config\.istio\.io"):
            await store.list("RouteRule")
        with pytest.raises(ConfigError, match="install the CRDs"):
            await store.get("RouteRule", "reviews")
        await store.close()


# -- watches -------------------------------------------------------------------------------------


async def test_watch_relists_after_410_gone_and_sees_the_gap(
    api: FakeKubeAPI, store: KubeStore
) -> None:
    changed = await store.create(route_rule("changed"))
    await store.create(route_rule("removed"))
    events = aiter(store.watch(["RouteRule"]))
    assert [summary(await next_event(events)) for _ in range(3)] == [
        (EventType.ADDED, "changed"),
        (EventType.ADDED, "removed"),
        (EventType.SYNCED, ""),
    ]
    before_outage = len(api.requests)
    with api.watch_outage():  # the store cannot watch while these happen
        await store.update(
            route_rule("changed", service="ratings").with_meta(
                resource_version=changed.meta.resource_version
            )
        )
        await store.create(route_rule("added"))
        await store.delete("RouteRule", "removed")
        api.compact()  # so the store's next watch gets 410 Gone
    gap = [await next_event(events) for _ in range(3)]
    assert sorted((summary(e) for e in gap), key=lambda s: s[1]) == [
        (EventType.ADDED, "added"),
        (EventType.UPDATED, "changed"),
        (EventType.DELETED, "removed"),
    ]
    updated = next(e for e in gap if e.type is EventType.UPDATED)
    assert updated.config is not None
    assert updated.config.spec == route_rule("changed", service="ratings").spec
    relists = [
        r
        for r in api.requests[before_outage:]
        if r.path.endswith("/routerules") and not r.query.get("watch")
    ]
    assert relists, "the store listed again after 410 Gone"

    await store.create(route_rule("after"))  # and it follows changes again
    assert summary(await next_event(events)) == (EventType.ADDED, "after")
    await events.aclose()  # type: ignore[attr-defined]


async def test_watch_resumes_where_a_closed_stream_stopped(
    api: FakeKubeAPI, store: KubeStore
) -> None:
    events = aiter(store.watch(["RouteRule", "DestinationPolicy"]))
    assert (await next_event(events)).type is EventType.SYNCED
    await store.create(route_rule("first"))
    assert summary(await next_event(events)) == (EventType.ADDED, "first")

    # Changes to other kinds move the version on; a bookmark tells the RouteRule watch.
    await post(api, "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "c"}})
    api.send_bookmarks()
    bookmarked = api.resource_version
    api.close_watches()
    await store.create(route_rule("second"))
    assert summary(await next_event(events)) == (EventType.ADDED, "second")
    resumed = [
        r.query["resourceVersion"]
        for r in api.requests
        if r.query.get("watch") and r.path.endswith("/routerules")
    ]
    assert resumed[-1] == bookmarked
    await events.aclose()  # type: ignore[attr-defined]


async def test_malformed_custom_resources_are_skipped_and_reported(
    api: FakeKubeAPI, store: KubeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="istio.configstore.kube")
    bad_spec = {"destination": {"name": "reviews"}, "route": [{"weight": "heavy"}]}
    bad = {"apiVersion": "config.istio.io/v1alpha2", "kind": "RouteRule"}
    await post(api, RULES, {**bad, "metadata": {"name": "bad-before"}, "spec": bad_spec})
    await store.create(route_rule("good"))

    assert [c.meta.name for c in await store.list("RouteRule")] == ["good"]
    assert "RouteRule default/bad-before" in caplog.text
    assert "route[0].weight" in caplog.text
    with pytest.raises(ConfigError, match="weight"):
        await store.get("RouteRule", "bad-before")

    events = aiter(store.watch(["RouteRule"]))
    assert [summary(await next_event(events)) for _ in range(2)] == [
        (EventType.ADDED, "good"),
        (EventType.SYNCED, ""),
    ]
    caplog.clear()
    await post(api, RULES, {**bad, "metadata": {"name": "bad-during"}, "spec": {"unknown": 1}})
    await store.create(route_rule("good-after"))
    assert summary(await next_event(events)) == (EventType.ADDED, "good-after")
    assert "RouteRule default/bad-during" in caplog.text
    assert "unknown field 'unknown'" in caplog.text
    await events.aclose()  # type: ignore[attr-defined]


async def test_close_ends_watches(store: KubeStore) -> None:
    events = aiter(store.watch(["RouteRule"]))
    assert (await next_event(events)).type is EventType.SYNCED
    pending = asyncio.ensure_future(next_event(events))
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await pending


# -- finding the API server ----------------------------------------------------------------------


def kubeconfig(path: Path, current: str, contexts: dict[str, tuple[str, dict[str, Any]]]) -> Path:
    """A kubeconfig with one cluster and user per context: name -> (server, user)."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": current,
        "clusters": [{"name": n, "cluster": {"server": s}} for n, (s, _) in contexts.items()],
        "users": [{"name": n, "user": u} for n, (_, u) in contexts.items()],
        "contexts": [{"name": n, "context": {"cluster": n, "user": n}} for n in contexts],
    }
    path.write_text(yaml.safe_dump(document))
    return path


async def test_context_selection(api: FakeKubeAPI, tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    path = kubeconfig(
        tmp_path / "config",
        "broken",
        {"broken": (dead, {"token": api.token}), "fake": (api.url, {"token": api.token})},
    )
    named = open_store(f"kube://fake{path}")
    assert await named.list("RouteRule") == []
    await named.close()

    current = open_store(f"kube://{path}")
    with pytest.raises(ConfigError, match=f"cannot reach the Kubernetes API server at {dead}"):
        await current.list("RouteRule")
    await current.close()

    with pytest.raises(ConfigError, match=r"no context 'other' \(contexts: broken, fake\)"):
        load_cluster_access(path, "other")


async def test_token_is_checked(api: FakeKubeAPI, tmp_path: Path) -> None:
    wrong = kubeconfig(tmp_path / "wrong", "fake", {"fake": (api.url, {"token": "not-it"})})
    store = KubeStore(kubeconfig=wrong)
    with pytest.raises(ConfigError, match=f"API server at {api.url} refused"):
        await store.get("RouteRule", "reviews")
    await store.close()

    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text(api.token + "\n")
    from_file = kubeconfig(
        tmp_path / "from-file", "fake", {"fake": (api.url, {"tokenFile": "secrets/token"})}
    )
    store = KubeStore(kubeconfig=from_file)  # tokenFile is relative to the kubeconfig
    assert await store.list("RouteRule") == []
    await store.close()


async def test_kubeconfig_from_environment_then_home(
    api: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    api.write_kubeconfig(tmp_path / "home" / ".kube" / "config")
    store = open_store("kube://")
    await store.create(route_rule("from-home"))
    await store.close()

    elsewhere = api.write_kubeconfig(tmp_path / "elsewhere", context="env")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}{os.pathsep}{elsewhere}")
    access = load_cluster_access()
    assert access.source == f"kubeconfig {elsewhere}, context env"


def test_no_configuration_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_store, "SERVICE_ACCOUNT_DIR", tmp_path / "no-service-account")
    with pytest.raises(ConfigError, match="no Kubernetes configuration found"):
        load_cluster_access()
    with pytest.raises(ConfigError, match=r"kubeconfig .*/absent not found"):
        load_cluster_access(tmp_path / "absent")


def test_bad_kubeconfigs_are_explained(tmp_path: Path) -> None:
    no_current = kubeconfig(tmp_path / "a", "", {"x": ("http://127.0.0.1:1", {})})
    with pytest.raises(ConfigError, match="no current-context"):
        load_cluster_access(no_current)
    bad_data = tmp_path / "b"
    bad_data.write_text(
        yaml.safe_dump(
            {
                "current-context": "x",
                "clusters": [
                    {
                        "name": "x",
                        "cluster": {"server": "https://k", "certificate-authority-data": "%%"},
                    }
                ],
                "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
            }
        )
    )
    with pytest.raises(ConfigError, match="not valid base64"):
        load_cluster_access(bad_data)
    exec_only = kubeconfig(tmp_path / "c", "x", {"x": ("https://k", {"exec": {"command": "aws"}})})
    with pytest.raises(ConfigError, match="exec and auth-provider credentials are not supported"):
        load_cluster_access(exec_only)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing: run `make setup` as root")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_with_the_kubeconfig_ca(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    async with FakeKubeAPI(tls=certificate) as api:
        path = api.write_kubeconfig(tmp_path / "kubeconfig")
        store = KubeStore(kubeconfig=path)
        await store.create(route_rule("over-tls"))
        assert [c.meta.name for c in await store.list("RouteRule")] == ["over-tls"]
        await store.close()

        untrusted = yaml.safe_load(path.read_text())
        del untrusted["clusters"][0]["cluster"]["certificate-authority-data"]
        path.write_text(yaml.safe_dump(untrusted))
        store = KubeStore(kubeconfig=path)
        with pytest.raises(ConfigError, match="certificate verify failed"):
            await store.list("RouteRule")
        await store.close()

        untrusted["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = True
        path.write_text(yaml.safe_dump(untrusted))
        store = KubeStore(kubeconfig=path)
        assert [c.meta.name for c in await store.list("RouteRule")] == ["over-tls"]
        await store.close()


async def test_in_cluster_service_account(
    certificate: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeKubeAPI(tls=certificate) as api:
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "token").write_text(api.token)
        shutil.copy(certificate[0], account / "ca.crt")
        monkeypatch.setattr(kube_store, "SERVICE_ACCOUNT_DIR", account)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        store = open_store("kube://")
        await store.create(route_rule("in-cluster"))
        assert api.get_object("config.istio.io/v1alpha2", "RouteRule", "in-cluster", "default")
        await store.close()


def test_client_certificates_from_data(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    import base64

    cert, key = (base64.b64encode(p.read_bytes()).decode() for p in certificate)
    path = kubeconfig(
        tmp_path / "config",
        "x",
        {"x": ("https://127.0.0.1:1", {"client-certificate-data": cert, "client-key-data": key})},
    )
    access = load_cluster_access(path)
    assert access.client_cert_data.startswith(b"-----BEGIN CERTIFICATE-----")
    context = access.ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
