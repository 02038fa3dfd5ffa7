"""Tracing as Envoy's Zipkin tracer does it: B3 headers created or propagated, one span per
request per proxy, spans sent in Zipkin v2 JSON to a collector.

No tracing SDK here, for the data plane's memory: a span is a small record turned into JSON
in batches off the request path.

What a proxy does with a request (Envoy's `shared_span_context`, Zipkin's model):

- **outbound** (a sidecar's 15001 and the gateways): a CLIENT span with a new span id whose
  parent is the caller's span (if it sent one); the request goes on carrying the new span id
  as `x-b3-spanid` and the caller's as `x-b3-parentspanid`;
- **inbound** (a sidecar in front of its app): a SERVER span that shares the id of the client
  span that called it (the same `x-b3-spanid`, marked `shared`), so the two proxies' views of
  one call join in the trace; the headers go on unchanged. With no caller span (a client
  without a sidecar) it starts its own.

A request without `x-b3-traceid` starts a trace: 64-bit or 128-bit trace id, and a sampling
decision made once, here, from the configured percentage; `x-b3-sampled` and `x-b3-flags: 1`
(debug, always sampled) from the caller are honoured, as is `x-envoy-force-trace`. Unsampled
requests still get their ids, so the decision travels with them, and no span is recorded.
`x-ot-span-context` (`traceid;spanid;parentspanid;cs`) is kept in step with the B3 headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TRACE_ID = b"x-b3-traceid"
SPAN_ID = b"x-b3-spanid"
PARENT_SPAN_ID = b"x-b3-parentspanid"
SAMPLED = b"x-b3-sampled"
FLAGS = b"x-b3-flags"
OT_SPAN_CONTEXT = b"x-ot-span-context"
FORCE_TRACE = b"x-envoy-force-trace"
B3_HEADERS = frozenset({TRACE_ID, SPAN_ID, PARENT_SPAN_ID, SAMPLED, FLAGS, OT_SPAN_CONTEXT})
_HEX = frozenset(b"0123456789abcdef")

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """One connection manager's tracing, from its `tracing` and the Zipkin provider. Whether
    its spans are CLIENT or SERVER spans comes from the listener's traffic direction."""

    sampling_ppm: int = 1_000_000  # random_sampling, in millionths (Envoy's default 100%)
    collector_cluster: str = ""
    collector_endpoint: str = "/api/v2/spans"
    trace_id_128bit: bool = False
    shared_span_context: bool = True


@dataclass(slots=True)
class Span:
    """What the request path fills in; `Tracer.finish` makes it Zipkin JSON."""

    trace_id: str
    id: str
    parent_id: str | None
    kind: str  # "CLIENT" or "SERVER"
    shared: bool
    sampled: bool
    debug: bool
    start_us: int
    name: str = ""
    tags: dict[str, str] | None = None


def _new_id(bits: int = 64) -> str:
    return f"{random.getrandbits(bits):0{bits // 4}x}"


def _valid_id(value: bytes | None, *lengths: int) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) not in lengths or not _HEX.issuperset(value):
        return None
    return value.decode()


def _header(headers: Sequence[Header], name: bytes) -> bytes | None:
    for key, value in headers:
        if len(key) == len(name) and key.lower() == name:
            return value
    return None


def start_span(
    config: TracingConfig,
    headers: Sequence[Header],
    *,
    outbound: bool,
    now_us: int | None = None,
) -> Span:
    """The span this proxy records for a request with `headers` (in any case, as they came):
    a CLIENT span when `outbound` (sidecar outbound, gateways), else a SERVER span."""
    trace_id = _valid_id(_header(headers, TRACE_ID), 16, 32)
    caller_span = _valid_id(_header(headers, SPAN_ID), 16) if trace_id else None
    caller_parent = _valid_id(_header(headers, PARENT_SPAN_ID), 16) if caller_span else None
    flags = _header(headers, FLAGS)
    debug = flags is not None and flags.strip() == b"1"
    sampled_header = _header(headers, SAMPLED)
    if debug or _header(headers, FORCE_TRACE) is not None:
        sampled = True
    elif trace_id is not None and sampled_header is not None:
        sampled = sampled_header.strip().lower() in (b"1", b"true", b"d")
    else:
        sampled = random.randrange(1_000_000) < config.sampling_ppm
    start = now_us if now_us is not None else time.time_ns() // 1000
    if trace_id is None:
        trace_id = _new_id(128 if config.trace_id_128bit else 64)
    if not outbound and caller_span is not None and config.shared_span_context:
        return Span(trace_id, caller_span, caller_parent, "SERVER", True, sampled, debug, start)
    kind = "CLIENT" if outbound else "SERVER"
    return Span(trace_id, _new_id(), caller_span, kind, False, sampled, debug, start)


