"""Istio 0.2's Bookinfo scenarios on a running mesh: apply rules with istioctl, wait until every
proxy acked them (Pilot's /debug/syncz, never a sleep), send real traffic, assert.

The last test kills a workload: marked `breaks_mesh`, it runs after every other scenario.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from istio.platform.driver import (
    REVIEWS_UNAVAILABLE,
    PlatformDriver,
    http,
    login,
    reviews_version,
    sync_state,
    wait_for_propagation,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "bookinfo"
RULES = Path(__file__).resolve().parent / "rules"
ALL_V1 = SAMPLES / "route-rule-all-v1.yaml"
JASON_V2 = SAMPLES / "route-rule-reviews-test-v2.yaml"
RATINGS_DELAY = SAMPLES / "route-rule-ratings-test-delay.yaml"
RATINGS_ABORT = SAMPLES / "route-rule-ratings-test-abort.yaml"
REVIEWS_50_V3 = SAMPLES / "route-rule-reviews-50-v3.yaml"
EGRESS_ALLOWED = RULES / "egress-allowed.yaml"
RATINGS_ERROR = "Ratings service is currently unavailable"
GOLDEN = Path(__file__).resolve().parent / "golden"
# What legitimately differs between two fetches of the same page: request ids, timings.
_VARIES = (
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<request-id>"),
    (re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b"), "<duration>"),
)


def versions(mesh: PlatformDriver, count: int, cookie: str | None = None) -> Counter[str]:
    """Which reviews version rendered each of `count` product pages (4 at a time)."""
    headers = {"Cookie": cookie} if cookie else {}

    def one(_: int) -> str:
        page = http(f"{mesh.ingress_url}/productpage", headers=headers)
        assert page.status == 200, (page.status, page.body[:300])
        return reviews_version(page.body)

    with ThreadPoolExecutor(4) as pool:
        return Counter(pool.map(one, range(count)))


def test_without_rules_reviews_rotate(mesh: PlatformDriver) -> None:
    seen = versions(mesh, 30)
    assert set(seen) == {"v1", "v2", "v3"}, seen


def test_ingress_serves_bookinfo_paths_only(mesh: PlatformDriver) -> None:
    url = mesh.ingress_url
    assert http(f"{url}/productpage").status == 200
    assert http(f"{url}/static/bookinfo.css").status == 200
    assert http(f"{url}/api/v1/products").status == 200
    assert http(f"{url}/logout").status in (302, 303)
    assert http(f"{url}/not-bookinfo").status == 404


def test_proxy_status_shows_every_proxy_synced(mesh: PlatformDriver) -> None:
    table = mesh.istioctl("proxy-status", "--pilot-address", mesh.pilot_address)
    rows = table.splitlines()[1:]
    assert len(rows) == 7, table
    assert all(row.split()[1:] == ["SYNCED"] * 4 for row in rows), table
    statuses = json.loads(
        mesh.istioctl("proxy-status", "--pilot-address", mesh.pilot_address, "-o", "json")
    )
    productpage = next(s for s in statuses if "~productpage-v1." in s["node"])
    assert productpage["types"]["rds"]["sent"] == productpage["types"]["rds"]["acked"]
    assert any(entry.startswith("virtualOutbound ") for entry in productpage["listeners"])


def test_all_v1(mesh: PlatformDriver) -> None:
    mesh.apply(ALL_V1)
    assert versions(mesh, 100) == Counter({"v1": 100})


def test_version_routing_by_user_cookie(mesh: PlatformDriver) -> None:
    mesh.apply(ALL_V1)
    mesh.apply(JASON_V2)
    jason = login(mesh.ingress_url, "jason")
    assert jason == "user=jason"
    assert versions(mesh, 20, jason) == Counter({"v2": 20})
    assert versions(mesh, 20) == Counter({"v1": 20})
    assert versions(mesh, 20, login(mesh.ingress_url, "alice")) == Counter({"v1": 20})


def normalise(page: str) -> str:
    for pattern, replacement in _VARIES:
        page = pattern.sub(replacement, page)
    return page.replace("\r\n", "\n")


def assert_matches_golden(page: str, name: str) -> None:
    """`page`, normalised, equals e2e/golden/NAME; UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    text = normalise(page)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 to write it"
    golden = path.read_text(encoding="utf-8")
    assert text == golden, f"{name} differs from the golden file (UPDATE_GOLDEN=1 rewrites it)"


