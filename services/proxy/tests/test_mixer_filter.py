"""The proxy's Mixer filter against a real `mixs server`: an inbound listener with Pilot's
`istio.mixer` metadata checks every request (a denial answered by the proxy, the app never
reached) and reports it; a listener without Mixer never calls it; requests a bound QuotaSpec
charges are answered 429 once Mixer's memquota grants no more."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from istio.proxy.config import (
    AttributeMatch,
    Cluster,
    ClusterType,
    Endpoint,
    HttpManager,
    Listener,
    MixerFilter,
    PathKind,
    QuotaRule,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    Snapshot,
    VirtualHost,
)
from istio.proxy.context import Context
from istio.proxy.listeners import ListenerManager
from istio.testing.mixer import serve
from istio.testing.net import free_port

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
# 0.2's rate limit sample, for ratings: 3 requests a minute (a window no test outlasts, so the
# count is exact). The proxy charges `requestcount` where a QuotaSpec says so.
QUOTA = """
apiVersion: config.istio.io/v1alpha2
kind: memquota
metadata: {name: handler, namespace: istio-system}
spec:
  quotas:
  - name: requestcount.quota.istio-system
    maxAmount: 5000
    validDuration: 1s
    overrides:
    - dimensions: {destination: ratings.default.svc.cluster.local}
      maxAmount: 3
      validDuration: 60s
---
apiVersion: config.istio.io/v1alpha2
kind: quota
metadata: {name: requestcount, namespace: istio-system}
spec:
  dimensions:
    destination: destination.service | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  actions:
  - handler: handler.memquota
    instances: [requestcount.quota]
"""


@pytest.fixture
async def mixer(tmp_path: Path) -> AsyncIterator[str]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "policy.yaml").write_text(POLICY)
    (config / "quota.yaml").write_text(QUOTA)
    async with serve(config) as running:
        yield running.address


ALL_TO_APP = RouteTable.build(
    "t",
    (
        VirtualHost(
            "in",
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


async def start_app(
    handler: Callable[[web.Request], Awaitable[web.Response]],
) -> tuple[web.AppRunner, int]:
    """The app behind the sidecar: `handler` for every GET, on APP_IP (runner, port)."""
    application = web.Application()
    application.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    port = free_port(APP_IP)
    await web.TCPSite(runner, APP_IP, port).start()
    return runner, port


def inbound(name: str, port: int, app_port: int, mixer: MixerFilter) -> Snapshot:
    """One inbound HTTP listener with `mixer`, routing everything to the app."""
    return Snapshot(
        listeners={
            name: Listener(
                name,
                PROXY_IP,
                port,
                True,
                False,
                HttpManager(f"inbound_{name}", routes=ALL_TO_APP),
                inbound=True,
                mixer=mixer,
            )
        },
        clusters={
            "app": Cluster("app", ClusterType.STATIC, endpoints=(Endpoint(APP_IP, app_port),))
        },
    )


async def test_inbound_requests_are_checked_and_reported(mixer: str) -> None:
    hits: list[str] = []

    async def app(request: web.Request) -> web.Response:
        hits.append(request.headers.get("x-user", ""))
        return web.Response(text="reviews")

    runner, app_port = await start_app(app)
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
                HttpManager("inbound_reviews", routes=ALL_TO_APP),
                inbound=True,
                mixer=checked,
            ),
            "plain": Listener(
                "plain", PROXY_IP, other_port, True, False, HttpManager("plain", routes=ALL_TO_APP)
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
        # The client's counters are the proxy's stats, in both forms.
        text = context.stats.text()
        assert f"mixer.{mixer}.check_total: 2\n" in text
        assert f"mixer.{mixer}.report_records: 2\n" in text
        assert (
            f'envoy_mixer_check_calls{{envoy_mixer_prefix="{mixer}"}} '
            in context.stats.prometheus()
        )
    finally:
        await listeners.close()
        if context.mixers is not None:
            await context.mixers.close()
        await runner.cleanup()


async def test_with_policy_checks_off_requests_are_reported_not_checked(mixer: str) -> None:
    """0.2's disablePolicyChecks: the request Mixer would deny goes on, and is reported."""

    async def app(request: web.Request) -> web.Response:
        return web.Response(text="reviews")

    runner, app_port = await start_app(app)
    unchecked = MixerFilter(
        address=mixer,
        check=False,
        attributes={"destination.service": "reviews.default.svc.cluster.local"},
    )
    port = free_port(PROXY_IP)
    snapshot = inbound("reviews", port, app_port, unchecked)
    context = Context()
    listeners = ListenerManager(context, PROXY_IP)
    context.apply(snapshot)
    await listeners.apply(snapshot)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{PROXY_IP}:{port}/reviews/1") as answer,
        ):
            assert answer.status == 200  # no x-user: the deny rule would have said 403
        (client,) = context.mixers.clients.values()
        await client.flush()
        assert (client.stats.check_calls, client.stats.report_records) == (0, 1)
        assert client.stats.report_failures == 0
    finally:
        await listeners.close()
        if context.mixers is not None:
            await context.mixers.close()
        await runner.cleanup()