def child_span(parent: Span, name: str, *, start_us: int) -> Span:
    """A CLIENT span under `parent` for a call this proxy makes on the request's behalf (its
    Mixer Check), sampled as the request is."""
    return Span(
        parent.trace_id,
        _new_id(),
        parent.id,
        "CLIENT",
        False,
        parent.sampled,
        parent.debug,
        start_us,
        name,
    )


def propagate(span: Span, headers: Iterable[Header]) -> list[Header]:
    """`headers` with the B3 headers (and x-ot-span-context) set for this span's callee."""
    out = [(k, v) for k, v in headers if k.lower() not in B3_HEADERS]
    out.append((TRACE_ID, span.trace_id.encode()))
    out.append((SPAN_ID, span.id.encode()))
    if span.parent_id:
        out.append((PARENT_SPAN_ID, span.parent_id.encode()))
    out.append((SAMPLED, b"1" if span.sampled else b"0"))
    if span.debug:
        out.append((FLAGS, b"1"))
    context = f"{span.trace_id};{span.id};{span.parent_id or ''};cs"
    out.append((OT_SPAN_CONTEXT, context.encode()))
    return out


def zipkin_json(span: Span, duration_us: int, service_name: str) -> dict[str, Any]:
    """Zipkin v2's span model (zipkin2 api v2 `Span`)."""
    body: dict[str, Any] = {
        "traceId": span.trace_id,
        "id": span.id,
        "kind": span.kind,
        "name": span.name or "-",
        "timestamp": span.start_us,
        "duration": max(duration_us, 1),
        "localEndpoint": {"serviceName": service_name},
        "tags": span.tags or {},
    }
    if span.parent_id:
        body["parentId"] = span.parent_id
    if span.shared:
        body["shared"] = True
    if span.debug:
        body["debug"] = True
    return body


class Tracer:
    """Finished spans, batched and posted to the collector in the background.

    The queue is bounded: when the collector is slow or gone, the oldest spans are dropped
    and counted, and requests never wait for it."""

    MAX_QUEUED = 10_000
    BATCH = 100
    FLUSH_INTERVAL = 1.0

    def __init__(
        self, send: Callable[[str, str, bytes], Any], service_name: str = "istio-proxy"
    ) -> None:
        # send(cluster, path, body) -> awaitable that posts one batch (see `post_json`)
        self._send = send
        self.service_name = service_name  # Zipkin's localEndpoint, Envoy's --service-cluster
        self._queue: deque[tuple[str, str, dict[str, Any]]] = deque(maxlen=self.MAX_QUEUED)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0
        self.failed_batches = 0

    def finish(self, config: TracingConfig, span: Span, end_us: int | None = None) -> None:
        if not span.sampled:
            return
        end = end_us if end_us is not None else time.time_ns() // 1000
        if len(self._queue) == self.MAX_QUEUED:
            self.dropped += 1
        body = zipkin_json(span, end - span.start_us, self.service_name)
        self._queue.append((config.collector_cluster, config.collector_endpoint, body))
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._queue) >= self.BATCH and self._wake is not None:
            self._wake.set()

    async def flush(self) -> None:
        """Send everything queued now (tests, shutdown)."""
        while self._queue:
            await self._send_batch()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.FLUSH_INTERVAL)
            self._wake.clear()
            while self._queue:
                await self._send_batch()

    async def _send_batch(self) -> None:
        batch: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for _ in range(min(self.BATCH, len(self._queue))):
            cluster, path, body = self._queue.popleft()
            batch.setdefault((cluster, path), []).append(body)
        for (cluster, path), spans in batch.items():
            try:
                await self._send(cluster, path, json.dumps(spans).encode())
                self.sent += len(spans)
            except Exception as error:  # the collector is optional: never fatal
                self.failed_batches += 1
                self.dropped += len(spans)
                log.warning("sending %d spans to %s failed: %s", len(spans), cluster, error)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


async def post_json(host: str, port: int, path: str, body: bytes, within: float = 5.0) -> None:
    """One HTTP/1.1 POST; raises unless the answer is 2xx (Zipkin answers 202)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        status_line = await asyncio.wait_for(reader.readline(), within)
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].startswith(b"2"):
            raise ConnectionError(f"collector answered {status_line.decode(errors='replace')!r}")
    finally:
        writer.close()
