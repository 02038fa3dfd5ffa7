"""What every connection of the data path shares: the current snapshot, the live clusters,
stats, the access log and the limits."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from istio.proxy.config import Snapshot
from istio.proxy.stats import Stats
from istio.proxy.tracing import Tracer, post_json
from istio.proxy.upstream import ClusterManager, Resolver


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # Envoy's max_request_headers_kb default: 431 beyond
    header_timeout: float = 10.0  # from a request's first byte to its last header: 408
    idle_timeout: float = 300.0  # a keep-alive connection without a request is closed
    buffer_bytes: int = 64 * 1024  # per-request buffering (retries, pipelining): pause beyond
    drain_timeout: float = 5.0  # a removed listener's connections are closed after this
    max_pipelined: int = 16  # queued requests on one connection before reading pauses


class AccessLog:
    """JSON lines, one per request, flushed once a second (and at exit)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._flush: asyncio.TimerHandle | None = None

    @classmethod
    def open(cls, target: str) -> AccessLog | None:
        if target in ("", "off"):
            return None
        if target in ("-", "/dev/stdout"):
            return cls(sys.stdout)
        if target == "/dev/stderr":
            return cls(sys.stderr)
        return cls(open(target, "a", buffering=1 << 16))

    def write(self, entry: dict[str, Any]) -> None:
        self.stream.write(json.dumps(entry, separators=(",", ":")) + "\n")
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        self._flush = None
        self.stream.flush()


class Context:
    def __init__(
        self,
        *,
        limits: Limits | None = None,
        resolver: Resolver | None = None,
        access_log: AccessLog | None = None,
        service_name: str = "istio-proxy",
        node_id: str = "",
        mixer_reports: str = "inline",
    ) -> None:
        self.snapshot = Snapshot()
        self.stats = Stats()
        self.resolver = resolver or Resolver()
        self.clusters = ClusterManager(self.stats, self.resolver)
        self.limits = limits or Limits()
        self.access_log = access_log
        # Spans go to the collector cluster a connection manager's tracing names, through
        # this proxy's own view of that cluster's hosts.
        self.tracer = Tracer(self._send_spans, service_name)
        # Mixer clients by address (istio.proxy.mixer.Mixers), made when a listener has Mixer.
        self.mixers: Any = None
        # Where Mixer Reports are made and sent: "process" (a reporter process) or "inline".
        self.mixer_reports = mixer_reports
        self.node_id = node_id
        # The x-istio-attributes value outbound requests carry (this sidecar's source.uid and
        # source.ip, for the server sidecar's Mixer); b"" while Pilot says Mixer is not there.
        self.istio_attributes = b""

    def _forward_attributes(self, snapshot: Snapshot) -> bytes:
        if not self.node_id or not any(
            listener.forward_attributes for listener in snapshot.listeners.values()
        ):
            return b""
        if self.istio_attributes:
            return self.istio_attributes
        from istio.proxy.mixer import forward_header  # only where Mixer is

        return forward_header(self.node_id)

    def apply(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current: clusters first, so that no request routed by the new
        snapshot finds its cluster missing."""
        self.clusters.apply(snapshot.clusters, snapshot.endpoints)
        self.istio_attributes = self._forward_attributes(snapshot)
        self.snapshot = snapshot

    async def _send_spans(self, cluster_name: str, path: str, body: bytes) -> None:
        cluster = self.clusters.clusters.get(cluster_name)
        if cluster is None:
            raise LookupError(f"no cluster {cluster_name}")
        host = cluster.pick()
        if host is None:
            raise LookupError(f"cluster {cluster_name} has no healthy host")
        await post_json(host.address[0], host.address[1], path, body)
