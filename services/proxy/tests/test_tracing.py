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

OUT = TracingConfig(collector_cluster="zipkin")
IN = TracingConfig(collector_cluster="zipkin")
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
    span = start_span(OUT, [(b"host", b"x")], outbound=True)
    assert (len(span.trace_id), len(span.id), span.parent_id) == (16, 16, None)
    assert (span.kind, span.shared, span.sampled) == ("CLIENT", False, True)
    out = propagate(span, [(b"host", b"x")])
    assert _get(out, b"x-b3-traceid") == span.trace_id.encode()
    assert _get(out, b"x-b3-spanid") == span.id.encode()
    assert _get(out, b"x-b3-parentspanid") is None
    assert _get(out, b"x-b3-sampled") == b"1"
    assert _get(out, b"x-ot-span-context") == f"{span.trace_id};{span.id};;cs".encode()
    wide = start_span(TracingConfig(trace_id_128bit=True), [], outbound=True)
    assert len(wide.trace_id) == 32


def test_outbound_makes_a_client_span_under_the_callers_span() -> None:
    span = start_span(
        OUT, _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT, sampled=b"1"), outbound=True
    )
    assert (span.trace_id, span.parent_id, span.kind) == (TRACE.decode(), SPAN.decode(), "CLIENT")
    assert span.id != SPAN.decode()
    out = propagate(span, _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT, sampled=b"1"))
    # The caller's B3 headers are replaced, whatever their case, never duplicated.
    assert not [k for k, _ in out if k.lower().startswith(b"x-b3") and k != k.lower()]
    assert _get(out, b"x-b3-spanid") == span.id.encode()
    assert _get(out, b"x-b3-parentspanid") == SPAN


def test_inbound_shares_the_client_span_and_passes_the_headers_on() -> None:
    headers = _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT, sampled=b"1")
    span = start_span(IN, headers, outbound=False)
    assert (span.id, span.parent_id, span.kind, span.shared) == (
        SPAN.decode(),
        PARENT.decode(),
        "SERVER",
        True,
    )
    out = propagate(span, headers)
    assert (_get(out, b"x-b3-spanid"), _get(out, b"x-b3-parentspanid")) == (SPAN, PARENT)
    # No caller span (a client without a sidecar): a root SERVER span of its own.
    alone = start_span(IN, [], outbound=False)
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
    config = TracingConfig(sampling_ppm=ppm)
    span = start_span(config, _headers(traceid=TRACE, spanid=SPAN, **b3), outbound=True)
    assert span.sampled is sampled
    assert _get(propagate(span, []), b"x-b3-sampled") == (b"1" if sampled else b"0")


def test_forced_trace_and_sampling_percentage() -> None:
    never = TracingConfig(sampling_ppm=0)
    assert start_span(never, [(b"x-envoy-force-trace", b"true")], outbound=True).sampled
    half = TracingConfig(sampling_ppm=500_000)
    sampled = sum(start_span(half, [], outbound=True).sampled for _ in range(2000))
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
    span = start_span(OUT, _headers(**bad), outbound=True)
    assert span.parent_id is None
    assert span.trace_id not in (TRACE.decode(), bad["traceid"].decode(errors="replace"))


def test_zipkin_v2_json() -> None:
    span = start_span(
        IN, _headers(traceid=TRACE, spanid=SPAN, parentspanid=PARENT), now_us=10, outbound=False
    )
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

    tracer = Tracer(send, "productpage")
    try:
        for number in range(3):
            span = start_span(OUT, [], outbound=True)
            span.name = f"call-{number}"
            tracer.finish(OUT, span)
        tracer.finish(OUT, start_span(TracingConfig(sampling_ppm=0), [], outbound=True))
        await asyncio.wait_for(posted.wait(), 10)  # the background flush, within a second
        assert [s["name"] for s in received] == ["call-0", "call-1", "call-2"]
        assert {s["localEndpoint"]["serviceName"] for s in received} == {"productpage"}
        assert tracer.sent == 3
        gone = TracingConfig(collector_cluster="gone")
        tracer.finish(gone, start_span(gone, [], outbound=True))
        await tracer.flush()
        assert (tracer.failed_batches, tracer.dropped) == (1, 1)
    finally:
        tracer.close()
        await runner.cleanup()


# Through the proxy: one outbound and one inbound listener with Zipkin tracing, an echo app,
# and a collector, all on loopback.

