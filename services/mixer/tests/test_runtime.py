"""Check and Report dispatch in-process: rule selection, the built-in check and quota adapters,
referenced attributes, failing and hanging adapters, and config changes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from istio.expr import Reference
from istio.mixer.adapters.prometheus import text_format
from istio.mixer.runtime import QuotaRequest
from istio.mixersdk import (
    AdapterInfo,
    CheckNothingInstance,
    CheckResult,
    Env,
    MetricInstance,
    QuotaArgs,
    QuotaInstance,
    QuotaResult,
)

DENY_WITHOUT_USER = """
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
  match: request.headers["x-user"] == ""
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
"""


async def test_denial_by_header(harness: Any) -> None:
    assert await harness.load(DENY_WITHOUT_USER) == []
    denied = await harness.runtime.check({"request.headers": {"host": "x"}})
    assert (denied.status_code, denied.message) == (
        7,
        "handler.denier.istio-system:Not allowed",
    )
    assert denied.valid_duration == timedelta(seconds=5)
    assert denied.references == (Reference("request.headers", "x-user", False),)
    allowed = await harness.runtime.check({"request.headers": {"x-user": "jason"}})
    assert allowed.status_code == 0
    assert allowed.references == (Reference("request.headers", "x-user", True),)


def _namespaced(namespace: str, name: str, match: str = "") -> str:
    return f"""
