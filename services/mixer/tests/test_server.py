"""The Mixer server over gRPC: compressed bags (global and message words, Report deltas),
referenced attributes, quotas, config from a file store (and a refused change), the
monitoring and Prometheus ports, garbage on the gRPC port, and `mixs server` itself."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from istio.api.mixer.v1 import attributes_pb2, check_pb2, report_pb2, service_pb2_grpc
from istio.mixerclient.attributes import GLOBAL_INDEX, encode, referenced_words
from istio.testing.net import free_port

POLICY = """
apiVersion: config.istio.io/v1alpha2
kind: denier
metadata: {name: handler, namespace: istio-system}
spec: {status: {code: 7, message: Not allowed}, validDuration: 30s}
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
  match: request.headers["x-user"] == "" && destination.service == "ratings.*"
  actions:
  - handler: handler.denier
    instances: [denyrequest.checknothing]
---
apiVersion: config.istio.io/v1alpha2
kind: memquota
metadata: {name: handler, namespace: istio-system}
spec:
  quotas: [{name: requestcount.quota.istio-system, maxAmount: 2, validDuration: 60s}]
---
apiVersion: config.istio.io/v1alpha2
kind: quota
metadata: {name: requestcount, namespace: istio-system}
spec: {}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  actions:
  - handler: handler.memquota
    instances: [requestcount.quota]
"""

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
kind: prometheus
metadata: {name: handler, namespace: istio-system}
spec:
  metrics:
  - name: request_count
    instance_name: requestcount.metric.istio-system
    kind: COUNTER
    label_names: [destination_service, response_code]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: promhttp, namespace: istio-system}
spec:
  actions:
  - handler: handler.prometheus
    instances: [requestcount.metric]
"""