from istio.proxy.config import (  # noqa: E402
    Cluster,
    ClusterType,
    Endpoint,
    HttpManager,
    Listener,
    PathKind,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from istio.proxy.context import Context  # noqa: E402
from istio.proxy.listeners import ListenerManager  # noqa: E402

PROXY_IP = "127.0.0.41"


async def _serve(app: web.Application, host: str) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port(host)
    await web.TCPSite(runner, host, port).start()
    return runner, port


async def _request(port: int, headers: str = "") -> bytes:
    reader, writer = await asyncio.open_connection(PROXY_IP, port)
    writer.write(f"GET /reviews/1?u=2 HTTP/1.1\r\nHost: reviews:9080\r\n{headers}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    return body


async def test_the_proxy_propagates_b3_and_reports_client_and_shared_server_spans() -> None:
    spans: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def collect(request: web.Request) -> web.Response:
        spans.extend(json.loads(await request.read()))
        arrived.set()
        return web.Response(status=202)

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    collector_app = web.Application()
    collector_app.router.add_post("/api/v2/spans", collect)
    echo_app = web.Application()
    echo_app.router.add_get("/{tail:.*}", echo)
    collector, collector_port = await _serve(collector_app, "127.0.0.42")
    app, app_port = await _serve(echo_app, "127.0.0.43")
    tracing = TracingConfig(collector_cluster="zipkin")
    table = RouteTable.build(
        "t",
        (
            VirtualHost(
                "reviews",
                ("*",),
                (
                    Route(
                        "all",
                        RouteMatch(PathKind.PREFIX, "/"),
                        RouteAction(clusters=(("app", 1),), total_weight=1),
                    ),
                ),
            ),
        ),
    )
    out_port, in_port = free_port(PROXY_IP), free_port(PROXY_IP)
    snapshot = Snapshot(
        listeners={
            "out": Listener(
                "out",
                PROXY_IP,
                out_port,
                True,
                False,
                HttpManager("out", routes=table, tracing=tracing),
            ),
            "in": Listener(
                "in",
                PROXY_IP,
                in_port,
                True,
                False,
                HttpManager("in", routes=table, tracing=tracing),
                inbound=True,
            ),
        },
        clusters={
            "app": Cluster(
                "app", ClusterType.STATIC, endpoints=(Endpoint("127.0.0.43", app_port),)
            ),
            "zipkin": Cluster(
                "zipkin", ClusterType.STATIC, endpoints=(Endpoint("127.0.0.42", collector_port),)
            ),
        },
    )
    context = Context(service_name="productpage")
    listeners = ListenerManager(context, PROXY_IP)
    context.apply(snapshot)
    await listeners.apply(snapshot)
    try:
        # A new trace at the outbound listener: a CLIENT root span, its ids sent on.
        seen = json.loads(await _request(out_port))
        assert len(seen["x-b3-traceid"]) == 16
        assert "x-b3-parentspanid" not in seen
        assert seen["x-b3-sampled"] == "1"
        # What a caller's sidecar sent, arriving at an inbound listener: shared SERVER span.
        caller = f"x-b3-traceid: {TRACE.decode()}\r\nX-B3-SpanId: {SPAN.decode()}\r\n"
        inbound_seen = json.loads(await _request(in_port, caller))
        assert (inbound_seen["x-b3-traceid"], inbound_seen["x-b3-spanid"]) == (
            TRACE.decode(),
            SPAN.decode(),
        )
        await context.tracer.flush()
        await asyncio.wait_for(arrived.wait(), 10)
        client, server = sorted(spans, key=lambda s: s["kind"])
        assert client["kind"] == "CLIENT"
        assert "parentId" not in client
        assert (client["traceId"], client["id"]) == (seen["x-b3-traceid"], seen["x-b3-spanid"])
        assert client["name"] == "reviews:9080/reviews/1"
        assert client["tags"]["http.status_code"] == "200"
        assert client["tags"]["upstream_cluster"] == "app"
        assert client["tags"]["guid:x-request-id"] == seen["x-request-id"]
        assert client["localEndpoint"] == {"serviceName": "productpage"}
        assert (server["kind"], server["shared"]) == ("SERVER", True)
        assert (server["traceId"], server["id"]) == (TRACE.decode(), SPAN.decode())
    finally:
        context.tracer.close()
        await listeners.close()
        await app.cleanup()
        await collector.cleanup()


def _listener_with_tracing(tracing: Any) -> Any:
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm,
    )

    manager = hcm.HttpConnectionManager(stat_prefix="out", tracing=tracing)
    manager.rds.route_config_name = "80"
    manager.http_filters.add(name="envoy.filters.http.router")
    resource = listener_pb2.Listener(name="0.0.0.0_80")
    resource.address.socket_address.address = "0.0.0.0"
    resource.address.socket_address.port_value = 80
    network = resource.filter_chains.add().filters.add(name="envoy.filters.network.hcm")
    network.typed_config.Pack(manager)
    return resource


def test_compiled_from_the_connection_managers_zipkin_tracing() -> None:
    from envoy.config.trace.v3 import zipkin_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm,
    )

    from istio.proxy import compile
    from istio.proxy.xds import from_protobuf

    tracing = hcm.HttpConnectionManager.Tracing()
    tracing.random_sampling.value = 12.5
    tracing.provider.name = "envoy.tracers.zipkin"
    tracing.provider.typed_config.Pack(
        zipkin_pb2.ZipkinConfig(
            collector_cluster="outbound|9411||zipkin.istio-system.svc.cluster.local",
            collector_endpoint="/api/v2/spans",
            collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_JSON,
            trace_id_128bit=True,
        )
    )
    manager = compile.listener(from_protobuf(_listener_with_tracing(tracing))).chain
    assert isinstance(manager, HttpManager)
    assert manager.tracing == TracingConfig(
        sampling_ppm=125_000,
        collector_cluster="outbound|9411||zipkin.istio-system.svc.cluster.local",
        trace_id_128bit=True,
    )
    tracing.random_sampling.value = 101
    with pytest.raises(compile.CompileError, match="random_sampling 101"):
        compile.listener(from_protobuf(_listener_with_tracing(tracing)))
    tracing.random_sampling.value = 1
    tracing.provider.typed_config.Pack(
        zipkin_pb2.ZipkinConfig(
            collector_cluster="z", collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_PROTO
        )
    )
    with pytest.raises(compile.CompileError, match="HTTP_JSON"):
        compile.listener(from_protobuf(_listener_with_tracing(tracing)))
    tracing.provider.typed_config.Pack(hcm.HttpConnectionManager())
    with pytest.raises(compile.CompileError, match="unsupported tracer"):
        compile.listener(from_protobuf(_listener_with_tracing(tracing)))