---
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {{name: {name}, namespace: {namespace}}}
spec: {{status: {{code: 7, message: {name}}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: checknothing
metadata: {{name: {name}, namespace: {namespace}}}
spec: {{}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  match: '{match or "true"}'
  actions:
  - handler: {name}.denier
    instances: [{name}.checknothing]
"""


async def test_rules_apply_by_destination_namespace_and_protocol(harness: Any) -> None:
    config = _namespaced("default", "indefault", 'request.path == "/deny"') + _namespaced(
        "default", "tcponly", 'context.protocol == "tcp" && destination.port == 27017'
    )
    assert await harness.load(config) == []
    check = harness.runtime.check
    in_default = {
        "destination.service": "ratings.default.svc.cluster.local",
        "request.path": "/deny",
    }
    assert (await check(in_default)).message.endswith(":indefault")
    in_prod = {"destination.service": "ratings.prod.svc.cluster.local", "request.path": "/deny"}
    assert (await check(in_prod)).status_code == 0
    by_namespace = {"destination.namespace": "default", "request.path": "/deny"}
    assert (await check(by_namespace)).status_code == 7
    tcp = {"destination.namespace": "default", "context.protocol": "tcp", "destination.port": 27017}
    assert (await check(tcp)).message.endswith(":tcponly")
    # HTTP rules do not see TCP requests and TCP rules do not see HTTP ones.
    assert (await check({**tcp, "request.path": "/deny", "destination.port": 1})).status_code == 0
    assert (
        await check({**in_default, "request.path": "/", "destination.port": 27017})
    ).status_code == 0


async def test_default_namespace_rules_apply_everywhere(harness: Any) -> None:
    assert await harness.load(_namespaced("istio-system", "everywhere")) == []
    for service in ("a.default.svc.cluster.local", "b.prod.svc.cluster.local", "external.com"):
        outcome = await harness.runtime.check({"destination.service": service})
        assert outcome.message == "everywhere.denier.istio-system:everywhere"


WHITELIST = """
apiVersion: config.istio.io/v1alpha2
kind: listchecker
metadata: {name: versions, namespace: istio-system}
spec: {overrides: [v1, v2], blacklist: false}
---
apiVersion: config.istio.io/v1alpha2
kind: listentry
metadata: {name: version, namespace: istio-system}
spec: {value: 'source.labels["version"]'}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: checkversion, namespace: istio-system}
spec:
  match: destination.labels["app"] == "ratings"
  actions:
  - handler: versions.listchecker
    instances: [version.listentry]
"""


async def test_whitelist_of_source_versions(harness: Any) -> None:
    assert await harness.load(WHITELIST) == []
    ratings = {"destination.labels": {"app": "ratings"}}
    allowed = await harness.runtime.check({**ratings, "source.labels": {"version": "v2"}})
    assert allowed.status_code == 0
    denied = await harness.runtime.check({**ratings, "source.labels": {"version": "v3"}})
    assert (denied.status_code, denied.message) == (
        5,
        "versions.listchecker.istio-system:v3 is not whitelisted",
    )
    other = await harness.runtime.check({"destination.labels": {"app": "details"}})
    assert other.status_code == 0
    # The instance cannot be built without source.labels: the check fails, uncached.
    broken = await harness.runtime.check(ratings)
    assert broken.status_code == 13
    assert broken.valid_use_count == 1


QUOTA = """
apiVersion: config.istio.io/v1alpha2
kind: memquota
metadata: {name: handler, namespace: istio-system}
spec:
  quotas:
  - name: requestcount.quota.istio-system
    maxAmount: 3
    validDuration: 60s
    overrides:
    - {dimensions: {destination: reviews}, maxAmount: 1}
---
apiVersion: config.istio.io/v1alpha2
kind: quota
metadata: {name: requestcount, namespace: istio-system}
spec:
  dimensions: {destination: 'destination.labels["app"] | "unknown"'}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  actions:
  - handler: handler.memquota
    instances: [requestcount.quota]
"""


async def test_quota_in_check(harness: Any) -> None:
    assert await harness.load(QUOTA) == []
    ask = {"RequestCount": QuotaRequest(1)}
    ratings = {"destination.labels": {"app": "ratings"}}
    granted = []
    for _ in range(4):
        outcome = await harness.runtime.check(ratings, ask)
        granted.append(outcome.quotas["RequestCount"].granted)
    assert granted == [1, 1, 1, 0]
    assert outcome.quotas["RequestCount"].valid_duration == timedelta(seconds=60)
    # The override's bucket, and a retried call (same deduplication id) charged once.
    reviews = {"destination.labels": {"app": "reviews"}}
    first = await harness.runtime.check(reviews, ask, "call-1")
    retry = await harness.runtime.check(reviews, ask, "call-1")
    other = await harness.runtime.check(reviews, ask, "call-2")
    assert [o.quotas["RequestCount"].granted for o in (first, retry, other)] == [1, 1, 0]
    # A quota nothing limits is granted.
    free = await harness.runtime.check(ratings, {"Other": QuotaRequest(5)})
    assert free.quotas["Other"].granted == 5


class Recorder:
    """A test adapter's handler: records calls; may raise or hang."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.metrics: list[MetricInstance] = []
        self.checks = 0
        self.closed = False
        self.release = asyncio.Event()
        self.called = asyncio.Event()
        self.closing = asyncio.Event()

    def handle_check_nothing(self, instance: CheckNothingInstance) -> Any:
        self.checks += 1
        self.called.set()
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "hang":
            return asyncio.Event().wait()
        if self.mode == "slow":
            return self._slow()
        return CheckResult()

    async def _slow(self) -> CheckResult:
        await self.release.wait()
        return CheckResult()

    def handle_metric(self, instances: Sequence[MetricInstance]) -> Any:
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "hang":
            return asyncio.Event().wait()
        self.metrics.extend(instances)
        return None

    async def close(self) -> None:
        self.closed = True
        self.closing.set()


def recorder_adapter(name: str, handlers: dict[str, Recorder]) -> AdapterInfo:
    async def build(params: dict[str, Any], env: Env) -> Recorder:
        handler = handlers[env.handler] = Recorder(name)
        return handler

    return AdapterInfo(name, "test", build, frozenset({"checknothing", "metric"}))


def _recorders_config(names: Sequence[str]) -> str:
    documents = [
        "apiVersion: config.istio.io/v1alpha2\nkind: checknothing\n"
        "metadata: {name: c, namespace: istio-system}\nspec: {}",
        "apiVersion: config.istio.io/v1alpha2\nkind: metric\n"
        'metadata: {name: m, namespace: istio-system}\nspec: {value: "1"}',
    ]
    for name in names:
        documents.append(
            f"apiVersion: config.istio.io/v1alpha2\nkind: {name}\n"
            f"metadata: {{name: h, namespace: istio-system}}\nspec: {{}}"
        )
        documents.append(
            f"apiVersion: config.istio.io/v1alpha2\nkind: rule\n"
            f"metadata: {{name: {name}, namespace: istio-system}}\n"
            f"spec: {{actions: [{{handler: h.{name}, instances: [c.checknothing, m.metric]}}]}}"
        )
    return "\n---\n".join(documents)


async def test_a_raising_or_hanging_handler_does_not_block_the_others(harness: Any) -> None:
    handlers: dict[str, Recorder] = {}
    for mode in ("ok", "raise", "hang"):
        harness.adapters[mode] = recorder_adapter(mode, handlers)
    assert await harness.load(_recorders_config(["hang", "ok", "raise"])) == []
    outcome = await asyncio.wait_for(harness.runtime.check({}), 5)
    assert outcome.status_code == 14
    assert outcome.message.startswith("h.hang.istio-system:handler h.hang.istio-system: no answer")
    assert outcome.valid_duration == timedelta(0)
    assert handlers["h.ok.istio-system"].checks == 1
    await asyncio.wait_for(harness.runtime.report([{}, {}]), 5)
    assert len(handlers["h.ok.istio-system"].metrics) == 2
    errors = generate_latest(harness.runtime.metrics.registry).decode()
    assert (
        'mixer_dispatch_errors_total{handler="h.hang.istio-system",reason="timeout"} 2.0' in errors
    )
    assert (
        'mixer_dispatch_errors_total{handler="h.raise.istio-system",reason="error"} 2.0' in errors
    )


async def test_reload_keeps_unchanged_handlers_and_refuses_bad_config(harness: Any) -> None:
    assert await harness.load(QUOTA) == []
    ask = {"RequestCount": QuotaRequest(1)}
    bag = {"destination.labels": {"app": "ratings"}}
    for _ in range(3):
        await harness.runtime.check(bag, ask)
    handler = harness.runtime.active.handlers["handler.memquota.istio-system"]
    # Another rule added: the memquota handler (same params) and its counts stay.
    assert await harness.load(QUOTA + _namespaced("default", "other", "false")) == []
    assert harness.runtime.active.handlers["handler.memquota.istio-system"] is handler
    assert (await harness.runtime.check(bag, ask)).quotas["RequestCount"].granted == 0
    # A broken change is refused whole; the generation in force stays.
    generation = harness.runtime.active.generation
    broken = QUOTA.replace("""'destination.labels["app"] | "unknown"'""", "destination.lables")
    problems = await harness.load(broken)
    assert problems == [
        "quota istio-system/requestcount: spec.dimensions.destination: 'destination.lables': "
        "column 1: unknown attribute destination.lables; did you mean destination.labels?"
    ]
    assert harness.runtime.active.generation == generation
    exposition = generate_latest(harness.runtime.metrics.registry).decode()
    assert "mixer_config_rejected 1.0" in exposition
    assert 'mixer_config_loads_total{result="rejected"} 1.0' in exposition


async def test_handlers_of_a_replaced_config_close_after_calls_in_flight(harness: Any) -> None:
    handlers: dict[str, Recorder] = {}
    harness.adapters["slow"] = recorder_adapter("slow", handlers)
    assert await harness.load(_recorders_config(["slow"])) == []
    slow = handlers["h.slow.istio-system"]
    in_flight = asyncio.create_task(harness.runtime.check({}))
    await slow.called.wait()
    assert await harness.load(_namespaced("istio-system", "replacement")) == []
    await asyncio.sleep(0)
    assert not slow.closed  # its call is still running
    slow.release.set()
    assert (await in_flight).status_code == 0
    await asyncio.wait_for(slow.closing.wait(), 5)
    assert (await harness.runtime.check({})).message.endswith(":replacement")


PRODUCER = """
apiVersion: config.istio.io/v1alpha2
kind: kubernetes
metadata: {{name: attributes, namespace: istio-system}}
spec: {{registry: "file:{registry}"}}
---
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {{name: handler, namespace: istio-system}}
spec: {{status: {{code: 7, message: v3 may not call ratings}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: checknothing
metadata: {{name: denyrequest, namespace: istio-system}}
spec: {{}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: denyreviewsv3, namespace: istio-system}}
spec:
  match: >-
    destination.service == "ratings.default.svc.cluster.local"
    && source.labels["app"] == "reviews" && source.labels["version"] == "v3"
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
"""

SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.21, labels: {app: reviews, version: v1}, serviceAccount: bookinfo-reviews}
  - {address: 127.0.0.23, labels: {app: reviews, version: v3}, serviceAccount: bookinfo-reviews}
"""


async def test_attribute_producer_fills_source_labels(harness: Any, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "reviews.yaml").write_text(SERVICE_ENTRY)
    assert await harness.load(PRODUCER.format(registry=registry)) == []
    producer = harness.runtime.active.handlers["attributes.kubernetes.istio-system"]
    await asyncio.wait_for(producer.synced.wait(), 10)
    ratings = {"destination.service": "ratings.default.svc.cluster.local"}
    v3 = await harness.runtime.check({**ratings, "source.ip": bytes([127, 0, 0, 23])})
    assert v3.message == "handler.denier.istio-system:v3 may not call ratings"
    # The answer depends on what the caller sent (source.ip), and on source.labels' absence.
    assert Reference("source.ip", None, True) in v3.references
    assert Reference("source.labels", None, False) in v3.references
    v1 = await harness.runtime.check({**ratings, "source.ip": bytes([127, 0, 0, 21])})
    assert v1.status_code == 0
    # Attributes the caller sends win over produced ones.
    sent = {**ratings, "source.ip": bytes([127, 0, 0, 23]), "source.labels": {"app": "x"}}
    assert (await harness.runtime.check(sent)).status_code == 0


TELEMETRY = """
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {name: requestcount, namespace: istio-system}
spec:
  value: "1"
  dimensions:
    destination_service: destination.service | "unknown"
    response_code: response.code | 200
---
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {name: requestduration, namespace: istio-system}
spec:
  value: response.duration | "0ms"
  dimensions:
    destination_service: destination.service | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: prometheus
metadata: {name: handler, namespace: istio-system}
spec:
  metrics:
  - name: request_count
    instance_name: requestcount.metric.istio-system
    kind: COUNTER
    label_names: [destination_service, response_code]
  - name: request_duration
    instance_name: requestduration.metric.istio-system
    kind: DISTRIBUTION
    label_names: [destination_service]
    buckets: {explicit_buckets: {bounds: [0.01, 0.1, 1]}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: promhttp, namespace: istio-system}
spec:
  match: context.protocol == "http"
  actions:
  - handler: handler.prometheus
    instances: [requestcount.metric, requestduration.metric]
"""


async def test_report_to_prometheus(harness: Any) -> None:
    assert await harness.load(TELEMETRY) == []
    http = {"context.protocol": "http", "destination.service": "ratings.default.svc.cluster.local"}
    await harness.runtime.report(
        [
            {**http, "response.code": 200, "response.duration": timedelta(milliseconds=5)},
            {**http, "response.code": 200, "response.duration": timedelta(milliseconds=50)},
            {**http, "response.code": 503, "response.duration": timedelta(seconds=2)},
            {"context.protocol": "tcp"},
        ]
    )
    text = text_format(harness.runtime.prometheus_registry).decode()
    service = 'destination_service="ratings.default.svc.cluster.local"'
    assert f'request_count{{{service},response_code="200"}} 2.0' in text
    assert f'request_count{{{service},response_code="503"}} 1.0' in text
    assert "# TYPE request_count counter" in text
    assert f'request_duration_bucket{{{service},le="0.01"}} 1.0' in text
    assert f'request_duration_bucket{{{service},le="0.1"}} 2.0' in text
    assert f'request_duration_bucket{{{service},le="+Inf"}} 3.0' in text
    assert f"request_duration_count{{{service}}} 3.0" in text
    # Reloading the same metrics keeps the counts.
    assert await harness.load(TELEMETRY + _namespaced("default", "x", "false")) == []
    text = text_format(harness.runtime.prometheus_registry).decode()
    assert f'request_count{{{service},response_code="200"}} 2.0' in text


class LateQuota:
    """A quota handler that grants what is asked after a loop turn, or (hang) never answers."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.asked: list[QuotaArgs] = []

    def handle_quota(self, instance: QuotaInstance, args: QuotaArgs) -> Any:
        self.asked.append(args)
        if self.hang:
            return asyncio.Event().wait()
        return self._grant(args)

    async def _grant(self, args: QuotaArgs) -> QuotaResult:
        await asyncio.sleep(0)
        return QuotaResult(args.amount, timedelta(seconds=5))

    async def close(self) -> None:
        return None


LATE_QUOTAS = "\n---\n".join(
    f"""apiVersion: config.istio.io/v1alpha2
kind: {kind}
metadata: {{name: h, namespace: istio-system}}
spec: {{}}
---
apiVersion: config.istio.io/v1alpha2
kind: quota
metadata: {{name: {quota}, namespace: istio-system}}
spec: {{dimensions: {{source: source.service | "unknown"}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: {quota}, namespace: istio-system}}
spec: {{actions: [{{handler: h.{kind}, instances: [{quota}.quota]}}]}}"""
    for kind, quota in (("later", "later"), ("never", "never"))
)


async def test_quota_handlers_that_answer_later_or_never(harness: Any) -> None:
    handlers: dict[str, LateQuota] = {}
    for kind in ("later", "never"):

        async def build(params: dict[str, Any], env: Env, hang: bool = kind == "never") -> Any:
            handler = handlers[env.handler] = LateQuota(hang)
            return handler

        harness.adapters[kind] = AdapterInfo(kind, "test", build, frozenset({"quota"}))
    assert await harness.load(LATE_QUOTAS) == []
    ask = {"Later": QuotaRequest(3), "never": QuotaRequest(2), "free": QuotaRequest(1)}
    outcome = await asyncio.wait_for(harness.runtime.check({}, ask, "call-1"), 5)
    assert outcome.status_code == 0
    assert outcome.quotas["Later"] == QuotaResult(3, timedelta(seconds=5))
    never = outcome.quotas["never"]
    assert (never.granted, never.status_code) == (0, 14)
    assert never.message == "handler h.never.istio-system: no answer in 0.5s"
    assert outcome.quotas["free"].granted == 1
    asked = handlers["h.later.istio-system"].asked
    assert asked == [QuotaArgs("Later", 3, False, "call-1")]
    errors = generate_latest(harness.runtime.metrics.registry).decode()
    assert 'mixer_dispatch_errors_total{handler="h.never.istio-system",reason="timeout"} 1.0' in (
        errors
    )


async def test_report_instances_that_cannot_be_built_are_counted(harness: Any) -> None:
    handlers: dict[str, Recorder] = {}
    harness.adapters["ok"] = recorder_adapter("ok", handlers)
    config = """
apiVersion: config.istio.io/v1alpha2
kind: ok
metadata: {name: h, namespace: istio-system}
spec: {}
---
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {name: size, namespace: istio-system}
spec: {value: request.size, dimensions: {source: source.service | "unknown"}}
---
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {name: count, namespace: istio-system}
spec: {value: "1", dimensions: {source: source.service | "unknown"}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: metrics, namespace: istio-system}
spec: {actions: [{handler: h.ok, instances: [size.metric, count.metric]}]}
"""
    assert await harness.load(config) == []
    await harness.runtime.report([{"source.service": "a"}, {"request.size": 5}])
    built = [
        (i.name.split(".")[0], i.value, dict(i.dimensions))
        for i in handlers["h.ok.istio-system"].metrics
    ]
    assert built == [
        ("count", 1, {"source": "a"}),
        ("size", 5, {"source": "unknown"}),
        ("count", 1, {"source": "unknown"}),
    ]
    errors = generate_latest(harness.runtime.metrics.registry).decode()
    assert 'mixer_instance_errors_total{instance="size.metric.istio-system"} 1.0' in errors
