"""Envoy-style stats, kept as plain counters the data path bumps, rendered on demand as
Envoy's text `/stats` and as Prometheus (`/stats/prometheus`).

One `HttpStats` per HTTP connection manager (stat prefix) and one `ClusterStats` per cluster;
the hot path does attribute increments and one bisect per request, nothing else.

With `--concurrency N` every worker process keeps its own `Stats`; the admin process asks
each for `export()` when scraped and renders the sum (`absorb`), so /stats and
/stats/prometheus count the whole proxy, as Envoy's do across its worker threads.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

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

    def absorb(self, state: dict[str, Any]) -> None:
        for index, count in enumerate(state["counts"]):
            self.counts[index] += count
        self.sum += state["sum"]

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
        "cx_overflow",
        "cx_rx_bytes_total",
        "cx_total",
        "cx_tx_bytes_total",
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
        self.cx_overflow = 0  # TCP: refused by max_connections
        self.cx_rx_bytes_total = 0  # TCP: bytes from the upstream (HTTP does not count them)
        self.cx_tx_bytes_total = 0  # TCP: bytes to the upstream
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


class TcpStats:
    """One tcp_proxy filter (stat prefix): Envoy's `tcp.<prefix>.*`."""

    __slots__ = (
        "cx_active",
        "cx_no_route",
        "cx_rx_bytes_total",
        "cx_total",
        "cx_tx_bytes_total",
        "downstream_paused_reading_total",
        "idle_timeout",
        "upstream_paused_reading_total",
    )

    def __init__(self) -> None:
        self.cx_total = 0
        self.cx_active = 0
        self.cx_no_route = 0
        self.cx_rx_bytes_total = 0  # from the downstream
        self.cx_tx_bytes_total = 0  # to the downstream
        self.idle_timeout = 0
        self.downstream_paused_reading_total = 0  # the upstream could not take more
        self.upstream_paused_reading_total = 0  # the downstream could not take more


_TCP_NAMES = {
    "cx_total": "downstream_cx_total",
    "cx_active": "downstream_cx_active",
    "cx_no_route": "downstream_cx_no_route",
    "cx_rx_bytes_total": "downstream_cx_rx_bytes_total",
    "cx_tx_bytes_total": "downstream_cx_tx_bytes_total",
    "idle_timeout": "idle_timeout",
    "downstream_paused_reading_total": "downstream_flow_control_paused_reading_total",
    "upstream_paused_reading_total": "upstream_flow_control_paused_reading_total",
}
_TCP_GAUGES = ("cx_active",)

# Command names come from the wire: at most this many distinct ones per stat prefix, the rest
# counted as "other", so a hostile client cannot grow the stats without bound.
MAX_COMMANDS = 100


class CommandStats:
    __slots__ = ("error", "success", "time", "total")

    def __init__(self) -> None:
        self.total = 0
        self.success = 0
        self.error = 0
        self.time = Histogram()  # request to reply, milliseconds


class ProtocolStats:
    """What a protocol sniffer (MongoDB, Redis) saw on one filter: counters by name
    (operations, replies, errors) and per-command stats."""

    __slots__ = ("commands", "counters")

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.commands: dict[str, CommandStats] = {}

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def command(self, name: str) -> CommandStats:
        stats = self.commands.get(name)
        if stats is None:
            if len(self.commands) >= MAX_COMMANDS:
                name = "other"
                stats = self.commands.get(name)
            if stats is None:
                stats = self.commands[name] = CommandStats()
        return stats

    def reply(self, name: str, started: float, now: float, *, error: bool) -> None:
        """A reply to command `name`, sent at `started` and answered at `now` (seconds, any
        monotonic clock): its latency and whether it failed."""
        command = self.command(name)
        command.time.observe((now - started) * 1000.0)
        if error:
            command.error += 1
        else:
            command.success += 1


