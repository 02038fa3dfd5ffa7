"""istio.mixerclient against the real Mixer server over a grpc.aio transport: the Check cache
keyed by referenced attributes (valid duration and use count honoured), quota prefetch,
fail-open and fail-closed, and batched, delta-encoded Reports."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from istio.mixer.adapters.prometheus import text_format
from istio.mixerclient.client import ClientOptions, MixerClient


class GrpcTransport:
    """The client's transport over a grpc.aio channel (serialized messages, unchanged)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._check = channel.unary_unary("/istio.mixer.v1.Mixer/Check")
        self._report = channel.unary_unary("/istio.mixer.v1.Mixer/Report")
        self.checks = 0
        self.reports = 0
        self.reported = asyncio.Event()

    async def check(self, request: bytes) -> bytes:
        self.checks += 1
        reply: bytes = await self._check(request, timeout=5)
        return reply

    async def report(self, request: bytes) -> bytes:
        self.reports += 1
        reply: bytes = await self._report(request, timeout=5)
        self.reported.set()
        return reply


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = """
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {name: handler, namespace: istio-system}
spec: {status: {code: 7, message: Not allowed}, validDuration: 5s, validUseCount: 3}
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
  match: request.headers["x-user"] == ""
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
"""

QUOTA = """
---
apiVersion: config.istio.io/v1alpha2
kind: memquota
metadata: {name: handler, namespace: istio-system}
spec:
  quotas: [{name: requestcount.quota.istio-system, maxAmount: 5, validDuration: 60s}]
---
apiVersion: config.istio.io/v1alpha2
kind: quota
metadata: {name: requestcount, namespace: istio-system}
spec:
  dimensions: {destination: destination.service | "unknown"}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  actions: [{handler: handler.memquota, instances: [requestcount.quota]}]
"""


async def test_check_cache_keyed_by_referenced_attributes(mixer: Any) -> None:
    running = await mixer()
    await running.apply("policy.yaml", POLICY)
    transport = GrpcTransport(running.channel)
    clock = Clock()
    client = MixerClient(transport, clock=clock)
    anonymous = {"request.headers": {"accept": "*/*"}, "request.path": "/a"}
    answers = [await client.check({**anonymous, "request.path": f"/{i}"}) for i in range(3)]
    # One call: the answer depends on the x-user header only, not on the path.
    assert [(a.status_code, a.cached) for a in answers] == [(7, False), (7, True), (7, True)]
    assert transport.checks == 1
    # Its use count (3) is spent: the next one asks again.
    assert (await client.check(anonymous)).cached is False
    assert transport.checks == 2
    jason = {"request.headers": {"x-user": "jason"}, "request.path": "/a"}
    assert (await client.check(jason)).ok
    assert (await client.check({**jason, "request.path": "/b"})).cached
    assert (await client.check({"request.headers": {"x-user": "other"}})).cached is False
    assert transport.checks == 4
    # Past its valid duration (capped at 5 s by the denier), an answer is asked again.
    clock.now += 5.1
    assert (await client.check(anonymous)).cached is False
    assert transport.checks == 5


async def test_quota_prefetch(mixer: Any) -> None:
    running = await mixer()
    await running.apply("policy.yaml", POLICY + QUOTA)
    transport = GrpcTransport(running.channel)
    client = MixerClient(transport, clock=Clock())
    bag = {"request.headers": {"x-user": "j"}, "destination.service": "ratings"}
    answers = [await client.check(bag, {"RequestCount": 1}) for _ in range(8)]
    assert [a.status_code for a in answers] == [0] * 5 + [8] * 3
    assert answers[-1].message == "quota RequestCount exhausted"
    # Prefetch asked for what recent requests used, best effort: fewer calls than requests.
    assert transport.checks < 8
    assert client.stats.quota_pool_hits >= 1
    # Without prefetch, every request asks Mixer exactly.
    other = {**bag, "destination.service": "reviews"}
    exact = MixerClient(GrpcTransport(running.channel), ClientOptions(quota_prefetch=False))
    answers = [await exact.check(other, {"RequestCount": 1}) for _ in range(6)]
    assert [a.status_code for a in answers] == [0] * 5 + [8]
    assert exact.stats.check_calls == 6


class Broken:
    async def check(self, request: bytes) -> bytes:
        raise ConnectionError("no route to Mixer")

    async def report(self, request: bytes) -> bytes:
        raise ConnectionError("no route to Mixer")


async def test_fail_open_and_fail_closed() -> None:
    assert (await MixerClient(Broken()).check({"request.path": "/"})).ok
    closed = MixerClient(Broken(), ClientOptions(fail_open=False))
    answer = await closed.check({"request.path": "/"})
    assert (answer.status_code, answer.message) == (14, "Mixer is unavailable: no route to Mixer")
    assert closed.check_cache.entries == {}
    closed.report({"request.path": "/"})
    await closed.flush()
    assert closed.stats.report_failures == 1


TELEMETRY = """
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {name: requestcount, namespace: istio-system}
spec:
  value: "1"
  dimensions: {code: response.code | 0, path: request.path | ""}
---
apiVersion: config.istio.io/v1alpha2
kind: prometheus
metadata: {name: handler, namespace: istio-system}
spec:
  metrics:
  - name: request_count
    instance_name: requestcount.metric.istio-system
    kind: COUNTER
    label_names: [code, path]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: prom, namespace: istio-system}
spec:
  actions: [{handler: handler.prometheus, instances: [requestcount.metric]}]
"""


async def test_reports_are_batched(mixer: Any) -> None:
    running = await mixer()
    await running.apply("telemetry.yaml", TELEMETRY)
    transport = GrpcTransport(running.channel)
    client = MixerClient(
        transport, ClientOptions(report_batch_entries=1000, report_batch_interval=0.2)
    )
    for i in range(2500):
        bag: dict[str, Any] = {"response.code": 200 if i % 10 else 503, "request.path": "/r"}
        if i == 1700:
            bag = {"response.code": 200}  # drops request.path: a new request starts there
        client.report(bag)
    await client.flush()
    # Two full batches as soon as they filled, the rest on flush; the dropped attribute
    # split one of them in two.
    assert client.stats.report_records == 2500
    assert transport.reports == 4
    text = text_format(running.server.runtime.prometheus_registry).decode()
    assert 'request_count{code="200",path="/r"} 2250.0' in text
    assert 'request_count{code="503",path="/r"} 249.0' in text
    assert 'request_count{code="200",path=""} 1.0' in text
    # A lone record goes out after the batch interval, without a flush.
    transport.reported.clear()
    client.report({"response.code": 201, "request.path": "/late"})
    await asyncio.wait_for(transport.reported.wait(), 5)
    await client.flush()  # waits for the Report in flight
    assert client.stats.report_records == 2501
    text = text_format(running.server.runtime.prometheus_registry).decode()
    assert 'request_count{code="201",path="/late"} 1.0' in text
