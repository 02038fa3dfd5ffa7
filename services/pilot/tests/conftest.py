"""Shared fixtures: Bookinfo as a MeshSnapshot, with 0.2's sample rules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest

from istio.config import Config, parse_documents
from istio.model import Labels, Port, Protocol, Resolution, Service, ServiceInstance
from istio.pilot.mesh import WATCHED_KINDS, MeshSnapshot

SAMPLES = Path(__file__).resolve().parents[3] / "samples" / "bookinfo"
HTTP = Port("http", 9080, Protocol.HTTP)


def host(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


SERVICES = {
    host("productpage"): Service(host("productpage"), (HTTP,), address="10.0.0.10"),
    host("details"): Service(host("details"), (HTTP,), address="10.0.0.11"),
    host("reviews"): Service(host("reviews"), (HTTP,), address="10.0.0.12"),
    host("ratings"): Service(host("ratings"), (HTTP,), address="10.0.0.13"),
    host("mongodb"): Service(
        host("mongodb"), (Port("mongo", 27017, Protocol.MONGO),), address="10.0.0.14"
    ),
    host("grpc-echo"): Service(host("grpc-echo"), (Port("grpc", 7070, Protocol.GRPC),)),
    "api.example.com": Service(
        "api.example.com",
        (Port("https", 443, Protocol.HTTPS),),
        mesh_external=True,
        resolution=Resolution.DNS,
    ),
}

WORKLOADS = [
    ("productpage", "v1", "127.0.0.2", "us-east/a"),
    ("details", "v1", "127.0.0.3", "us-east/a"),
    ("reviews", "v1", "127.0.0.4", "us-east/a"),
    ("reviews", "v2", "127.0.0.5", "us-east/b"),
    ("reviews", "v3", "127.0.0.6", "us-east/b"),
    ("ratings", "v1", "127.0.0.7", "us-east/a"),
    ("mongodb", "v1", "127.0.0.8", "us-east/a"),
    ("grpc-echo", "v1", "127.0.0.9", "us-east/a"),
    ("grpc-echo", "v2", "127.0.0.10", "us-east/a"),
]


def instances() -> dict[str, tuple[ServiceInstance, ...]]:
    found: dict[str, list[ServiceInstance]] = {}
    for app, version, address, locality in WORKLOADS:
        service = SERVICES[host(app)]
        port = service.ports[0]
        found.setdefault(service.hostname, []).append(
            ServiceInstance(
                service,
                port,
                address,
                port.port,
                Labels({"app": app, "version": version}),
                service_account=f"bookinfo-{app}",
                locality=locality,
            )
        )
    return {name: tuple(items) for name, items in found.items()}


def sample(*names: str) -> list[Config]:
    configs: list[Config] = []
    for name in names:
        path = SAMPLES / name
        parsed, problems = parse_documents(path.read_text(), str(path))
        assert not problems, problems
        configs += parsed
    return configs


EXTRA_RULES = """
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: productpage}
spec:
  port: 8080
  destination: {name: productpage}
  destinationPort: 9080
  match: {request: {headers: {uri: {prefix: /productpage}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: IngressRule
metadata: {name: api}
spec:
  port: 8080
  precedence: 1
  destination: {name: productpage}
  destinationPortName: http
  match: {request: {headers: {uri: {prefix: /api/v1/products}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: grpc-echo-split}
spec:
  destination: {name: grpc-echo}
  precedence: 1
  route:
  - {labels: {version: v1}, weight: 75}
  - {labels: {version: v2}, weight: 25}
  httpReqTimeout: {simpleTimeout: {timeout: 2s}}
  httpReqRetries: {simpleRetry: {attempts: 2, perTryTimeout: 500ms}}
---
apiVersion: config.istio.io/v1alpha2
kind: RouteRule
metadata: {name: details-extras}
spec:
  destination: {name: details}
  precedence: 3
  match:
    request:
      headers:
        uri: {prefix: /old}
        method: {exact: GET}
  rewrite: {uri: /new, authority: details-v2}
  websocketUpgrade: true
  mirror: {name: details, labels: {version: v1}}
  appendHeaders: {x-mesh: "yes"}
"""


def snapshot(*sample_files: str) -> MeshSnapshot:
    extra, problems = parse_documents(EXTRA_RULES, "extra")
    assert not problems, problems
    configs = sample(*sample_files) + extra
    by_kind = {
        kind: tuple(
            sorted(
                (c for c in configs if c.meta.kind == kind),
                key=lambda c: (c.meta.namespace, c.meta.name),
            )
        )
        for kind in WATCHED_KINDS
    }
    return MeshSnapshot(
        services=MappingProxyType(SERVICES),
        instances=MappingProxyType(instances()),
        configs=MappingProxyType(by_kind),
    )


DEFAULT_SAMPLES = (
    "route-rule-all-v1.yaml",
    "route-rule-reviews-test-v2.yaml",
    "route-rule-ratings-test-delay.yaml",
    "egress-rule-google-apis.yaml",
    "destination-policy-reviews-cb.yaml",
)


@pytest.fixture
def bookinfo() -> Callable[..., MeshSnapshot]:
    """Bookinfo with the given sample files' rules (default: DEFAULT_SAMPLES) plus extras."""

    def make(*sample_files: str) -> MeshSnapshot:
        return snapshot(*(sample_files or DEFAULT_SAMPLES))

    return make