_CLUSTER_COUNTERS = (
    "cx_total",
    "cx_connect_fail",
    "cx_overflow",
    "cx_rx_bytes_total",
    "cx_tx_bytes_total",
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
    "cx_overflow": "upstream_cx_overflow",
    "cx_rx_bytes_total": "upstream_cx_rx_bytes_total",
    "cx_tx_bytes_total": "upstream_cx_tx_bytes_total",
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
        self.tcp: dict[str, TcpStats] = {}
        # Protocol sniffers by kind ("mongo", "redis") and stat prefix.
        self.protocols: dict[str, dict[str, ProtocolStats]] = {}
        # Called whenever the stats are read (text, prometheus, export): each copies counters
        # kept elsewhere (the Mixer clients') in, so that the request path does not count twice.
        self.collectors: list[Callable[[Stats], None]] = []

    def _collect(self) -> None:
        for collect in self.collectors:
            collect(self)

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

    def tcp_stats(self, prefix: str) -> TcpStats:
        stats = self.tcp.get(prefix)
        if stats is None:
            stats = self.tcp[prefix] = TcpStats()
        return stats

    def protocol_stats(self, kind: str, prefix: str) -> ProtocolStats:
        by_prefix = self.protocols.setdefault(kind, {})
        stats = by_prefix.get(prefix)
        if stats is None:
            stats = by_prefix[prefix] = ProtocolStats()
        return stats

    def listener_accepted(self, address: str) -> None:
        self.listener_cx[address] = self.listener_cx.get(address, 0) + 1

    def text(self) -> str:
        """Envoy's /stats format: `name: value` lines, sorted."""
        self._collect()
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
        for prefix, tcp in self.tcp.items():
            for attribute, stat in _TCP_NAMES.items():
                lines.append(f"tcp.{prefix}.{stat}: {getattr(tcp, attribute)}")
        for kind, by_prefix in self.protocols.items():
            group = "command" if kind == "redis" else "cmd"
            for prefix, protocol in by_prefix.items():
                base = f"{kind}.{prefix}"
                lines += [f"{base}.{name}: {value}" for name, value in protocol.counters.items()]
                for command, stats in protocol.commands.items():
                    lines += [
                        f"{base}.{group}.{command}.total: {stats.total}",
                        f"{base}.{group}.{command}.success: {stats.success}",
                        f"{base}.{group}.{command}.error: {stats.error}",
                    ]
        return "\n".join(sorted(lines)) + "\n"

    def prometheus(self) -> str:
        self._collect()
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
        tcp = sorted(self.tcp.items())
        for attribute, stat in _TCP_NAMES.items():
            name = f"envoy_tcp_{stat}"
            family(name, "gauge" if attribute in _TCP_GAUGES else "counter", stat.replace("_", " "))
            for prefix, tcp_stats in tcp:
                value = getattr(tcp_stats, attribute)
                out.append(f'{name}{{envoy_tcp_prefix="{_escape(prefix)}"}} {value}')
        for kind, by_prefix in sorted(self.protocols.items()):
            self._protocol_families(out, family, histogram, kind, by_prefix)
        return "\n".join(out) + "\n"

    @staticmethod
    def _protocol_families(
        out: list[str],
        family: Callable[[str, str, str], None],
        histogram: Callable[[str, str, Histogram], None],
        kind: str,
        by_prefix: dict[str, ProtocolStats],
    ) -> None:
        """`envoy_<kind>_<counter>{envoy_<kind>_prefix}` and per command
        `envoy_<kind>_<cmd|command>_{total,success,error,time}{..., envoy_<kind>_cmd}`."""
        prefixes = sorted(by_prefix.items())
        label = f"envoy_{kind}_prefix"
        for counter in sorted({name for _, stats in prefixes for name in stats.counters}):
            name = f"envoy_{kind}_{counter}"
            family(name, "counter", counter.replace("_", " "))
            for prefix, stats in prefixes:
                value = stats.counters.get(counter, 0)
                out.append(f'{name}{{{label}="{_escape(prefix)}"}} {value}')
        group = "command" if kind == "redis" else "cmd"
        rows = [
            (f'{label}="{_escape(prefix)}",envoy_{kind}_cmd="{_escape(command)}"', command_stats)
            for prefix, stats in prefixes
            for command, command_stats in sorted(stats.commands.items())
        ]
        if not rows:
            return
        for attribute in ("total", "success", "error"):
            name = f"envoy_{kind}_{group}_{attribute}"
            family(name, "counter", f"{group} {attribute}")
            for labels, command_stats in rows:
                out.append(f"{name}{{{labels}}} {getattr(command_stats, attribute)}")
        name = f"envoy_{kind}_{group}_time"
        family(name, "histogram", "Request to reply in milliseconds")
        for labels, command_stats in rows:
            histogram(name, labels, command_stats.time)

    def export(self) -> dict[str, Any]:
        """Every stat as plain JSON-able data, for `absorb` in another process."""
        self._collect()
        return {
            "http": {k: _fields(v) for k, v in self.http.items()},
            "clusters": {k: _fields(v) for k, v in self.clusters.items()},
            "listener_cx": dict(self.listener_cx),
            "tcp": {k: _fields(v) for k, v in self.tcp.items()},
            "protocols": {
                kind: {
                    prefix: {
                        "counters": dict(stats.counters),
                        "commands": {n: _fields(c) for n, c in stats.commands.items()},
                    }
                    for prefix, stats in by_prefix.items()
                }
                for kind, by_prefix in self.protocols.items()
            },
        }

    def absorb(self, state: dict[str, Any]) -> None:
        """Adds another process's `export()` to these stats: counters, gauges and histogram
        buckets all sum (a gauge such as active connections is the whole proxy's)."""
        for prefix, fields in state["http"].items():
            _add(self.http_stats(prefix), fields)
        for name, fields in state["clusters"].items():
            _add(self.cluster_stats(name), fields)
        for address, count in state["listener_cx"].items():
            self.listener_cx[address] = self.listener_cx.get(address, 0) + count
        for prefix, fields in state["tcp"].items():
            _add(self.tcp_stats(prefix), fields)
        for kind, by_prefix in state["protocols"].items():
            for prefix, protocol in by_prefix.items():
                stats = self.protocol_stats(kind, prefix)
                for name, amount in protocol["counters"].items():
                    stats.count(name, amount)
                for name, fields in protocol["commands"].items():
                    _add(stats.command(name), fields)


_Record = HttpStats | ClusterStats | TcpStats | CommandStats


def _fields(record: _Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in record.__slots__:
        value = getattr(record, name)
        if isinstance(value, Histogram):
            value = {"counts": list(value.counts), "sum": value.sum}
        elif isinstance(value, list):
            value = list(value)
        out[name] = value
    return out


def _add(record: _Record, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if name not in record.__slots__:
            continue  # a field a newer worker has and this process does not: never fatal
        current = getattr(record, name)
        if isinstance(current, Histogram):
            current.absorb(value)
        elif isinstance(current, list):
            for index, amount in enumerate(value[: len(current)]):
                current[index] += amount
        else:
            setattr(record, name, current + value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
