"""Generated xDS for Bookinfo, compared with golden files (UPDATE_GOLDEN=1 rewrites them).

Each golden file is the JSON of every resource by type and name, sorted, so a diff shows
exactly what a change did to what a proxy receives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import json_format

from istio.model import Proxy
from istio.pilot.mesh import MeshSnapshot
from istio.pilot.xds import resources
from istio.pilot.xds.generate import generate

GOLDEN = Path(__file__).parent / "golden"

PROXIES = {
    "sidecar-reviews-v2": (
        "sidecar~127.0.0.5~reviews-v2.default~default.svc.cluster.local",
        {"INTERCEPTION_MODE": "NONE", "APP_PORTS": "9080:19080"},
    ),
    "sidecar-productpage-iptables": (
        "sidecar~127.0.0.2~productpage-v1.default~default.svc.cluster.local",
        {},
    ),
    "ingress": (
        "ingress~127.0.0.100~istio-ingress.istio-system~istio-system.svc.cluster.local",
        {},
    ),
    "egress": (
        "egress~127.0.0.101~istio-egress.istio-system~istio-system.svc.cluster.local",
        {"GATEWAY_PORTS": "15002"},
    ),
    "grpc-client": (
        "sidecar~127.0.0.50~client.default~default.svc.cluster.local",
        {"GENERATOR": "grpc"},
    ),
}


def rendered(found: resources.Resources) -> str:
    document = {
        resources.SHORT_NAMES[type_url]: {
            name: json_format.MessageToDict(message)
            for name, message in sorted(found.of(type_url).items())
        }
        for type_url in resources.PUSH_ORDER
    }
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_golden(name: str, bookinfo: Callable[..., MeshSnapshot]) -> None:
    node_id, metadata = PROXIES[name]
    text = rendered(generate(bookinfo(), Proxy.parse(node_id, metadata)))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs: review, then UPDATE_GOLDEN=1"


def test_generation_is_deterministic(bookinfo: Callable[..., MeshSnapshot]) -> None:
    proxy = Proxy.parse(*PROXIES["sidecar-reviews-v2"])
    first = generate(bookinfo(), proxy)
    second = generate(bookinfo(), proxy)
    for type_url in resources.PUSH_ORDER:
        assert first.version(type_url) == second.version(type_url)