async def get_text(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def test_check_with_referenced_attributes_and_quota(mixer: Any) -> None:
    running = await mixer()
    await running.apply("policy.yaml", POLICY)
    ratings = {"destination.service": "ratings.default.svc.cluster.local"}
    denied = await running.check({**ratings, "request.headers": {}})
    precondition = denied.precondition
    assert (precondition.status.code, precondition.status.message) == (
        7,
        "handler.denier.istio-system:Not allowed",
    )
    # Capped at 10 s so that a policy change is in force within that.
    assert precondition.valid_duration.ToTimedelta() == timedelta(seconds=10)
    assert referenced_words(precondition.referenced_attributes) == [
        ("request.headers", check_pb2.ReferencedAttributes.ABSENCE, "x-user"),
        ("destination.service", check_pb2.ReferencedAttributes.EXACT, None),
    ]
    # Names from the global dictionary travel as their index.
    matches = precondition.referenced_attributes.attribute_matches
    assert matches[1].name == GLOBAL_INDEX["destination.service"]
    asked = {"RequestCount": check_pb2.CheckRequest.QuotaParams(amount=1)}
    granted = []
    for _ in range(3):
        allowed = await running.check({**ratings, "request.headers": {"x-user": "j"}}, quotas=asked)
        assert allowed.precondition.status.code == 0
        granted.append(allowed.quotas["RequestCount"].granted_amount)
    assert granted == [1, 1, 0]
    assert allowed.quotas["RequestCount"].valid_duration.ToTimedelta() == timedelta(seconds=60)


async def test_report_deltas_and_message_words_reach_prometheus(mixer: Any) -> None:
    running = await mixer()
    await running.apply("telemetry.yaml", TELEMETRY)
    # Hand-built: a record naming words by global index and by message words, and a delta
    # that changes only response.code (destination.service carries over).
    first = attributes_pb2.CompressedAttributes(words=["ratings.default.svc.cluster.local"])
    first.strings[GLOBAL_INDEX["destination.service"]] = -1
    first.int64s[GLOBAL_INDEX["response.code"]] = 200
    second = attributes_pb2.CompressedAttributes()
    second.int64s[GLOBAL_INDEX["response.code"]] = 503
    third = attributes_pb2.CompressedAttributes()
    third.int64s[GLOBAL_INDEX["response.code"]] = 503
    await running.stub.Report(
        report_pb2.ReportRequest(attributes=[first, second, third], global_word_count=202)
    )
    # A Report whose records share default_words.
    shared = attributes_pb2.CompressedAttributes()
    shared.strings[GLOBAL_INDEX["destination.service"]] = -1
    await running.stub.Report(
        report_pb2.ReportRequest(attributes=[shared], default_words=["details.default"])
    )
    status, text = await get_text(running.server.prometheus_port, "/metrics")
    assert status == 200
    service = 'destination_service="ratings.default.svc.cluster.local"'
    assert f'request_count{{{service},response_code="200"}} 1' in text
    assert f'request_count{{{service},response_code="503"}} 2' in text
    assert 'request_count{destination_service="details.default",response_code="200"} 1' in text
    status, own = await get_text(running.server.monitoring_port, "/metrics")
    assert "mixer_report_records_total 4.0" in own


async def test_malformed_bags_are_refused(mixer: Any) -> None:
    running = await mixer()
    past_dictionary = attributes_pb2.CompressedAttributes()
    past_dictionary.strings[5000] = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.Check(check_pb2.CheckRequest(attributes=past_dictionary))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "past the global dictionary" in (caught.value.details() or "")
    # A client that shares fewer global words than the index it sends.
    shared_less = attributes_pb2.CompressedAttributes()
    shared_less.strings[GLOBAL_INDEX["destination.service"]] = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.Check(
            check_pb2.CheckRequest(attributes=shared_less, global_word_count=100)
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    missing_word = attributes_pb2.CompressedAttributes()
    missing_word.strings[-3] = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.Report(report_pb2.ReportRequest(attributes=[missing_word]))
    assert "record 0: word index -3 is past the message dictionary" in (
        caught.value.details() or ""
    )


async def test_garbage_on_the_grpc_port_does_not_crash_the_server(mixer: Any) -> None:
    running = await mixer()
    port = running.server.grpc_port
    for junk in (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(4096),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(64),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(junk)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)  # the server closes the connection
        writer.close()
    # Bytes that are not a CheckRequest, through a real gRPC call.
    raw = running.channel.unary_unary("/istio.mixer.v1.Mixer/Check")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(b"\xff\xff\xff\xff garbage")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a istio.mixer.v1.CheckRequest" in (caught.value.details() or "")
    response = await running.check({"request.path": "/"})
    assert response.precondition.status.code == 0


async def test_a_refused_change_keeps_the_config_in_force(mixer: Any) -> None:
    running = await mixer()
    await running.apply("policy.yaml", POLICY)
    ratings = {"destination.service": "ratings.default.svc.cluster.local", "request.headers": {}}
    assert (await running.check(ratings)).precondition.status.code == 7
    # Sound YAML that names a handler that does not exist: the store takes it, Mixer refuses.
    await running.apply(
        "broken.yaml",
        "apiVersion: config.istio.io/v1alpha2\nkind: rule\n"
        "metadata: {name: broken, namespace: istio-system}\n"
        "spec: {actions: [{handler: missing.denier, instances: [denyrequest.checknothing]}]}\n",
    )
    assert (await running.check(ratings)).precondition.status.code == 7
    status, configz = await get_text(running.server.monitoring_port, "/debug/configz")
    assert '"rejected": true' in configz
    assert (
        "rule istio-system/broken: spec.actions[0].handler: no handler "
        "missing.denier.istio-system" in configz
    )
    status, metrics = await get_text(running.server.monitoring_port, "/metrics")
    assert "mixer_config_rejected 1.0" in metrics
    # Fixing it puts the whole change in force.
    await running.apply("broken.yaml", "")
    status, configz = await get_text(running.server.monitoring_port, "/debug/configz")
    assert '"rejected": false' in configz
    status, health = await get_text(running.server.monitoring_port, "/healthz")
    assert (status, health) == (200, "ok\n")


async def test_mixs_server_command(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (config / "policy.yaml").write_text(POLICY)
    grpc_port, monitoring_port, prometheus_port = free_port(), free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "istio.mixer",
        "server",
        "--config-store",
        f"file://{config}",
        "--grpc-addr",
        f"127.0.0.1:{grpc_port}",
        "--monitoring-addr",
        f"127.0.0.1:{monitoring_port}",
        "--prometheus-addr",
        f"127.0.0.1:{prometheus_port}",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, "mixs exited before its config was in force"
            if b"config generation 1 in force" in line:
                break
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = service_pb2_grpc.MixerStub(channel)
            bag = {
                "destination.service": "ratings.default.svc.cluster.local",
                "request.headers": {},
            }
            response = await stub.Check(check_pb2.CheckRequest(attributes=encode(bag)))
        assert response.precondition.status.code == 7
        assert (await get_text(monitoring_port, "/healthz"))[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


async def test_mixs_refuses_a_port_in_use() -> None:
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "istio.mixer",
            "server",
            "--config-store",
            "file:///nonexistent-is-created",
            "--grpc-addr",
            f"127.0.0.1:{free_port()}",
            "--monitoring-addr",
            f"127.0.0.1:{port}",
            "--prometheus-addr",
            f"127.0.0.1:{free_port()}",
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port} for monitoring" in stderr.decode()
    finally:
        holder.close()
        await holder.wait_closed()