class _Mixers:
    """Stands in for the proxy's Mixer clients: answers every Check with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code

    def client(self, address: str) -> _Mixers:
        return self

    async def check(self, bag: Any, quotas: Any = None) -> Any:
        from istio.mixerclient.client import CheckAnswer

        return CheckAnswer(self.code, "denied by a rule" if self.code else "")

    def report(self, bag: Any) -> None:
        pass


@pytest.mark.parametrize("code", [0, 7])
async def test_the_mixer_check_is_a_child_span_of_the_request(code: int) -> None:
    from istio.proxy.config import MixerFilter

    spans: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def collect(request: web.Request) -> web.Response:
        spans.extend(json.loads(await request.read()))
        arrived.set()
        return web.Response(status=202)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="app")

    collector_app = web.Application()
    collector_app.router.add_post("/api/v2/spans", collect)
    app_app = web.Application()
    app_app.router.add_get("/{tail:.*}", ok)
    collector, collector_port = await _serve(collector_app, "127.0.0.42")
    app, app_port = await _serve(app_app, "127.0.0.43")
    route = Route("all", RouteMatch(PathKind.PREFIX, "/"), RouteAction((("app", 1),), 1))
    table = RouteTable.build("t", (VirtualHost("reviews", ("*",), (route,)),))
    in_port = free_port(PROXY_IP)
    manager = HttpManager("in", routes=table, tracing=TracingConfig(collector_cluster="zipkin"))
    snapshot = Snapshot(
        listeners={
            "in": Listener(
                "in",
                PROXY_IP,
                in_port,
                True,
                False,
                manager,
                inbound=True,
                mixer=MixerFilter("mixer:9091", True, {}),
            )
        },
        clusters={
            "app": Cluster(
                "app", ClusterType.STATIC, endpoints=(Endpoint("127.0.0.43", app_port),)
            ),
            "zipkin": Cluster(
                "zipkin", ClusterType.STATIC, endpoints=(Endpoint("127.0.0.42", collector_port),)
            ),
        },
    )
    context = Context(service_name="reviews")
    context.mixers = _Mixers(code)
    listeners = ListenerManager(context, PROXY_IP)
    context.apply(snapshot)
    await listeners.apply(snapshot)
    try:
        caller = f"x-b3-traceid: {TRACE.decode()}\r\nx-b3-spanid: {SPAN.decode()}\r\n"
        answer = await _request(in_port, caller)
        assert answer == (b"app" if code == 0 else b"denied by a rule\n")
        await context.tracer.flush()
        await asyncio.wait_for(arrived.wait(), 10)
        server, check = sorted(spans, key=lambda s: s["kind"] == "CLIENT")
        assert (server["kind"], server["id"]) == ("SERVER", SPAN.decode())
        assert server["tags"]["http.status_code"] == ("200" if code == 0 else "403")
        assert check["name"] == "mixer check"
        assert (check["kind"], check["traceId"]) == ("CLIENT", TRACE.decode())
        assert check["parentId"] == server["id"]
        assert check["tags"]["mixer.status_code"] == str(code)
        assert ("error" in check["tags"]) == bool(code)
    finally:
        context.tracer.close()
        await listeners.close()
        await app.cleanup()
        await collector.cleanup()
