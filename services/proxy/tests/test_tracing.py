"""B3 propagation and Zipkin spans, as Envoy's Zipkin tracer makes them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from istio.proxy.tracing import (
    Tracer,
    TracingConfig,
    post_json,
    propagate,
    start_span,
    zipkin_json,
)
from istio.testing.net import free_port

OUT = TracingConfig(outbound=True, collector_cluster="zipkin", service_name="productpage")
IN = TracingConfig(outbound=False, collector_cluster="zipkin", service_name="reviews")
TRACE = b"463ac35c9f6413ad48485a3953bb6124"
SPAN = b"a2fb4a1d1a96d312"
PARENT = b"0020000000000001"


def _headers(**b3: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Host", b"reviews:9080")] + [
        (f"X-B3-{k.title().replace('id', 'Id')}".encode(), v) for k, v in b3.items()
    ]


def _get(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    found = [v for k, v in headers if k == name]
    assert len(found) <= 1, headers
    return found[0] if found else None


def test_a_request_without_a_trace_starts_one_and_its_callee_is_its_child() -> None:
    span = start_span(OUT, [(b"host", b"x")])
    assert (len(span.trace_id), len(span.id), span.parent_id) == (16, 16, None)
    assert (span.kind, span.shared, span.sampled) == ("CLIENT", False, True)
    out = propagate(span, [(b"host", b"x")])
    assert _get(out, b"x-b3-traceid") == span.trace_id.encode()
    assert _get(out, b"x-b3-spanid") == span.id.encode()
    assert _get(out, b"x-b3-parentspanid") is None
    assert _get(out, b"x-b3-sampled") == b"1"
    assert _get(out, b"x-ot-span-context") == f"{span.trace_id};{span.id};;cs".encode()
    wide = start_span(TracingConfig(outbound=True, trace_id_128bit=True), [])
    assert len(wide.trace_id) == 32


def test_outbound_makes_a_client_span_under_the_callers_span() -> None:
    span = start_span(OUT, _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT, sampled=b"1"))
    assert (span.trace_id, span.parent_id, span.kind) == (TRACE.decode(), SPAN.decode(), "CLIENT")
    assert span.id != SPAN.decode()
    out = propagate(span, _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT, sampled=b"1"))
    # The caller's B3 headers are replaced, whatever their case, never duplicated.
    assert not [k for k, _ in out if k.lower().startswith(b"x-b3") and k != k.lower()]
    assert _get(out, b"x-b3-spanid") == span.id.encode()
    assert _get(out, b"x-b3-parentspanid") == SPAN


def test_inbound_shares_the_client_span_and_passes_the_headers_on() -> None:
    headers = _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT, sampled=b"1")
    span = start_span(IN, headers)
    assert (span.id, span.parent_id, span.kind, span.shared) == (
        SPAN.decode(),
        PARENT.decode(),
        "SERVER",
        True,
    )
    out = propagate(span, headers)
    assert (_get(out, b"x-b3-spanid"), _get(out, b"x-b3-parentspanid")) == (SPAN, PARENT)
    # No caller span (a client without a sidecar): a root SERVER span of its own.
    alone = start_span(IN, [])
    assert (alone.kind, alone.shared, alone.parent_id) == ("SERVER", False, None)


@pytest.mark.parametrize(
    ("b3", "ppm", "sampled"),
    [
        ({"sampled": b"0"}, 1_000_000, False),  # the caller's decision wins
        ({"sampled": b"1"}, 0, True),
        ({"sampled": b"true"}, 0, True),
        ({}, 0, False),  # no decision came: ours, from the percentage
        ({}, 1_000_000, True),
        ({"sampled": b"0", "flags": b"1"}, 0, True),  # debug always samples
    ],
)
def test_sampling_decision(b3: dict[str, bytes], ppm: int, sampled: bool) -> None:
    config = TracingConfig(outbound=True, sampling_ppm=ppm)
    span = start_span(config, _headers(traceid=TRACE, spanid=SPAN, **b3))
    assert span.sampled is sampled
    assert _get(propagate(span, []), b"x-b3-sampled") == (b"1" if sampled else b"0")


def test_forced_trace_and_sampling_percentage() -> None:
    never = TracingConfig(outbound=True, sampling_ppm=0)
    assert start_span(never, [(b"x-envoy-force-trace", b"true")]).sampled
    half = TracingConfig(outbound=True, sampling_ppm=500_000)
    sampled = sum(start_span(half, []).sampled for _ in range(2000))
    assert 800 < sampled < 1200


@pytest.mark.parametrize(
    "bad",
    [
        {"traceid": b"xyz", "spanid": SPAN},  # not hex
        {"traceid": b"463ac35c9f6413a", "spanid": SPAN},  # 15 digits
        {"traceid": TRACE + b"00", "spanid": SPAN},
    ],
)
def test_malformed_ids_start_a_fresh_trace(bad: dict[str, bytes]) -> None:
    span = start_span(OUT, _headers(**bad))
    assert span.parent_id is None
    assert span.trace_id not in (TRACE.decode(), bad["traceid"].decode(errors="replace"))


def test_zipkin_v2_json() -> None:
    span = start_span(IN, _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT), now_us=10)
    span.name = "reviews:9080/reviews/0"
    span.tags = {"http.status_code": "200"}
    assert zipkin_json(span, 1500, "reviews") == {
        "traceId": TRACE.decode(),
        "id": SPAN.decode(),
        "parentId": PARENT.decode(),
        "kind": "SERVER",
        "shared": True,
        "name": "reviews:9080/reviews/0",
        "timestamp": 10,
        "duration": 1500,
        "localEndpoint": {"serviceName": "reviews"},
        "tags": {"http.status_code": "200"},
    }


async def test_tracer_batches_spans_to_a_collector_and_survives_its_absence() -> None:
    received: list[Any] = []
    posted = asyncio.Event()

    async def spans(request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        received.extend(json.loads(await request.read()))
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/api/v2/spans", spans)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    targets = {"zipkin": ("127.0.0.1", port), "gone": ("127.0.0.1", free_port())}

    async def send(cluster: str, path: str, body: bytes) -> None:
        await post_json(*targets[cluster], path, body)
        posted.set()

    tracer = Tracer(send)
    try:
        for number in range(3):
            span = start_span(OUT, [])
            span.name = f"call-{number}"
            tracer.finish(OUT, span)
        tracer.finish(OUT, start_span(TracingConfig(outbound=True, sampling_ppm=0), []))
        await asyncio.wait_for(posted.wait(), 10)  # the background flush, within a second
        assert [s["name"] for s in received] == ["call-0", "call-1", "call-2"]
        assert tracer.sent == 3
        gone = TracingConfig(outbound=True, collector_cluster="gone")
        tracer.finish(gone, start_span(gone, []))
        await tracer.flush()
        assert (tracer.failed_batches, tracer.dropped) == (1, 1)
    finally:
        tracer.close()
        await runner.cleanup()
