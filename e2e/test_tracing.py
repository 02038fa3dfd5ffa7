"""A Bookinfo request's trace arrives whole at the collector: every proxy on its path reports
its span, and the spans join into one tree (the apps forward the B3 headers, as 0.2's Bookinfo
apps did; the sidecars make and share the spans)."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from istio.platform.driver import PlatformDriver, http, reviews_version
from istio.testing.zipkin import Collector

ALL_V1 = Path(__file__).resolve().parents[1] / "samples" / "bookinfo" / "route-rule-all-v1.yaml"


def _trace_of(spans: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    ids = {s["traceId"] for s in spans if s["tags"].get("guid:x-request-id") == request_id}
    return [s for s in spans if s["traceId"] in ids]


def test_a_product_page_trace_arrives_whole(mesh: PlatformDriver, zipkin: Collector) -> None:
    mesh.apply(ALL_V1)  # reviews v1: productpage calls details and reviews, reviews nothing
    request_id = str(uuid.uuid4())
    page = http(f"{mesh.ingress_url}/productpage", headers={"x-request-id": request_id})
    assert page.status == 200, page.body[:300]
    assert reviews_version(page.body) == "v1"

    # ingress -> productpage, productpage -> details, productpage -> reviews: each call is a
    # CLIENT span from the caller's proxy and the callee's SERVER span sharing its id; each
    # callee's sidecar also checked the call with Mixer (a `mixer check` span under its own).
    def whole(spans: list[dict[str, Any]]) -> bool:
        return len(_trace_of(spans, request_id)) >= 9

    everything = _trace_of(zipkin.wait_for(whole), request_id)
    assert len({s["traceId"] for s in everything}) == 1
    checks = [s for s in everything if s["name"] == "mixer check"]
    trace = [s for s in everything if s["name"] != "mixer check"]
    servers_by_service = {
        s["localEndpoint"]["serviceName"]: s for s in trace if s["kind"] == "SERVER"
    }
    assert sorted(c["localEndpoint"]["serviceName"] for c in checks) == [
        "details",
        "productpage",
        "reviews",
    ]
    for check in checks:
        server = servers_by_service[check["localEndpoint"]["serviceName"]]
        assert check["parentId"] == server["id"]
        assert check["tags"]["mixer.status_code"] == "0"
    assert Counter((s["localEndpoint"]["serviceName"], s["kind"]) for s in trace) == Counter(
        {
            ("istio-ingress", "CLIENT"): 1,
            ("productpage", "SERVER"): 1,
            ("productpage", "CLIENT"): 2,
            ("details", "SERVER"): 1,
            ("reviews", "SERVER"): 1,
        }
    )
    clients = {s["id"]: s for s in trace if s["kind"] == "CLIENT"}
    servers = [s for s in trace if s["kind"] == "SERVER"]
    # Each server span is the shared half of exactly one client span.
    assert sorted(s["id"] for s in servers) == sorted(clients)
    assert all(s["shared"] for s in servers)
    # One root (the ingress), and every other span hangs off a span in the trace.
    roots = [s for s in clients.values() if "parentId" not in s]
    assert [r["localEndpoint"]["serviceName"] for r in roots] == ["istio-ingress"]
    for span in clients.values():
        if span is not roots[0]:
            assert span["parentId"] == roots[0]["id"], span
    by_name = {s["name"].split("/")[0] + "/" + s["localEndpoint"]["serviceName"]: s for s in trace}
    assert all(s["tags"]["http.status_code"] == "200" for s in trace), by_name
    assert all(s["duration"] > 0 for s in trace)
