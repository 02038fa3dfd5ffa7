"""Mutual TLS between the mesh's proxies (`make up AUTH=mtls` and `AUTH=permissive`): istio-ca
and a node agent per proxy give every workload its SPIFFE certificate; Bookinfo serves the same
pages as without mTLS; a client without a sidecar is refused on a workload's port in strict
mode and served in permissive mode (0.2's known issue, fixed); the caller's identity reaches
the callee's app (x-forwarded-client-cert, set by the callee's sidecar).

Each mode is its own mesh (the mode is MeshConfig, read by Pilot at start), on its own /24 of
127/8 beside the session's plaintext mesh."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio.platform.driver import (
    PlatformDriver,
    http,
    login,
    normalise_page,
    reviews_version,
)
from istio.platform.local.driver import LocalDriver

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "bookinfo"
GOLDEN = Path(__file__).resolve().parent / "golden"
ALL_V1 = SAMPLES / "route-rule-all-v1.yaml"
JASON_V2 = SAMPLES / "route-rule-reviews-test-v2.yaml"
SPIFFE = "spiffe://cluster.local/ns/default/sa/{}"


def _mesh(
    tmp_path_factory: pytest.TempPathFactory, auth: str, network: str
) -> Iterator[LocalDriver]:
    driver = LocalDriver(tmp_path_factory.mktemp(f"mesh-{auth}"), network=network, auth=auth)
    try:
        driver.deploy_bookinfo()
        yield driver
    finally:
        driver.teardown()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDriver]:
    yield from _mesh(tmp_path_factory, "mtls", "127.0.4")


@pytest.fixture(scope="module")
def permissive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDriver]:
    yield from _mesh(tmp_path_factory, "permissive", "127.0.5")


def ssl_stat(mesh: PlatformDriver, workload: str, name: str) -> int:
    """The sum of a sidecar's `ssl.listener.*.<name>` counters."""
    stats = mesh.admin(workload, "/stats").body
    return sum(
        int(line.rpartition(" ")[2])
        for line in stats.splitlines()
        if line.startswith("ssl.listener.") and line.partition(":")[0].endswith(f".{name}")
    )


def test_bookinfo_serves_the_golden_pages_over_mtls(strict: LocalDriver) -> None:
    try:
        strict.apply(ALL_V1)
        strict.apply(JASON_V2)
        jason = login(strict.ingress_url, "jason")
        for name, version, headers in (
            ("productpage-jason-v2.html", "v2", {"Cookie": jason}),
            ("productpage-anonymous-v1.html", "v1", {}),
        ):
            page = http(f"{strict.ingress_url}/productpage", headers=headers)
            assert page.status == 200, (page.status, page.body[:300])
            assert reviews_version(page.body) == version, name
            golden = (GOLDEN / name).read_text(encoding="utf-8")
            assert normalise_page(page.body) == golden, f"{name} differs over mTLS"
    finally:
        strict.reset()
    # Every hop was mutual TLS: the gateway to productpage, productpage to details and
    # reviews, reviews v2 to ratings.
    for workload in ("productpage-v1", "details-v1", "reviews-v2", "ratings-v1"):
        assert ssl_stat(strict, workload, "handshake") >= 1, workload


def test_a_client_without_a_sidecar_is_refused_in_strict_mode(strict: LocalDriver) -> None:
    refused_before = ssl_stat(strict, "details-v1", "plaintext_refused")
    answer = http(f"{strict.inbound_url('details-v1')}/details/0", timeout=10)
    assert answer.status == 0, (answer.status, answer.body[:200])
    assert ssl_stat(strict, "details-v1", "plaintext_refused") > refused_before
    # The same call from productpage's app, through its sidecar, is mutual TLS and served.
    served = strict.request_from("productpage-v1", "http://details:9080/details/0")
    assert served.status == 200, served.body[:200]


def test_a_client_without_a_sidecar_is_served_in_permissive_mode(permissive: LocalDriver) -> None:
    answer = http(f"{permissive.inbound_url('details-v1')}/details/0")
    assert answer.status == 200, (answer.status, answer.body[:200])
    assert ssl_stat(permissive, "details-v1", "plaintext") >= 1
    page = http(f"{permissive.ingress_url}/productpage")
    assert page.status == 200
    assert ssl_stat(permissive, "productpage-v1", "handshake") >= 1  # the gateway speaks mTLS


def test_the_callers_identity_reaches_the_callees_app(permissive: LocalDriver) -> None:
    urls: dict[str, str] = {}
    try:
        for name in ("a", "b"):
            urls[name] = permissive.deploy_app(name)
        # From outside (plaintext, permitted) into a's app, which calls b through its sidecar.
        query = urllib.parse.urlencode({"url": "http://b:9080/who"})
        answer = http(f"{urls['a']}/call?{query}")
        assert answer.status == 200, answer.body[:300]
        result = json.loads(answer.body)
        assert "x-forwarded-client-cert" not in result["headers"]  # a's caller had no cert
        assert result["status"] == 200, result
        xfcc = result["body"]["headers"]["x-forwarded-client-cert"]
        fields = dict(part.split("=", 1) for part in xfcc.split(";"))
        assert fields["URI"] == SPIFFE.format("a")
        assert fields["By"] == SPIFFE.format("b")
        assert len(fields["Hash"]) == 64
    finally:
        for name in urls:
            permissive.remove_app(name)