async def test_quotas_a_spec_charges_are_answered_429_when_not_granted(mixer: str) -> None:
    hits: list[str] = []

    async def app(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="ratings")

    runner, app_port = await start_app(app)
    # A QuotaSpec rule charging requests under /ratings only.
    charged = QuotaRule(
        match=((AttributeMatch("request.path", prefix="/ratings"),),),
        quotas=(("requestcount", 1),),
    )
    ratings = MixerFilter(
        address=mixer,
        check=True,
        attributes={"destination.service": "ratings.default.svc.cluster.local"},
        quotas=(charged,),
    )
    port = free_port(PROXY_IP)

    def snapshot(mixer: MixerFilter) -> Snapshot:
        return inbound("ratings", port, app_port, mixer)

    context = Context()
    listeners = ListenerManager(context, PROXY_IP)
    before = snapshot(dataclasses.replace(ratings, quotas=()))
    context.apply(before)
    await listeners.apply(before)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{PROXY_IP}:{port}/ratings/0") as uncharged:
                assert uncharged.status == 200
            # The spec arrives (an LDS update) while the client's connection stays open: its
            # next requests are charged all the same.
            context.apply(snapshot(ratings))
            await listeners.apply(context.snapshot)
            statuses = []
            for _ in range(6):
                async with session.get(f"http://{PROXY_IP}:{port}/ratings/0") as answer:
                    statuses.append(answer.status)
                    body = await answer.text()
            # The client prefetches (asks for what the last second used, best effort) but
            # never gets more than memquota's 3: exactly three go through.
            assert statuses == [200, 200, 200, 429, 429, 429]
            assert "quota requestcount exhausted" in body
            async with session.get(f"http://{PROXY_IP}:{port}/health") as free:
                assert free.status == 200  # no rule charges it: no quota asked
            assert len(listeners.bound["ratings"].connections) == 1  # one kept alive
        assert hits == ["/ratings/0"] * 4 + ["/health"]
        (client,) = context.mixers.clients.values()
        assert client.stats.transport_failures == 0
    finally:
        await listeners.close()
        if context.mixers is not None:
            await context.mixers.close()
        await runner.cleanup()


def test_quota_rules_apply_by_their_clauses() -> None:
    from istio.proxy.mixer import charged_quotas

    rules = (
        QuotaRule(match=(), quotas=(("requestcount", 1),)),
        QuotaRule(
            match=(
                (AttributeMatch("request.path", exact="/buy"),),
                (
                    AttributeMatch("request.method", exact="POST"),
                    AttributeMatch("request.path", regex=re.compile("/ratings/[0-9]+")),
                ),
            ),
            quotas=(("requestcount", 2), ("writes", 1)),
        ),
    )
    filter_ = MixerFilter(address="mixer:9091", check=True, attributes={}, quotas=rules)
    get = {"request.path": "/ratings/7", "request.method": "GET"}
    assert charged_quotas(filter_, get) == {"requestcount": 1}
    assert charged_quotas(filter_, {**get, "request.method": "POST"}) == {
        "requestcount": 3,
        "writes": 1,
    }
    assert charged_quotas(filter_, {"request.path": "/buy"}) == {"requestcount": 3, "writes": 1}
    # The regex is a whole-value match; an absent attribute matches no clause.
    assert charged_quotas(filter_, {"request.path": "/ratings/7/x", "request.method": "POST"}) == {
        "requestcount": 1
    }
    assert charged_quotas(filter_, {"request.method": "POST"}) == {"requestcount": 1}


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


def test_pilots_quota_specs_compile_to_rules() -> None:
    from istio.proxy import compile
    from istio.proxy.xds import from_protobuf

    spec = {
        "rules": [
            {"quotas": [{"quota": "requestcount", "charge": "1"}]},
            {
                "match": [{"clause": {"request.path": {"regex": "/ratings/.*"}}}],
                "quotas": [{"quota": "writes", "charge": 2}],
            },
        ]
    }
    found = compile.listener(
        from_protobuf(_listener_with({"address": "mixer:9091", "quota_specs": [spec]}))
    )
    assert found.mixer is not None
    always, ratings = found.mixer.quotas
    assert always == QuotaRule(match=(), quotas=(("requestcount", 1),))
    ((clause,),) = ratings.match
    assert clause.attribute == "request.path"
    assert clause.regex is not None
    assert clause.matches("/ratings/1")
    assert not clause.matches("/reviews/1")
    assert ratings.quotas == (("writes", 2),)
    bad = {"rules": [{"match": [{"clause": {"request.path": {"regex": "("}}}]}]}
    with pytest.raises(compile.CompileError, match=r"quota_specs\[0\].rules\[0\].match\[0\]"):
        compile.listener(
            from_protobuf(_listener_with({"address": "mixer:9091", "quota_specs": [bad]}))
        )
    free = {"rules": [{"quotas": [{"quota": "requestcount", "charge": "0"}]}]}
    with pytest.raises(compile.CompileError, match="needs a quota name and a positive charge"):
        compile.listener(
            from_protobuf(_listener_with({"address": "mixer:9091", "quota_specs": [free]}))
        )
