"""0.2's Mixer scenarios on the running mesh: the default telemetry counts requests, a
denier rule stops exactly the requests it matches, and one on the caller's source.uid (which
its sidecar forwards) stops that caller only.

Mixer answers are cached by the sidecars for at most the valid duration (10 s), and Reports
are batched for up to a second: the checks below poll, bounded, for the state they expect.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from istio.platform.driver import REVIEWS_UNAVAILABLE, http
from istio.platform.local.driver import LocalDriver

RULES = Path(__file__).resolve().parent / "rules"
DENY_ANONYMOUS = RULES / "mixer-deny-anonymous.yaml"
DENY_PRODUCTPAGE = RULES / "mixer-deny-details-from-productpage.yaml"
DETAILS_UNAVAILABLE = "product details are currently unavailable"
PRODUCTPAGE = "productpage.default.svc.cluster.local"


def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def request_count(mesh: LocalDriver, destination: str) -> float:
    text = http(mesh.layout.mixer_metrics_url).body
    total = 0.0
    for line in text.splitlines():
        if line.startswith("request_count{") and f'destination_service="{destination}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_default_telemetry_counts_requests(mesh: LocalDriver) -> None:
    before = request_count(mesh, PRODUCTPAGE)
    for _ in range(3):
        assert http(f"{mesh.ingress_url}/productpage").status == 200
    eventually(lambda: request_count(mesh, PRODUCTPAGE) >= before + 3)
    metrics = http(mesh.layout.mixer_metrics_url).body
    assert re.search(r'^request_count\{.*destination_service="reviews\.default', metrics, re.M)


def test_a_denier_rule_stops_only_what_it_matches(mesh: LocalDriver) -> None:
    page = f"{mesh.ingress_url}/productpage"
    # Mixer config changes no proxy's xDS: applied with istioctl, no propagation to wait for.
    mesh.istioctl("create", "-f", str(DENY_ANONYMOUS))
    try:
        eventually(lambda: http(page).status == 403)
        assert "Not allowed without x-user" in http(page).body
        named = http(page, headers={"x-user": "jason"})
        assert named.status == 200, named.body[:200]
    finally:
        mesh.istioctl("delete", "-f", str(DENY_ANONYMOUS))
    # Anonymous pages come back once the cached denial expires (the valid duration).
    eventually(lambda: http(page).status == 200)


def test_the_server_sidecar_checks_the_callers_source_uid(mesh: LocalDriver) -> None:
    """productpage's sidecar forwards its source.uid (x-istio-attributes); the details
    sidecar's Check sees it, so a rule on it stops productpage's calls to details only."""
    page = f"{mesh.ingress_url}/productpage"
    assert DETAILS_UNAVAILABLE not in http(page).body
    mesh.istioctl("create", "-f", str(DENY_PRODUCTPAGE))
    try:
        eventually(lambda: DETAILS_UNAVAILABLE in http(page).body)
        answer = http(page)
        assert answer.status == 200
        assert REVIEWS_UNAVAILABLE not in answer.body  # productpage's other calls go through
    finally:
        mesh.istioctl("delete", "-f", str(DENY_PRODUCTPAGE))
    eventually(lambda: DETAILS_UNAVAILABLE not in http(page).body)
