"""Validation beyond route rules: service entries, egress hosts, Mixer references."""

from __future__ import annotations

from typing import Any

import pytest

from istio.config import ConfigError, parse_object
from istio.config.validation import validate_egress_host


def fields_of(kind: str, spec: dict[str, Any]) -> list[str]:
    try:
        parse_object({"kind": kind, "metadata": {"name": "x"}, "spec": spec})
    except ConfigError as error:
        return [f"{p.field}: {p.message}" for p in error.problems]
    return []


@pytest.mark.parametrize("host", ["*", "*.foo.com", "*-bar.foo.com", "api.foo.com", "foo"])
def test_egress_hosts_accepted(host: str) -> None:
    assert validate_egress_host(host) is None


@pytest.mark.parametrize("host", ["foo.*.com", "*.", "bad_host.com", "-x.com", "**.foo.com"])
def test_egress_hosts_rejected(host: str) -> None:
    assert validate_egress_host(host) is not None


def test_service_entry_for_a_vm() -> None:
    spec = {
        "hosts": ["details.default.svc.cluster.local"],
        "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
        "resolution": "STATIC",
        "endpoints": [
            {"address": "127.0.0.5", "ports": {"http": 9090}, "labels": {"version": "v1"}}
        ],
    }
    assert fields_of("ServiceEntry", spec) == []
    spec["endpoints"] = [{"address": "vm-1", "ports": {"grpc": 70000}}]
    spec["ports"].append({"number": 9080, "name": "http", "protocol": "SMTP"})  # type: ignore[attr-defined]
    assert fields_of("ServiceEntry", spec) == [
        "spec.ports[1].number: port 9080 is listed twice",
        "spec.ports[1].protocol: protocol 'SMTP' is not one of HTTP, HTTP2, GRPC, HTTPS, MONGO, "
        "REDIS, TCP, TLS",
        "spec.ports[1].name: port name 'http' is used twice",
        "spec.endpoints[0].address: 'vm-1' is not an IP address (resolution STATIC)",
        "spec.endpoints[0].ports.grpc: no port named 'grpc' in ports",
        "spec.endpoints[0].ports.grpc: must be in [1, 65535], got 70000",
    ]


def test_mixer_rule_references() -> None:
    good = {
        "match": 'destination.labels["app"] == "ratings"',
        "actions": [{"handler": "handler.denier", "instances": ["denyrequest.checknothing"]}],
    }
    assert fields_of("rule", good) == []
    bad = {"actions": [{"handler": "Handler", "instances": []}]}
    assert fields_of("rule", bad) == [
        "spec.actions[0].handler: 'Handler' is not a handler reference (name.kind[.namespace])",
        "spec.actions[0].instances: at least one instance is required",
    ]


def test_fault_rules_as_0_2_limited_them() -> None:
    spec = {
        "destination": {"name": "ratings"},
        "httpFault": {
            "delay": {"percent": 10, "exponentialDelay": "1s"},
            "abort": {"percent": 10, "grpcStatus": "UNAVAILABLE"},
        },
        "l4Fault": {"terminate": {"percent": 10}},
    }
    assert fields_of("RouteRule", spec) == [
        "spec.httpFault.delay.exponentialDelay: exponentialDelay is not supported",
        "spec.httpFault.abort: abort with grpc_status is not supported; use httpStatus",
        "spec.l4Fault: l4Fault is not supported (as in Istio 0.2)",
    ]


def test_circuit_breaker_bounds() -> None:
    spec = {
        "destination": {"name": "reviews"},
        "circuitBreaker": {
            "simpleCb": {"maxConnections": -1, "sleepWindow": "0s", "httpMaxEjectionPercent": 120}
        },
    }
    assert fields_of("DestinationPolicy", spec) == [
        "spec.circuitBreaker.simpleCb.maxConnections: must not be negative",
        "spec.circuitBreaker.simpleCb.sleepWindow: must be at least 1ms",
        "spec.circuitBreaker.simpleCb.httpMaxEjectionPercent: percent must be in [0, 100], got 120",
    ]


def test_an_ingress_rules_tls_secret_is_a_secret_name() -> None:
    spec = {"destination": {"name": "productpage"}, "destinationPort": 9080}
    assert fields_of("IngressRule", {**spec, "tlsSecret": "bookinfo-certs"}) == []
    # The ingress proxy reads <certs dir>/<secret>/tls.crt: no name may reach elsewhere.
    assert fields_of("IngressRule", {**spec, "tlsSecret": "../etc"}) == [
        "spec.tlsSecret: secret '../etc' is not a valid name: use lowercase letters, digits, "
        "'-' and '.', starting and ending with a letter or digit"
    ]
