"""Mixer's self-monitoring metrics, served on the monitoring port's /metrics (9093)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class MixerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.checks = Counter(
            "mixer_check",
            "Check calls by outcome code (google.rpc.Code name)",
            ["code"],
            registry=registry,
        )
        self.reports = Counter("mixer_report", "Report calls", registry=registry)
        self.report_records = Counter(
            "mixer_report_records", "Attribute sets received in Report calls", registry=registry
        )
        self.bad_requests = Counter(
            "mixer_bad_requests",
            "Calls refused as malformed (bad attribute bags)",
            ["method"],
            registry=registry,
        )
        self.dispatch_errors = Counter(
            "mixer_dispatch_errors",
            "Handler calls that raised or timed out",
            ["handler", "reason"],
            registry=registry,
        )
        self.match_errors = Counter(
            "mixer_rule_match_errors",
            "Rule match expressions that could not be evaluated (the rule did not apply)",
            ["rule"],
            registry=registry,
        )
        self.instance_errors = Counter(
            "mixer_instance_errors",
            "Instances that could not be built from a request's attributes",
            ["instance"],
            registry=registry,
        )
        self.config_loads = Counter(
            "mixer_config_loads",
            "Config changes seen, by result: accepted, or rejected (the last good one kept)",
            ["result"],
            registry=registry,
        )
        self.config_rejected = Gauge(
            "mixer_config_rejected",
            "1 while the newest config is rejected and an older one is in force",
            registry=registry,
        )
        self.config_problems = Gauge(
            "mixer_config_problems",
            "Problems found in the newest config (0 when it was accepted)",
            registry=registry,
        )
        self.config_generation = Gauge(
            "mixer_config_generation", "Generation of the config in force", registry=registry
        )
        self.config_objects = Gauge(
            "mixer_config_objects",
            "Rules, handlers and instances in force",
            ["kind"],
            registry=registry,
        )
        self.check_latency = Histogram(
            "mixer_check_duration_seconds",
            "Time to answer a Check",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=registry,
        )
