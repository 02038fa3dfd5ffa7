"""Each built-in adapter on its own: listchecker (inline, case-insensitive, IP ranges, fetched
and refreshed from a URL, ttl), memquota (rolling window, overrides, deduplication), stdio,
statsd (a UDP receiver), and the kubernetes attribute producer's index."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from istio.config import parse_documents
from istio.expr import MapBag
from istio.mixer.adapters import (
    kubernetesenv,
    listchecker,
    memquota,
    prometheus,
    statsd,
    stdio,
)
from istio.mixer.adapters.memquota import RollingWindow
from istio.mixersdk import (
    Env,
    ListEntryInstance,
    LogEntryInstance,
    MetricInstance,
    QuotaArgs,
    QuotaInstance,
    parse_params,
)
from istio.mixersdk.builtin import LISTCHECKER, MEMQUOTA, PROMETHEUS, STATSD, STDIO
from istio.testing.server import listen

ENV = Env("h.kind.istio-system", logging.getLogger("test"))


def params(schema: Any, value: Mapping[str, Any]) -> dict[str, Any]:
    parsed, problems = parse_params(schema, value)
    assert problems == []
    return parsed


def entry(value: object) -> ListEntryInstance:
    return ListEntryInstance("e.listentry.istio-system", value)  # type: ignore[arg-type]


async def test_listchecker_inline_lists() -> None:
    white = listchecker.ListChecker(params(LISTCHECKER, {"overrides": ["v1", "v2"]}), ENV)
    assert white.handle_list_entry(entry("v1")).ok
    assert white.handle_list_entry(entry("V1")).status_code == 5
    insensitive = listchecker.ListChecker(
        params(LISTCHECKER, {"overrides": ["Jason"], "entryType": "case_insensitive_strings"}),
        ENV,
    )
    assert insensitive.handle_list_entry(entry("JASON")).ok
    black = listchecker.ListChecker(
        params(
            LISTCHECKER,
            {
                "overrides": ["10.0.0.0/8", "192.168.1.7"],
                "entryType": "IP_ADDRESSES",
                "blacklist": True,
                "cachingInterval": "30s",
                "cachingUseCount": 7,
            },
        ),
        ENV,
    )
    denied = black.handle_list_entry(entry(bytes([10, 1, 2, 3])))
    assert (denied.status_code, denied.message) == (7, "10.1.2.3 is blacklisted")
    assert (denied.valid_duration, denied.valid_use_count) == (timedelta(seconds=30), 7)
    mapped = bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 7])
    assert black.handle_list_entry(entry(mapped)).status_code == 7
    assert black.handle_list_entry(entry("192.168.1.8")).ok
    assert black.handle_list_entry(entry("not-an-ip")).status_code == 3
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300' is not an IP address or CIDR range"):
        listchecker.ListChecker(
            params(LISTCHECKER, {"overrides": ["10.0.0.300"], "entryType": "IP_ADDRESSES"}), ENV
        )


async def test_listchecker_fetches_refreshes_and_expires_its_list() -> None:
    served = {"body": "# allowed\nalice\n\nbob\n", "status": 200}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=served["body"], status=served["status"])  # type: ignore[arg-type]

    app = web.Application()
    app.router.add_get("/list", handler)
    server = await listen(app, "127.0.0.1", shutdown_timeout=0.1)
    now = [100.0]
    try:
        spec = {
            "providerUrl": f"http://127.0.0.1:{server.port}/list",
            "refreshInterval": "1s",
            "ttl": "10s",
        }
        checker = listchecker.ListChecker(params(LISTCHECKER, spec), ENV, clock=lambda: now[0])
        await checker.start()
        try:
            assert checker.handle_list_entry(entry("bob")).ok
            assert checker.handle_list_entry(entry("carol")).status_code == 5
            served["body"] = "carol\n"
            checker.refreshed.clear()
            await asyncio.wait_for(checker.refreshed.wait(), 5)
            assert not checker.handle_list_entry(entry("bob")).ok
            # The provider fails from now on: the list holds until its ttl, then checks fail.
            served["status"] = 500
            await checker.refresh()
            assert checker.handle_list_entry(entry("carol")).ok
            now[0] += 11
            stale = checker.handle_list_entry(entry("carol"))
            assert stale.status_code == 14
            assert "HTTP 500" in stale.message
        finally:
            await checker.close()
    finally:
        await server.close()


def quota(dimensions: Mapping[str, object] | None = None) -> QuotaInstance:
    return QuotaInstance("requestcount.quota.istio-system", dict(dimensions or {}))  # type: ignore[arg-type]


def test_memquota_rolling_window_overrides_and_deduplication() -> None:
    now = [0.0]
    handler = memquota.MemQuota(
        params(
            MEMQUOTA,
            {
                "quotas": [
                    {
                        "name": "requestcount",
                        "maxAmount": 2,
                        "validDuration": "10s",
                        "overrides": [
                            {"dimensions": {"source": "batch"}, "maxAmount": 5},
                            {"dimensions": {"source": "batch", "x": "y"}, "maxAmount": 0},
                        ],
                    }
                ],
                "minDeduplicationDuration": "2s",
            },
        ),
        clock=lambda: now[0],
    )
    one = QuotaArgs("RequestCount", 1)
    assert [handler.handle_quota(quota(), one).granted for _ in range(3)] == [1, 1, 0]
    now[0] = 5.0
    assert handler.handle_quota(quota(), one).granted == 0
    now[0] = 10.0  # the first two allocations leave the window
    assert handler.handle_quota(quota(), QuotaArgs("q", 3, best_effort=True)).granted == 2
    assert handler.handle_quota(quota(), one).valid_duration == timedelta(seconds=10)
    # The first override wins (the second would be 0).
    batch = quota({"source": "batch", "x": "y"})
    assert handler.handle_quota(batch, QuotaArgs("q", 5)).granted == 5
    assert handler.handle_quota(batch, QuotaArgs("q", 6)).granted == 0
    # Retries with the same deduplication id get the first answer, within the window.
    retry = QuotaArgs("q", 1, deduplication_id="abc")
    other = quota({"source": "other"})
    assert [handler.handle_quota(other, retry).granted for _ in range(3)] == [1, 1, 1]
    assert handler.buckets[(other.name, (("source", "other"),))].used(now[0]) == 1
    now[0] = 12.5
    assert handler.handle_quota(other, retry).granted == 1
    assert handler.buckets[(other.name, (("source", "other"),))].used(now[0]) == 2


async def test_stdio_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    handler = stdio.Stdio(
        params(
            STDIO,
            {
                "logStream": "FILE",
                "outputPath": str(path),
                "outputAsJson": True,
                "severityLevels": {"Default": "INFO", "error": "ERROR"},
            },
        )
    )
    handler.handle_log_entry(
        [
            LogEntryInstance(
                "accesslog.logentry.istio-system",
                {
                    "sourceIp": bytes([10, 0, 0, 1]),
                    "latency": timedelta(milliseconds=1500),
                    "responseCode": 200,
                    "headers": {"b": "2", "a": "1"},
                },
                severity="error",
            )
        ]
    )
    handler.handle_metric(
        [MetricInstance("requestcount.metric.istio-system", 1, {"service": "ratings"})]
    )
    await handler.close()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["level"] == "error"
    assert first["instance"] == "accesslog.logentry.istio-system"
    assert (first["sourceIp"], first["latency"], first["responseCode"]) == ("10.0.0.1", "1.5s", 200)
    assert first["headers"] == {"a": "1", "b": "2"}
    assert first["time"].endswith("Z")
    assert (second["level"], second["service"], second["value"]) == ("info", "ratings", 1)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.packets.put_nowait(data)


async def test_statsd_sends_lines_over_udp() -> None:
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(
        _Receiver, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        handler = await statsd.build(
            params(
                STATSD,
                {
                    "address": f"127.0.0.1:{port}",
                    "prefix": "istio.",
                    "flushBytes": 60,
                    "metrics": {
                        "requestcount.metric.istio-system": {
                            "nameTemplate": "{{.service}}.{{ .code }}.count",
                            "type": "COUNTER",
                        },
                        "requestduration": {"type": "DISTRIBUTION"},
                    },
                },
            ),
            ENV,
        )
        handler.handle_metric(
            [
                MetricInstance(
                    "requestcount.metric.istio-system", 1, {"service": "ratings", "code": 200}
                ),
                MetricInstance(
                    "requestduration.metric.istio-system", timedelta(milliseconds=12), {}
                ),
                MetricInstance("unconfigured.metric.istio-system", 1, {}),
                MetricInstance(
                    "requestcount.metric.istio-system", 1, {"service": "reviews", "code": 503}
                ),
            ]
        )
        packets = [await asyncio.wait_for(receiver.packets.get(), 5) for _ in range(2)]
        await handler.close()
    finally:
        transport.close()
    assert packets == [
        b"istio.ratings.200.count:1|c\nistio.requestduration:12|ms",
        b"istio.reviews.503.count:1|c",
    ]


SERVICE_ENTRIES = """
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local, reviews-alias.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 127.0.0.21, labels: {app: reviews, version: v1}, serviceAccount: bookinfo-reviews}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: db, namespace: storage}
spec:
  hosts: [mongo.storage.svc.cluster.local]
  ports: [{number: 27017, name: mongo, protocol: MONGO}]
  endpoints:
  - {address: "::ffff:127.0.0.30", labels: {app: mongo}}
