"""prometheus: metric instances as Prometheus counters, gauges and histograms, served on the
adapters' /metrics port (42422).

Metric names are exposed exactly as configured (`request_count`, not `request_count_total`,
as 0.2's Go client exposed them), with one label per `label_names` entry, its value the
instance's dimension of that name. The series live in collectors kept per registry and
metric name, and shared by every handler that defines the metric the same way: a reload
that keeps a metric keeps its counts; a changed definition starts it afresh; a metric no live
handler defines leaves /metrics.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from istio.mixersdk import AdapterInfo, Env, MetricInstance
from istio.mixersdk.builtin import PROMETHEUS
from istio.mixersdk.render import number, text


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    kind: str
    description: str
    label_names: tuple[str, ...]
    buckets: tuple[float, ...] = ()


def buckets_from(spec: dict[str, Any] | None) -> tuple[float, ...]:
    """The finite upper bounds of a DISTRIBUTION's buckets (Istio's linear, exponential or
    explicit; Prometheus' default bounds when none is given)."""
    if not spec:
        return (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    if spec.get("linear_buckets"):
        linear = spec["linear_buckets"]
        return tuple(
            linear["offset"] + linear["width"] * i for i in range(linear["num_finite_buckets"] + 1)
        )
    if spec.get("exponential_buckets"):
        exponential = spec["exponential_buckets"]
        return tuple(
            exponential["scale"] * exponential["growth_factor"] ** i
            for i in range(exponential["num_finite_buckets"] + 1)
        )
    return tuple(sorted(spec["explicit_buckets"]["bounds"]))


@dataclass(slots=True)
class _Series:
    value: float = 0.0
    counts: list[int] = field(default_factory=list)
    total: int = 0


class MetricCollector(Collector):
    """One metric's series (label values -> value or histogram)."""

    def __init__(self, definition: Definition) -> None:
        self.definition = definition
        self.series: dict[tuple[str, ...], _Series] = {}
        self.users = 0
        self._lock = threading.Lock()  # collect() runs in the exposition thread

    def record(self, labels: tuple[str, ...], value: float) -> None:
        self.record_many(labels, (value,))

    def record_many(self, labels: tuple[str, ...], values: Sequence[float]) -> None:
        """`values` into one series, in order (as many `record` calls, under one lock)."""
        definition = self.definition
        with self._lock:
            series = self.series.get(labels)
            if series is None:
                series = self.series[labels] = _Series(counts=[0] * (len(definition.buckets) + 1))
            if definition.kind == "COUNTER":
                total = series.value
                for value in values:
                    total += value
                series.value = total
            elif definition.kind == "GAUGE":
                series.value = values[-1]
            else:
                buckets, counts, total = definition.buckets, series.counts, series.value
                for value in values:
                    counts[bisect.bisect_left(buckets, value)] += 1
                    total += value
                series.value = total
                series.total += len(values)

    def collect(self) -> Iterator[Metric]:
        definition = self.definition
        kind = {"COUNTER": "counter", "GAUGE": "gauge"}.get(definition.kind, "histogram")
        metric = Metric(definition.name, definition.description or definition.name, kind)
        with self._lock:
            items = [
                (labels, _Series(s.value, list(s.counts), s.total))
                for labels, s in self.series.items()
            ]
        names = definition.label_names
        for labels, series in sorted(items):
            base = dict(zip(names, labels, strict=True))
            if kind != "histogram":
                metric.add_sample(definition.name, base, series.value)
                continue
            cumulative = 0
            for bound, count in zip((*definition.buckets, math.inf), series.counts, strict=True):
                cumulative += count
                bucket = "+Inf" if bound == math.inf else repr(float(bound))
                metric.add_sample(f"{definition.name}_bucket", {**base, "le": bucket}, cumulative)
            metric.add_sample(f"{definition.name}_count", base, series.total)
            metric.add_sample(f"{definition.name}_sum", base, series.value)
        yield metric


_COLLECTORS: WeakKeyDictionary[CollectorRegistry, dict[str, MetricCollector]] = WeakKeyDictionary()
_LOCK = threading.Lock()


def _acquire(registry: CollectorRegistry, definition: Definition) -> MetricCollector:
    with _LOCK:
        collectors = _COLLECTORS.setdefault(registry, {})
        current = collectors.get(definition.name)
        if current is not None and current.definition == definition:
            current.users += 1
            return current
        if current is not None:
            registry.unregister(current)
        collector = MetricCollector(definition)
        registry.register(collector)
        collector.users = 1
        collectors[definition.name] = collector
        return collector


def _release(registry: CollectorRegistry, collector: MetricCollector) -> None:
    with _LOCK:
        collector.users -= 1
        collectors = _COLLECTORS.get(registry, {})
        if collector.users == 0 and collectors.get(collector.definition.name) is collector:
            registry.unregister(collector)
            del collectors[collector.definition.name]


def _label(value: object) -> str:
    return value if type(value) is str else text(value)  # type: ignore[arg-type]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def text_format(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format, every family under its own name (the
    client library would print a counter's TYPE line as `<name>_total`, which 0.2's
    `request_count` is not)."""
    lines: list[str] = []
    for family in registry.collect():
        lines.append(f"# HELP {family.name} {family.documentation.replace(chr(10), ' ')}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
            braces = f"{{{labels}}}" if labels else ""
            lines.append(f"{sample.name}{braces} {_number(sample.value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


class PrometheusHandler:
    def __init__(self, params: dict[str, Any], env: Env) -> None:
        registry = env.prometheus_registry
        if not isinstance(registry, CollectorRegistry):
            raise ValueError("Mixer gave no Prometheus registry to serve metrics from")
        self.registry = registry
        self.env = env
        self.by_instance: dict[str, list[MetricCollector]] = {}
        self._resolved: dict[str, list[MetricCollector]] = {}  # _targets' answers
        self.collectors: list[MetricCollector] = []
        try:
            for metric in params["metrics"]:
                definition = Definition(
                    metric["name"],
                    metric["kind"],
                    metric["description"],
                    tuple(metric["label_names"]),
                    buckets_from(metric["buckets"]) if metric["kind"] == "DISTRIBUTION" else (),
                )
                collector = _acquire(registry, definition)
                self.collectors.append(collector)
                self.by_instance.setdefault(metric["instance_name"], []).append(collector)
        except Exception:
            self._release_all()
            raise

    def _targets(self, instance_name: str) -> list[MetricCollector]:
        found = self._resolved.get(instance_name)
        if found is None:
            found = self.by_instance.get(instance_name)
            if found is None:
                found = self.by_instance.get(instance_name.split(".", 1)[0], [])
            if len(self._resolved) >= 1024:  # instance names come from config: few
                self._resolved.clear()
            self._resolved[instance_name] = found
        return found

    def handle_metric(self, instances: Sequence[MetricInstance]) -> None:
        """Every instance's value into its metrics' series. A Report's instances mostly fall
        in few series: the values are gathered per series and recorded together, in order."""
        gathered: dict[tuple[MetricCollector, tuple[str, ...]], list[float]] = {}
        # Instances of one request share their dimensions map (see InstanceBuilder.build):
        # its labels are made once per metric's label names. Keyed by id(); the instances
        # keep the maps alive for this call.
        labels_of: dict[tuple[int, tuple[str, ...]], tuple[str, ...]] = {}
        resolved = self._resolved
        try:
            for instance in instances:
                targets = resolved.get(instance.name)
                if targets is None:
                    targets = self._targets(instance.name)
                if not targets:
                    continue
                value = number(instance.value)
                dimensions = instance.dimensions
                for collector in targets:
                    names = collector.definition.label_names
                    labels_key = (id(dimensions), names)
                    labels = labels_of.get(labels_key)
                    if labels is None:
                        labels = labels_of[labels_key] = tuple(
                            [_label(dimensions.get(n)) for n in names]
                        )
                    series_key = (collector, labels)
                    found = gathered.get(series_key)
                    if found is None:
                        gathered[series_key] = [value]
                    else:
                        found.append(value)
        finally:  # what came before a bad instance is recorded, as one by one it would be
            for (collector, labels), values in gathered.items():
                collector.record_many(labels, values)

    def _release_all(self) -> None:
        for collector in self.collectors:
            _release(self.registry, collector)
        self.collectors = []

    async def close(self) -> None:
        self._release_all()


async def build(params: dict[str, Any], env: Env) -> PrometheusHandler:
    return PrometheusHandler(params, env)


INFO = AdapterInfo(
    name="prometheus",
    description="Metrics as Prometheus counters, gauges and histograms on :42422/metrics",
    build=build,
    templates=frozenset({"metric"}),
    params=PROMETHEUS,
)
