"""The default telemetry config (install/mixer) as 0.2 shipped it: istioctl and mixs accept it,
and requests and connections become the six Prometheus metrics and a JSON access log."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from istio.mixer.adapters.prometheus import text_format

INSTALL = Path(__file__).resolve().parents[3] / "install" / "mixer"


def _read_install() -> str:
    return "\n---\n".join(p.read_text() for p in sorted(INSTALL.glob("*.yaml")))


async def test_requests_and_connections_become_metrics_and_access_log(
    harness: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await harness.load(_read_install()) == []
    base = {
        "source.service": "productpage.default.svc.cluster.local",
        "source.labels": {"app": "productpage", "version": "v1"},
        "destination.service": "reviews.default.svc.cluster.local",
        "destination.labels": {"app": "reviews", "version": "v2"},
        "source.ip": bytes([127, 0, 0, 10]),
    }
    http = {
        **base,
        "context.protocol": "http",
        "request.method": "GET",
        "request.path": "/reviews/0",
        "request.size": 120,
        "request.time": datetime(2017, 10, 10, tzinfo=UTC),
        "response.code": 200,
        "response.size": 2500,
        "response.duration": timedelta(milliseconds=30),
    }
    tcp = {
        **base,
        "context.protocol": "tcp",
        "connection.sent.bytes": 300,
        "connection.received.bytes": 40,
    }
    await harness.runtime.report([http, {**http, "response.code": 503}, tcp])
    text = text_format(harness.runtime.prometheus_registry).decode()
    labels = (
        'source_service="productpage.default.svc.cluster.local",source_version="v1",'
        'destination_service="reviews.default.svc.cluster.local",destination_version="v2"'
    )
    assert f'request_count{{{labels},response_code="200"}} 1.0' in text
    assert f'request_count{{{labels},response_code="503"}} 1.0' in text
    assert f'request_duration_bucket{{{labels},response_code="200",le="0.05"}} 1.0' in text
    assert f'request_size_bucket{{{labels},response_code="200",le="100.0"}} 0.0' in text
    assert f'request_size_bucket{{{labels},response_code="200",le="1000.0"}} 1.0' in text
    assert f'response_size_bucket{{{labels},response_code="200",le="100000000.0"}} 1.0' in text
    assert f"tcp_bytes_sent{{{labels}}} 300.0" in text
    assert f"tcp_bytes_received{{{labels}}} 40.0" in text
    # TCP connections are not requests.
    assert text.count("request_count{") == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["responseCode"] for line in lines] == [200, 503]
    assert lines[0] | {"time": None} == {
        "level": "info",
        "time": None,
        "instance": "accesslog.logentry.istio-system",
        "destinationIp": "0.0.0.0",
        "latency": "30ms",
        "method": "GET",
        "protocol": "http",
        "requestSize": 120,
        "responseCode": 200,
        "responseSize": 2500,
        "sourceIp": "127.0.0.10",
        "sourceUser": "",
        "url": "/reviews/0",
    }
    assert lines[0]["time"] == "2017-10-10T00:00:00.000000Z"


@pytest.mark.parametrize("command", ["istioctl", "mixs"])
def test_the_default_config_validates(command: str) -> None:
    module = {"istioctl": "istio.istioctl", "mixs": "istio.mixer"}[command]
    result = subprocess.run(
        [sys.executable, "-m", module, "validate", "-f", str(INSTALL)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_istioctl_refuses_a_mistyped_metric(tmp_path: Path) -> None:
    broken = (
        (INSTALL / "telemetry.yaml")
        .read_text()
        .replace("value: request.size | 0", 'value: request.size | "0"')
    )
    (tmp_path / "telemetry.yaml").write_text(broken)
    result = subprocess.run(
        [sys.executable, "-m", "istio.istioctl", "validate", "-f", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "Error: metric istio-system/requestsize: spec.value: 'request.size | \"0\"': "
        "column 14: | needs operands of the same type, got INT64 and STRING\n"
    )
