"""Reachability between test apps over http (0.2's e2e `apps` test): two echo apps, `a` and `b`,
each with its sidecar, call each other by service name through their sidecars; the sidecars add
an x-request-id that reaches the callee; a RouteRule on b changes what a sees."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from istio.platform.driver import PlatformDriver, http

B_ABORT = Path(__file__).resolve().parent / "rules" / "echo-b-abort.yaml"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(scope="module")
def apps(mesh: PlatformDriver) -> Iterator[dict[str, str]]:
    """The URL of each test app (its sidecar's inbound listener), as deployed by the platform."""
    urls: dict[str, str] = {}
    try:
        for name in ("a", "b"):
            urls[name] = mesh.deploy_app(name)
        yield urls
    finally:
        for name in urls:
            mesh.remove_app(name)


def call(apps: dict[str, str], caller: str, url: str, *headers: str) -> dict[str, Any]:
    """Ask `caller` (through its sidecar's inbound) to GET `url` (through its sidecar's
    outbound); what it received and what the callee answered."""
    query = urllib.parse.urlencode([("url", url), *(("header", h) for h in headers)])
    answer = http(f"{apps[caller]}/call?{query}")
    assert answer.status == 200, (answer.status, answer.body[:300])
    result: dict[str, Any] = json.loads(answer.body)
    return result


@pytest.mark.parametrize(("caller", "callee"), [("a", "b"), ("b", "a")])
def test_apps_reach_each_other_by_service_name(
    apps: dict[str, str], caller: str, callee: str
) -> None:
    result = call(apps, caller, f"http://{callee}:9080/hello")
    assert result["service"] == caller
    assert result["status"] == 200, result
    echoed = result["body"]
    assert (echoed["service"], echoed["path"], echoed["host"]) == (
        callee,
        "/hello",
        f"{callee}:9080",
    )
    # The caller's inbound sidecar generated the request id; it travelled to the callee.
    request_id = result["headers"]["x-request-id"]
    assert re.fullmatch(UUID, request_id), request_id
    assert echoed["headers"]["x-request-id"] == request_id


def test_request_id_sent_by_the_client_is_kept(apps: dict[str, str]) -> None:
    query = urllib.parse.urlencode({"url": "http://b:9080/"})
    answer = http(f"{apps['a']}/call?{query}", headers={"x-request-id": "e2e-fixed-id"})
    result = json.loads(answer.body)
    assert result["headers"]["x-request-id"] == "e2e-fixed-id"
    assert result["body"]["headers"]["x-request-id"] == "e2e-fixed-id"


def test_unknown_service_is_not_reachable(apps: dict[str, str]) -> None:
    result = call(apps, "a", "http://nowhere:9080/")
    assert result["status"] == 404, result


def test_route_rule_on_b_changes_what_a_sees(mesh: PlatformDriver, apps: dict[str, str]) -> None:
    fault = "x-e2e-fault: abort"
    assert call(apps, "a", "http://b:9080/", fault)["status"] == 200
    mesh.apply(B_ABORT)
    aborted = call(apps, "a", "http://b:9080/", fault)
    assert aborted["status"] == 503, aborted
    assert call(apps, "a", "http://b:9080/")["status"] == 200
    assert call(apps, "b", "http://a:9080/", fault)["status"] == 200  # a has no rule
    mesh.delete(B_ABORT)
    assert call(apps, "a", "http://b:9080/", fault)["status"] == 200
