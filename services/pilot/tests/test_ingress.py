"""Kubernetes Ingresses as IngressRules: the conversion, and Pilot following them on a fake
API server to the ingress gateway's routes."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from istio.configstore import open_store
from istio.model import Proxy
from istio.pilot.ingress import KubeIngressSource, convert, selected
from istio.pilot.registry.kube import KubeRegistry
from istio.pilot.server import PilotServer
from istio.pilot.xds import resources
from istio.pilot.xds.generate import generate
from istio.testing.kube import FakeKubeAPI, ResourceType

GOLDEN = Path(__file__).with_name("golden") / "kube-ingress-routes.json"
INGRESS_NODE = "ingress~10.0.0.9~istio-ingress.istio-system~istio-system.svc.cluster.local"


def ingress(
    name: str = "bookinfo", annotations: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"kubernetes.io/ingress.class": "istio"}
            if annotations is None
            else annotations,
        },
        "spec": spec,
    }


def v1_path(path: str, kind: str, service: str, port: int | str) -> dict[str, Any]:
    number = {"number": port} if isinstance(port, int) else {"name": port}
    return {
        "path": path,
        "pathType": kind,
        "backend": {"service": {"name": service, "port": number}},
    }


BOOKINFO = ingress(
    rules=[
        {
            "host": "bookinfo.example.com",
            "http": {
                "paths": [
                    v1_path("/productpage", "Exact", "productpage", 9080),
                    v1_path("/static", "Prefix", "productpage", "http"),
                ]
            },
        }
    ],
    defaultBackend={"service": {"name": "productpage", "port": {"number": 9080}}},
    tls=[{"hosts": ["bookinfo.example.com"], "secretName": "istio-ingress-certs"}],
)


def test_each_path_becomes_a_rule_more_specific_first() -> None:
    configs, problems = convert(BOOKINFO)
    assert problems == []
    rules = {c.meta.name: json_format.MessageToDict(c.spec) for c in configs}
    assert rules == {
        "bookinfo-default": {
            "destination": {"name": "productpage", "namespace": "default"},
            "destinationPort": 9080,
            "precedence": 1,
        },
        "bookinfo-0-0": {
            "destination": {"name": "productpage", "namespace": "default"},
            "destinationPort": 9080,
            "precedence": 2_000_012,
            "tlsSecret": "istio-ingress-certs",
            "match": {
                "request": {
                    "headers": {
                        "authority": {"exact": "bookinfo.example.com"},
                        "uri": {"exact": "/productpage"},
                    }
                }
            },
        },
        "bookinfo-0-1": {
            "destination": {"name": "productpage", "namespace": "default"},
            "destinationPortName": "http",
            "precedence": 1_000_007,
            "tlsSecret": "istio-ingress-certs",
            "match": {
                "request": {
                    "headers": {
                        "authority": {"exact": "bookinfo.example.com"},
                        "uri": {"prefix": "/static"},
                    }
                }
            },
        },
    }
    assert {c.meta.kind for c in configs} == {"IngressRule"}


def test_a_secret_name_that_is_not_one_is_reported_and_not_served() -> None:
    bad = json.loads(json.dumps(BOOKINFO))
    bad["spec"]["tls"] = [{"hosts": ["bookinfo.example.com"], "secretName": "../../etc"}]
    configs, problems = convert(bad)
    assert problems == [
        "Ingress default/bookinfo: tls 0: secret '../../etc' is not a secret's name"
    ]
    assert [c.spec.tls_secret for c in configs] == ["", "", ""]  # type: ignore[attr-defined]


def test_the_v1beta1_shape_and_02s_regex_looking_prefixes() -> None:
    old = {
        "apiVersion": "extensions/v1beta1",
        "kind": "Ingress",
        "metadata": {"name": "gateway", "namespace": "bookinfo"},
        "spec": {
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": "/api/v1/products/.*",
                                "backend": {"serviceName": "productpage", "servicePort": "9080"},
                            },
                            {"path": "/x", "backend": {"serviceName": "details"}},
                        ]
                    }
                }
            ]
        },
    }
    configs, problems = convert(old)
    assert problems == ["Ingress bookinfo/gateway: 0-1: backend details has no service port"]
    (rule,) = configs
    assert rule.meta.namespace == "bookinfo"
    assert rule.spec.match.request.headers["uri"].prefix == "/api/v1/products/"  # type: ignore[attr-defined]
    assert rule.spec.destination_port == 9080  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("annotations", "class_name", "mode", "served"),
    [
        ({"kubernetes.io/ingress.class": "istio"}, None, "STRICT", True),
        ({"kubernetes.io/ingress.class": "nginx"}, None, "STRICT", False),
        ({}, None, "STRICT", False),
        ({}, None, "DEFAULT", True),
        ({"kubernetes.io/ingress.class": "nginx"}, None, "DEFAULT", False),
        ({}, "istio", "STRICT", True),
        ({"kubernetes.io/ingress.class": "istio"}, None, "OFF", False),
    ],
)
def test_which_ingresses_the_mesh_serves(
    annotations: dict[str, str], class_name: str | None, mode: str, served: bool
) -> None:
    spec = {"ingressClassName": class_name} if class_name else {}
    assert selected(ingress(annotations=annotations, **spec), mode, "istio") is served


def _service(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {
            "clusterIP": ip,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 9080, "targetPort": 9080, "protocol": "TCP"}],
        },
    }


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeAPI]:
    async with FakeKubeAPI() as server:
        server.add_resource_type(
            ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", short_names=("ing",))
        )
        server.create_object(_service("productpage", "10.96.0.10"))
        server.create_object(BOOKINFO)
        yield server


async def test_pilot_follows_ingresses_to_the_gateways_routes(
    api: FakeKubeAPI, tmp_path: Path
) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    (tmp_path / "config").mkdir()
    source = KubeIngressSource(kubeconfig)
    registry = KubeRegistry(kubeconfig=kubeconfig)
    pilot = PilotServer(
        registry,
        open_store(f"file://{tmp_path / 'config'}"),
        generate,
        config_sources=[source],
    )
    await pilot.start("127.0.0.1:0", "127.0.0.1:0")
    try:
        await asyncio.wait_for(pilot.wait_ready(), 30)
        assert pilot.readiness() == (True, "")
        snapshot = pilot.ads.snapshot
        assert snapshot is not None
        found = generate(snapshot, Proxy.parse(INGRESS_NODE))
        routes = {
            name: json_format.MessageToDict(message)
            for name, message in sorted(found.of(resources.ROUTE).items())
        }
        text = json.dumps(routes, indent=1, sort_keys=True) + "\n"
        if os.environ.get("UPDATE_GOLDEN"):
            GOLDEN.write_text(text)
        assert GOLDEN.exists(), f"{GOLDEN} is missing: run with UPDATE_GOLDEN=1"
        assert text == GOLDEN.read_text()

        # An edit to the Ingress reaches Pilot's configs without a restart (0.2 needed one).
        changed = json.loads(json.dumps(BOOKINFO))
        changed["spec"]["rules"][0]["http"]["paths"][1]["path"] = "/assets"
        del changed["spec"]["defaultBackend"]
        api.delete_object("networking.k8s.io/v1", "Ingress", "bookinfo", "default")
        api.create_object(changed)

        async def prefixes() -> set[str]:
            while True:
                now = {
                    c.spec.match.request.headers["uri"].prefix  # type: ignore[attr-defined]
                    for c in pilot.configs
                    if c.meta.kind == "IngressRule"
                }
                if "/assets" in now:
                    return now
                await asyncio.sleep(0.05)  # no event to await: Pilot's view is polled

        assert await asyncio.wait_for(prefixes(), 20) == {"/assets", ""}
        assert {c.meta.name for c in pilot.configs if c.meta.kind == "IngressRule"} == {
            "bookinfo-0-0",
            "bookinfo-0-1",
        }
    finally:
        await pilot.stop()