"""


def test_kubernetes_producer_index() -> None:
    configs, problems = parse_documents(SERVICE_ENTRIES)
    assert problems == []
    workloads = kubernetesenv.index_workloads(configs)
    reviews = workloads["127.0.0.21"]
    assert (reviews.service, reviews.namespace, reviews.service_account) == (
        "reviews.default.svc.cluster.local",
        "default",
        "bookinfo-reviews",
    )
    producer = kubernetesenv.KubernetesEnv(params(kubernetesenv.KUBERNETES, {}), ENV)
    producer.workloads = workloads
    bag = MapBag({"source.ip": bytes([127, 0, 0, 21]), "destination.ip": bytes([127, 0, 0, 30])})
    assert producer.produce("source.labels", bag) == {"app": "reviews", "version": "v1"}
    assert producer.produce("source.serviceAccount", bag) == "bookinfo-reviews"
    assert producer.produce("destination.namespace", bag) == "storage"
    assert producer.produce("destination.service", bag) == "mongo.storage.svc.cluster.local"
    assert producer.produce("origin.labels", bag) is None
    assert producer.produce("source.labels", MapBag({"source.ip": bytes(4)})) is None
    with pytest.raises(ValueError, match="only file:DIR is supported"):
        kubernetesenv.KubernetesEnv(
            params(kubernetesenv.KUBERNETES, {"registry": "consul:http://x"}), ENV
        )


def test_rolling_window_reference_model() -> None:
    window = RollingWindow(1.0)
    window.add(0.0, 2)
    window.add(0.5, 1)
    assert window.used(0.99) == 3
    assert window.used(1.0) == 1
    assert window.used(1.5) == 0


def _prometheus(registry: CollectorRegistry) -> prometheus.PrometheusHandler:
    labels = ["source", "code"]
    metrics = [
        {"name": "calls", "instanceName": "calls.metric.istio-system", "kind": "COUNTER"},
        {"name": "inflight", "instanceName": "inflight.metric.istio-system", "kind": "GAUGE"},
        {
            "name": "latency",
            "instanceName": "latency.metric.istio-system",
            "kind": "DISTRIBUTION",
            "buckets": {"explicitBuckets": {"bounds": [0.1, 1, 10]}},
        },
    ]
    spec = {"metrics": [{**m, "labelNames": labels} for m in metrics]}
    env = Env("handler.prometheus.istio-system", logging.getLogger("test"), registry)
    return prometheus.PrometheusHandler(params(PROMETHEUS, spec), env)


def test_prometheus_records_a_batch_as_it_would_one_by_one() -> None:
    shared = {"source": "a", "code": 200}
    instances = []
    for i in range(12):
        # Requests' instances share one dimensions map; others are equal but distinct maps.
        dimensions = shared if i % 2 else {"source": "a" if i % 3 else "b", "code": 200}
        instances += [
            MetricInstance("calls.metric.istio-system", 1, dimensions),
            MetricInstance("inflight.metric.istio-system", i, dimensions),
            MetricInstance("latency.metric.istio-system", timedelta(seconds=i / 4), dimensions),
            MetricInstance("nothing.metric.istio-system", 1, dimensions),  # no metric: left out
        ]
    batched, single = CollectorRegistry(), CollectorRegistry()
    _prometheus(batched).handle_metric(instances)
    one_by_one = _prometheus(single)
    for instance in instances:
        one_by_one.handle_metric([instance])
    text = prometheus.text_format(batched).decode()
    assert text == prometheus.text_format(single).decode()
    assert 'calls{source="a",code="200"} 10.0' in text
    assert 'inflight{source="a",code="200"} 11.0' in text  # the last value of the series
    assert 'inflight{source="b",code="200"} 6.0' in text
    assert 'latency_bucket{source="a",code="200",le="1.0"} 4.0' in text
    assert 'latency_count{source="a",code="200"} 10.0' in text


def test_prometheus_records_what_came_before_a_bad_instance() -> None:
    registry = CollectorRegistry()
    handler = _prometheus(registry)
    dimensions = {"source": "a", "code": 200}
    with pytest.raises(ValueError, match="could not convert"):
        handler.handle_metric(
            [
                MetricInstance("calls.metric.istio-system", 1, dimensions),
                MetricInstance("calls.metric.istio-system", "many", dimensions),
                MetricInstance("calls.metric.istio-system", 1, dimensions),
            ]
        )
    assert 'calls{source="a",code="200"} 1.0' in prometheus.text_format(registry).decode()
