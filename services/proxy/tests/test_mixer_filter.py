"""The proxy's Mixer filter against a real `mixs server`: an inbound listener with Pilot's
`istio.mixer` metadata checks every request (a denial answered by the proxy, the app never
reached) and reports it; a listener without Mixer never calls it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from istio.proxy.config import (
    Cluster,
    ClusterType,
    Endpoint,
    HttpManager,
    Listener,
    MixerFilter,
    PathKind,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.testing.net import free_port

BIN = Path(sys.executable).parent
PROXY_IP, APP_IP = "127.0.0.61", "127.0.0.62"
# 0.2's "deny without x-user" scenario, for the reviews destination only.
POLICY = """
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {name: handler, namespace: istio-system}
spec: {status: {code: 7, message: Not allowed}}
---
apiVersion: config.istio.io/v1alpha2
kind: checknothing
metadata: {name: denyrequest, namespace: istio-system}
spec: {}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: denyanonymous, namespace: istio-system}
spec:
  match: >-
    (request.headers["x-user"] | "") == ""
    && destination.service == "reviews.default.svc.cluster.local"
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
"""


@pytest.fixture
async def mixer(tmp_path: Path) -> AsyncIterator[str]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "policy.yaml").write_text(POLICY)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(BIN / "mixs"),
        "server",
        "--config-store",
        f"file://{config}",
        "--grpc-addr",
        f"127.0.0.1:{port}",
        "--monitoring-addr",
        f"127.0.0.1:{free_port()}",
        "--prometheus-addr",
        f"127.0.0.1:{free_port()}",
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = []
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        seen.append(line)
        assert line, b"".join(seen).decode()
        if b"config generation 1 in force" in line:
            break
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()


async def test_inbound_requests_are_checked_and_reported(mixer: str) -> None:
    hits: list[str] = []

    async def app(request: web.Request) -> web.Response:
        hits.append(request.headers.get("x-user", ""))
        return web.Response(text="reviews")

    application = web.Application()
    application.router.add_get("/{tail:.*}", app)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    app_port = free_port(APP_IP)
    await web.TCPSite(runner, APP_IP, app_port).start()
    route = Route(
        "all", RouteMatch(PathKind.PREFIX, "/"), RouteAction(clusters=(("app", 1),), total_weight=1)
    )
    table = RouteTable.build("t", (VirtualHost("in", ("*",), (route,)),))
    checked = MixerFilter(
        address=mixer,
        check=True,
        attributes={"destination.service": "reviews.default.svc.cluster.local"},
    )
    reviews_port, other_port = free_port(PROXY_IP), free_port(PROXY_IP)
    snapshot = Snapshot(
        listeners={
            "reviews": Listener(
                "reviews",
                PROXY_IP,
                reviews_port,
                True,
                False,
                HttpManager("inbound_reviews", routes=table),
                inbound=True,
                mixer=checked,
            ),
            "plain": Listener(
                "plain", PROXY_IP, other_port, True, False, HttpManager("plain", routes=table)
            ),
        },
        clusters={
            "app": Cluster("app", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, app_port),))
        },
    )
    context = Context()
    listeners = ListenerManager(context, PROXY_IP)
    context.apply(snapshot)
    await listeners.apply(snapshot)
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://{PROXY_IP}:{reviews_port}/reviews/1"
            async with session.get(base) as denied:
                assert denied.status == 403
                assert "Not allowed" in await denied.text()
            async with session.get(base, headers={"x-user": "jason"}) as allowed:
                assert allowed.status == 200
                assert await allowed.text() == "reviews"
            # A listener without Mixer metadata: no check at all.
            async with session.get(f"http://{PROXY_IP}:{other_port}/x") as plain:
                assert plain.status == 200
        assert hits == ["jason", ""]  # the denied request never reached the app
        (client,) = context.mixers.clients.values()
        assert client.stats.check_calls >= 1
        await client.flush()  # the two reports, batched, reach Mixer and are accepted
        assert (client.stats.reports_sent, client.stats.report_records) == (1, 2)
        assert client.stats.report_failures == 0
        assert client.stats.transport_failures == 0
    finally:
        await listeners.close()
        if context.mixers is not None:
            await context.mixers.close()
        await runner.cleanup()


def _listener_with(mixer: dict[str, object]) -> object:
    from envoy.config.listener.v3 import listener_pb2
    from google.protobuf import struct_pb2

    resource = listener_pb2.Listener(name="10.0.0.1_9080")
    resource.address.socket_address.address = "10.0.0.1"
    resource.address.socket_address.port_value = 9080
    fields = struct_pb2.Struct()
    fields.update({"mixer": mixer})
    resource.metadata.filter_metadata["istio"].CopyFrom(fields)
    return resource


def test_pilots_mixer_metadata_compiles_to_the_filter() -> None:
    from istio.proxy import compile
    from istio.proxy.xds import from_protobuf

    found = compile.listener(
        from_protobuf(
            _listener_with(
                {
                    "address": "istio-mixer.istio-system:9091",
                    "disable_policy_checks": True,
                    "attributes": {
                        "destination.service": "reviews.default.svc.cluster.local",
                        "destination.port": 9080,
                        "destination.labels": {"version": "v2"},
                        "destination.user": "",
                    },
                }
            )
        )
    )
    assert found.mixer == MixerFilter(
        address="istio-mixer.istio-system:9091",
        check=False,
        attributes={
            "destination.service": "reviews.default.svc.cluster.local",
            "destination.port": 9080,
            "destination.labels": {"version": "v2"},
        },
    )
    assert compile.listener(from_protobuf(_listener_with({"address": ""}))).mixer is None
    with pytest.raises(compile.CompileError, match="mixer address 'mixer' is not host:port"):
        compile.listener(from_protobuf(_listener_with({"address": "mixer"})))