def test_version_routing_pages_match_golden_files(mesh: PlatformDriver) -> None:
    mesh.apply(ALL_V1)
    mesh.apply(JASON_V2)
    jason = login(mesh.ingress_url, "jason")
    for name, version, headers in (
        ("productpage-jason-v2.html", "v2", {"Cookie": jason}),
        ("productpage-anonymous-v1.html", "v1", {}),
    ):
        first = http(f"{mesh.ingress_url}/productpage", headers=headers)
        second = http(f"{mesh.ingress_url}/productpage", headers=headers)
        assert first.status == second.status == 200, (first.status, second.status)
        assert reviews_version(first.body) == version, name
        assert normalise(first.body) == normalise(second.body)  # deterministic, run to run
        assert_matches_golden(first.body, name)


def test_fault_delay_for_jason_shows_reviews_unavailable_in_time(mesh: PlatformDriver) -> None:
    mesh.apply(ALL_V1)
    mesh.apply(JASON_V2)
    mesh.apply(RATINGS_DELAY)
    page = http(f"{mesh.ingress_url}/productpage", headers={"Cookie": "user=jason"})
    assert page.status == 200
    assert REVIEWS_UNAVAILABLE in page.body
    # productpage gives reviews 3 s and one retry: it answers before ratings' 7 s delay ends.
    assert 3.0 <= page.seconds < 7.0, page.seconds
    assert versions(mesh, 5) == Counter({"v1": 5})  # everyone else is unaffected


def test_fault_abort_for_jason_shows_ratings_unavailable(mesh: PlatformDriver) -> None:
    mesh.apply(ALL_V1)
    mesh.apply(JASON_V2)
    mesh.apply(RATINGS_ABORT)
    cookie = {"Cookie": "user=jason"}
    answer = http(f"{mesh.ingress_url}/api/v1/products/0/reviews", headers=cookie)
    assert answer.status == 200, answer.body
    ratings = [review["rating"] for review in json.loads(answer.body)["reviews"]]
    assert ratings == [{"error": RATINGS_ERROR}] * len(ratings) != [], ratings
    page = http(f"{mesh.ingress_url}/productpage", headers=cookie)
    assert page.status == 200
    assert "unavailable" in page.body


def test_traffic_shifting_50_50_v1_v3(mesh: PlatformDriver) -> None:
    mesh.apply(REVIEWS_50_V3)
    seen = versions(mesh, 100)
    assert set(seen) == {"v1", "v3"}, seen
    assert abs(seen["v1"] - 50) <= 10, seen


def test_egress_rule_allows_one_external_host(
    mesh: PlatformDriver, external: dict[str, list[str]]
) -> None:
    """EgressRule for allowed.e2e.test:18080 only; both names resolve (hosts file) to servers
    the test runs on loopback, so only the rule decides."""
    allowed, blocked = "allowed.e2e.test:18080", "blocked.e2e.test:18080"
    assert mesh.request_from("productpage-v1", f"http://{allowed}/").status != 200
    mesh.apply(EGRESS_ALLOWED)
    answer = mesh.request_from("productpage-v1", f"http://{allowed}/")
    assert (answer.status, answer.body) == (200, f"external {allowed}")
    assert mesh.request_from("productpage-v1", f"http://{blocked}/").status in (404, 502, 503)
    assert external == {allowed: [allowed], blocked: []}


@pytest.mark.breaks_mesh
def test_dead_workload_leaves_the_registry_and_the_rest_serves(mesh: PlatformDriver) -> None:
    """Runs last (conftest): it kills reviews-v3 for the rest of the session."""
    before = sync_state(mesh.pilot_address)
    mesh.kill_workload("reviews-v3")
    report = mesh.wait_for_output("reviews-v3 (pid")
    assert "exited with status -9" in report
    assert "left the reviews service's endpoints" in report
    wait_for_propagation(mesh.pilot_address, before, proxies=7)
    seen = versions(mesh, 30)
    assert set(seen) == {"v1", "v2"}, seen
