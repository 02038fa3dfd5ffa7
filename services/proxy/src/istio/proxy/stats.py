"""Envoy-style stats, kept as plain counters the data path bumps, rendered on demand as
Envoy's text `/stats` and as Prometheus (`/stats/prometheus`).

One `HttpStats` per HTTP connection manager (stat prefix) and one `ClusterStats` per cluster;
the hot path does attribute increments and one bisect per request, nothing else.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

# Milliseconds, Envoy's default histogram buckets.
BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.sum = 0.0

    def observe(self, milliseconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_MS, milliseconds)] += 1
        self.sum += milliseconds

    def cumulative(self) -> Iterator[tuple[str, int]]:
        total = 0
        for bound, count in zip((*BUCKETS_MS, float("inf")), self.counts, strict=True):
            total += count
            yield ("+Inf" if bound == float("inf") else f"{bound:g}", total)


class HttpStats:
    """Downstream requests and connections of one connection manager."""

    __slots__ = ("cx_active", "cx_total", "rq_time", "rq_total", "rq_xx")

    def __init__(self) -> None:
        self.cx_total = 0
        self.cx_active = 0
        self.rq_total = 0
        self.rq_xx = [0, 0, 0, 0, 0, 0]  # by status // 100
        self.rq_time = Histogram()

    def completed(self, status: int, milliseconds: float) -> None:
        self.rq_total += 1
        self.rq_xx[min(status // 100, 5)] += 1
        self.rq_time.observe(milliseconds)


class ClusterStats:
    __slots__ = (
        "cx_active",
        "cx_connect_fail",
        "cx_total",
        "ejections_active",
        "ejections_total",
        "rq_active",
        "rq_overflow",
        "rq_pending_active",
        "rq_pending_overflow",
        "rq_retry",
        "rq_retry_overflow",
        "rq_time",
        "rq_timeout",
        "rq_total",
        "rq_xx",
    )

    def __init__(self) -> None:
        self.cx_total = 0
        self.cx_active = 0
        self.cx_connect_fail = 0
        self.rq_total = 0
        self.rq_active = 0
        self.rq_pending_active = 0
        self.rq_pending_overflow = 0
        self.rq_overflow = 0
        self.rq_retry = 0
        self.rq_retry_overflow = 0
        self.rq_timeout = 0
        self.rq_xx = [0, 0, 0, 0, 0, 0]
        self.rq_time = Histogram()
        self.ejections_total = 0
        self.ejections_active = 0

    def completed(self, status: int, milliseconds: float) -> None:
        self.rq_total += 1
        self.rq_xx[min(status // 100, 5)] += 1
        self.rq_time.observe(milliseconds)


_CLUSTER_COUNTERS = (
    "cx_total",
    "cx_connect_fail",
    "rq_total",
    "rq_pending_overflow",
    "rq_overflow",
    "rq_retry",
    "rq_retry_overflow",
    "rq_timeout",
    "ejections_total",
)
_CLUSTER_GAUGES = ("cx_active", "rq_active", "rq_pending_active", "ejections_active")
_CLUSTER_NAMES = {
    "cx_total": "upstream_cx_total",
    "cx_active": "upstream_cx_active",
    "cx_connect_fail": "upstream_cx_connect_fail",
    "rq_total": "upstream_rq_total",
    "rq_active": "upstream_rq_active",
    "rq_pending_active": "upstream_rq_pending_active",
    "rq_pending_overflow": "upstream_rq_pending_overflow",
    "rq_overflow": "upstream_rq_overflow",
    "rq_retry": "upstream_rq_retry",
    "rq_retry_overflow": "upstream_rq_retry_overflow",
    "rq_timeout": "upstream_rq_timeout",
    "ejections_total": "outlier_detection_ejections_total",
    "ejections_active": "outlier_detection_ejections_active",
}


class Stats:
    """Every stat of the process, created on first use by name."""

    def __init__(self) -> None:
        self.http: dict[str, HttpStats] = {}
        self.clusters: dict[str, ClusterStats] = {}
        self.listener_cx: dict[str, int] = {}

    def http_stats(self, prefix: str) -> HttpStats:
        stats = self.http.get(prefix)
        if stats is None:
            stats = self.http[prefix] = HttpStats()
        return stats

    def cluster_stats(self, name: str) -> ClusterStats:
        stats = self.clusters.get(name)
        if stats is None:
            stats = self.clusters[name] = ClusterStats()
        return stats

    def listener_accepted(self, address: str) -> None:
        self.listener_cx[address] = self.listener_cx.get(address, 0) + 1

    def text(self) -> str:
        """Envoy's /stats format: `name: value` lines, sorted."""
        lines = []
        for prefix, http in self.http.items():
            base = f"http.{prefix}"
            lines += [
                f"{base}.downstream_cx_total: {http.cx_total}",
                f"{base}.downstream_cx_active: {http.cx_active}",
                f"{base}.downstream_rq_total: {http.rq_total}",
            ]
            lines += [f"{base}.downstream_rq_{c}xx: {n}" for c, n in enumerate(http.rq_xx) if c]
        for name, cluster in self.clusters.items():
            base = f"cluster.{name}"
            for attribute, stat in _CLUSTER_NAMES.items():
                lines.append(f"{base}.{stat}: {getattr(cluster, attribute)}")
            lines += [f"{base}.upstream_rq_{c}xx: {n}" for c, n in enumerate(cluster.rq_xx) if c]
        for address, count in self.listener_cx.items():
            lines.append(f"listener.{address}.downstream_cx_total: {count}")
        return "\n".join(sorted(lines)) + "\n"

    def prometheus(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def histogram(name: str, labels: str, histogram: Histogram) -> None:
            for bound, count in histogram.cumulative():
                out.append(f'{name}_bucket{{{labels},le="{bound}"}} {count}')
            out.append(f"{name}_sum{{{labels}}} {histogram.sum:g}")
            out.append(f"{name}_count{{{labels}}} {sum(histogram.counts)}")

        http = sorted(self.http.items())
        family("envoy_http_downstream_rq_total", "counter", "Downstream requests")
        for prefix, stats in http:
            out.append(
                f'envoy_http_downstream_rq_total{{envoy_http_conn_manager_prefix="{prefix}"}} '
                f"{stats.rq_total}"
            )
        family("envoy_http_downstream_rq_xx", "counter", "Downstream responses by code class")
        for prefix, stats in http:
            for code_class, count in enumerate(stats.rq_xx):
                if code_class:
                    out.append(
                        "envoy_http_downstream_rq_xx{"
                        f'envoy_http_conn_manager_prefix="{prefix}",'
                        f'envoy_response_code_class="{code_class}"}} {count}'
                    )
        for name, kind, attribute in (
            ("envoy_http_downstream_cx_total", "counter", "cx_total"),
            ("envoy_http_downstream_cx_active", "gauge", "cx_active"),
        ):
            family(name, kind, "Downstream connections")
            for prefix, stats in http:
                value = getattr(stats, attribute)
                out.append(f'{name}{{envoy_http_conn_manager_prefix="{prefix}"}} {value}')
        family("envoy_http_downstream_rq_time", "histogram", "Request time in milliseconds")
        for prefix, http_stats in http:
            histogram(
                "envoy_http_downstream_rq_time",
                f'envoy_http_conn_manager_prefix="{prefix}"',
                http_stats.rq_time,
            )
        clusters = sorted(self.clusters.items())
        for attribute in (*_CLUSTER_COUNTERS, *_CLUSTER_GAUGES):
            name = f"envoy_cluster_{_CLUSTER_NAMES[attribute]}"
            kind = "gauge" if attribute in _CLUSTER_GAUGES else "counter"
            family(name, kind, attribute.replace("_", " "))
            for cluster, cluster_stats in clusters:
                label = _escape(cluster)
                out.append(
                    f'{name}{{envoy_cluster_name="{label}"}} {getattr(cluster_stats, attribute)}'
                )
        family("envoy_cluster_upstream_rq_xx", "counter", "Upstream responses by code class")
        for cluster, cluster_stats in clusters:
            for code_class, count in enumerate(cluster_stats.rq_xx):
                if code_class:
                    out.append(
                        f'envoy_cluster_upstream_rq_xx{{envoy_cluster_name="{_escape(cluster)}",'
                        f'envoy_response_code_class="{code_class}"}} {count}'
                    )
        family("envoy_cluster_upstream_rq_time", "histogram", "Upstream time in milliseconds")
        for cluster, cluster_stats in clusters:
            histogram(
                "envoy_cluster_upstream_rq_time",
                f'envoy_cluster_name="{_escape(cluster)}"',
                cluster_stats.rq_time,
            )
        family("envoy_listener_downstream_cx_total", "counter", "Accepted connections")
        for address, count in sorted(self.listener_cx.items()):
            out.append(
                f'envoy_listener_downstream_cx_total{{envoy_listener_address="{address}"}} {count}'
            )
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
