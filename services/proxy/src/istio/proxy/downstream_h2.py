"""HTTP/2 from clients: h2c with prior knowledge, or h2 chosen by ALPN inside TLS. A
connection becomes `H2Downstream` when its first bytes are the HTTP/2 preface
(`HttpConnection` looks, so plaintext, mTLS and permissive ports all serve both versions).

Theory of operation. The codec (istio.http2) turns bytes into events; each request stream is a
`StreamExchange`, the HTTP/1.1 `Exchange` with its client side spoken in frames: routing,
faults, retries, timeouts, Mixer, tracing, stats and the upstream side (HTTP/1.1 or HTTP/2,
translated where they differ) are the same code. Streams are independent: a slow upstream
holds back its own stream only.

Flow control. Request bytes are acknowledged (their window credit returned) as the exchange
takes them: while it cannot (no upstream yet beyond the retry buffer, or the upstream's writes
are backed up) credit is withheld and the client stops at that stream's window. Response bytes
the client has no window for wait in the codec; past `PAUSE_PENDING` the upstream's reading
pauses until WINDOW_UPDATEs drain them, and it pauses for every stream while the socket's
write buffer is full.

gRPC. Replies this proxy makes itself to a gRPC request (faults, no route, overflow, timeouts,
Mixer denials) are gRPC's trailers-only responses: HTTP 200 with grpc-status (Envoy's mapping
of the HTTP status; DEADLINE_EXCEEDED when the caller's grpc-timeout ran out) and
grpc-message. Upstream trailers reach the client as trailers.

Protections are the codec's (docs/http2.md): malformed frames, HPACK bombs, CONTINUATION and
control-frame floods, rapid reset and stream floods end that connection with the right GOAWAY
or that stream with RST_STREAM; every other connection is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from typing import TYPE_CHECKING, cast

from istio.http2 import (
    ConnectionTerminated,
    Data,
    ErrorCode,
    H2Connection,
    H2Error,
    HeadersReceived,
    Settings,
    StreamReset,
    Trailers,
    WindowUpdated,
)
from istio.proxy.config import HttpManager, Listener
from istio.proxy.http import (
    GRPC_DEADLINE_EXCEEDED,
    GRPC_UNKNOWN,
    HOP_BY_HOP,
    HTTP_TO_GRPC,
    Exchange,
    HttpConnection,
    find_manager,
    grpc_timeout,
)
from istio.proxy.writes import CorkedFrames

if TYPE_CHECKING:
    from istio.proxy.context import Context
    from istio.proxy.stats import HttpStats
    from istio.proxy.tls import PeerIdentity

Address = tuple[str, int]

# Response bytes waiting for the client's window beyond which the upstream's reading pauses.
PAUSE_PENDING = 256 * 1024
SETTINGS = Settings(
    initial_window_size=1 << 20,
    connection_window=4 << 20,
    max_concurrent_streams=1024,
)
_GRPC_CONTENT_TYPE = b"application/grpc"


class H2Downstream(CorkedFrames, asyncio.Protocol):
    """One client connection speaking HTTP/2. It offers the members an `Exchange` reads of
    its connection (context, listener, stats, peer, identity, manager, cork, ...)."""

    def __init__(
        self,
        context: Context,
        listener: Listener | None,
        *,
        original_dst: Address | None,
        registry: set[asyncio.Protocol] | None,
        peer_identity: PeerIdentity | None,
        xfcc: bytes | None,
        stats: HttpStats | None,
    ) -> None:
        self.context = context
        self.listener = listener
        self.original_dst = original_dst
        self.registry = registry
        self.peer_identity = peer_identity
        self.xfcc = xfcc
        self.stats = stats  # counted already by the connection that handed this one over
        self.loop = asyncio.get_running_loop()
        self.h2 = H2Connection(client=False, settings=SETTINGS)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamExchange] = {}
        self.peer = ""
        self.corked = False
        self.closed = False
        self.draining = False
        self.write_paused = False
        self.send_scheduled = False
        self.idle_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        if self.registry is not None:
            self.registry.add(self)
        self.h2.initiate()
        self.flush()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.registry is not None:
            self.registry.discard(self)
        if self.stats is not None:
            self.stats.cx_active -= 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        streams, self.streams = self.streams, {}
        for exchange in streams.values():
            exchange.abort("downstream connection closed")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        corked = self.cork()
        try:
            for event in self.h2.receive(data):
                if isinstance(event, Data):
                    self._data(event)
                elif isinstance(event, HeadersReceived):
                    self._request(event.stream_id, event.headers, event.end_stream)
                elif isinstance(event, Trailers):  # request trailers: not forwarded
                    exchange = self.streams.get(event.stream_id)
                    if exchange is not None and not exchange.request_done:
                        exchange.request_end()
                elif isinstance(event, StreamReset):
                    exchange = self.streams.pop(event.stream_id, None)
                    if exchange is not None:
                        exchange.abort("downstream reset the stream")
                elif isinstance(event, WindowUpdated):
                    self._window(event.stream_id)
                elif isinstance(event, ConnectionTerminated):
                    self._terminated(event)
        finally:
            if corked:
                self.uncork()

    def pause_writing(self) -> None:
        self.write_paused = True
        for exchange in list(self.streams.values()):
            exchange.downstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._window(0)

    # events

    def _request(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        exchange = StreamExchange(self, stream_id)
        authority = b""
        cookies = []
        regular = exchange.headers
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    exchange.method = value
                elif name == b":path":
                    exchange.target = value
                elif name == b":authority":
                    authority = value
            elif name == b"cookie":  # split for compression (RFC 9113 §8.2.3): one again
                cookies.append(value)
            else:
                regular.append((name, value))
                if name == b"content-length":
                    exchange.length = int(value)
                elif name == b"host" and not authority:
                    authority = value
                elif name == b"content-type":
                    exchange.grpc = value.startswith(_GRPC_CONTENT_TYPE)
                elif name == b"grpc-timeout":
                    exchange.deadline = grpc_timeout(value.strip())
        if cookies:
            regular.append((b"cookie", b"; ".join(cookies)))
        exchange.h2_authority = authority.decode("latin-1")
        exchange.head_request = exchange.method == b"HEAD"
        exchange.headers_done = True
        if end_stream:
            exchange.length = 0
            exchange.request_done = True
        self.streams[stream_id] = exchange
        exchange.start()

    def _data(self, event: Data) -> None:
        exchange = self.streams.get(event.stream_id)
        if exchange is None or exchange.request_done:
            self.h2.acknowledge(event.stream_id, event.flow_length)
            return
        if event.data:
            exchange.request_body(event.data)
        exchange.consumed(event.flow_length)
        if event.end_stream:
            exchange.request_end()

    def _window(self, stream_id: int) -> None:
        """Credit arrived (or the socket drained): resume upstreams whose bytes now fit."""
        if self.write_paused:
            return
        if stream_id:
            exchange = self.streams.get(stream_id)
            if exchange is not None:
                exchange.sending_room()
            return
        for exchange in list(self.streams.values()):
            exchange.sending_room()

    def _terminated(self, event: ConnectionTerminated) -> None:
        if not event.remote:  # the client broke the protocol: GOAWAY is queued, close
            self.corked = False
            self.flush()
            self.close()
            return
        self.draining = True  # the client's GOAWAY: finish what is in flight
        if not self.streams:
            self.close()

    # what exchanges call

    def exchange_done(self, exchange: Exchange) -> None:
        stream_id = cast(StreamExchange, exchange).stream_id
        if self.streams.get(stream_id) is exchange:
            del self.streams[stream_id]
        if not exchange.request_done:
            # answered before the client finished sending: it may stop now (§8.1)
            self.h2.reset_stream(stream_id, ErrorCode.NO_ERROR)
            self.flush()
        if not self.streams:
            if self.draining:
                self.close()
            else:
                self._arm_idle()

    def manager(self, port: int) -> tuple[HttpManager | None, str]:
        return find_manager(self.context, self.listener, port)

    def set_read_paused(self, reason: str, paused: bool) -> None:
        """Whole-connection reading never pauses for one request: streams use windows."""

    def write(self, data: bytes) -> None:
        raise AssertionError("HTTP/1.1 bytes written to an HTTP/2 connection")

    def _arm_idle(self) -> None:
        if self.idle_timer is None and not self.closed:
            self.idle_timer = self.loop.call_later(self.context.limits.idle_timeout, self.drain)

    def drain(self) -> None:
        """The listener is going away (or the connection idled): GOAWAY, finish what is in
        flight, then close."""
        self.draining = True
        if not self.h2.closed:
            self.h2.close()
            self.flush()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.corked = False
            self.send_queued()
            self.closed = True
            self.transport.close()

    def reset(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()


class StreamExchange(Exchange):
    """One request stream of an `H2Downstream`: an `Exchange` that answers in frames."""

    __slots__ = (
        "deadline",
        "downstream",
        "grpc",
        "h2_authority",
        "request_pauses",
        "send_paused",
        "stream_id",
        "withheld",
    )

    def __init__(self, downstream: H2Downstream, stream_id: int) -> None:
        # The shared code reads only what H2Downstream offers of an HttpConnection; the
        # HTTP/1.1-only paths (pipelining, upgrades, 100-continue) are never taken here.
        super().__init__(cast(HttpConnection, downstream))
        self.downstream = downstream
        self.stream_id = stream_id
        self.version = "2"
        self.length = None
        self.h2_authority = ""
        self.grpc = False
        self.deadline: float | None = None  # grpc-timeout, in seconds
        self.request_pauses: set[str] = set()
        self.withheld = 0  # request bytes taken but not yet acknowledged
        self.send_paused = False

    # the request side

    def _authority_and_path(self) -> tuple[str, str]:
        return self.h2_authority, self.target.decode("latin-1")

    def _grpc_timeout(self) -> float | None:
        return self.deadline

    def consumed(self, flow_length: int) -> None:
        if self.request_pauses:
            self.withheld += flow_length
        else:
            self.downstream.h2.acknowledge(self.stream_id, flow_length)

    def _pause_request(self, reason: str, paused: bool) -> None:
        if paused:
            self.request_pauses.add(reason)
            return
        self.request_pauses.discard(reason)
        if not self.request_pauses and self.withheld:
            held, self.withheld = self.withheld, 0
            self.downstream.h2.acknowledge(self.stream_id, held)
            self.downstream.flush()

    # the response side

    def _commit(self) -> None:
        self.committed = True
        self.status = self.response_status
        downstream = self.downstream
        connection_tokens = {
            token.strip().lower()
            for name, value in self.response_head
            if name.lower() == b"connection"
            for token in value.split(b",")
        }
        headers = [(b":status", b"%d" % self.status)]
        for name, value in self.response_head:
            lower = name.lower()
            if lower not in HOP_BY_HOP and lower not in connection_tokens:
                headers.append((lower, value))
        body, self.response_body = self.response_body, []
        only_headers = self.response_done and not body and not self.response_trailers
        corked = downstream.cork()
        try:
            if not self._send_headers(headers, only_headers):
                return
            for chunk in body:
                self.on_response_body(chunk)
            if self.response_done:
                self._end_response()
            elif self.response_reset:
                self.flags = "UR"
                self._complete(reset=True)
        finally:
            if corked:
                downstream.uncork()

    def on_response_body(self, data: bytes) -> None:
        if not self.committed:
            self.response_body.append(data)
            return
        if self.finished or self.head_request:
            return
        self.bytes_sent += len(data)
        downstream = self.downstream
        try:
            downstream.h2.send_data(self.stream_id, data)
        except H2Error:
            return  # the client reset the stream: abort() follows
        downstream.flush()
        if not self.send_paused and downstream.h2.pending(self.stream_id) > PAUSE_PENDING:
            self.send_paused = True
            if self.upstream is not None:
                self.upstream.pause_reading(True)

    def sending_room(self) -> None:
        if self.send_paused and self.downstream.h2.pending(self.stream_id) <= PAUSE_PENDING:
            self.send_paused = False
            if self.upstream is not None:
                self.upstream.pause_reading(False)

    def downstream_write_paused(self, paused: bool) -> None:
        if paused:
            if self.upstream is not None:
                self.upstream.pause_reading(True)
            self.send_paused = True
        else:
            self.sending_room()

    def _finish_body(self) -> None:
        if self.finished:
            return
        downstream = self.downstream
        stream = downstream.h2.streams.get(self.stream_id)
        if stream is None or stream.local_closed or stream.end_pending:
            return  # ended with the headers
        try:
            if self.response_trailers:
                trailers = [(name.lower(), value) for name, value in self.response_trailers]
                downstream.h2.send_headers(self.stream_id, trailers, end_stream=True)
            else:
                downstream.h2.end_stream(self.stream_id)
        except H2Error:
            return
        downstream.flush()

    def _write_local_reply(
        self,
        status: int,
        body: str,
        overloaded: bool,
        extra: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        overload = [(b"x-envoy-overloaded", b"true")] if overloaded else []
        if self.grpc:
            # gRPC's trailers-only response: the status travels in grpc-status
            code = HTTP_TO_GRPC.get(status, GRPC_UNKNOWN)
            if status == 504 and self.grpc_deadline:
                code = GRPC_DEADLINE_EXCEEDED
            message = urllib.parse.quote(body.strip(), safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")
            headers = [
                (b":status", b"200"),
                (b"content-type", _GRPC_CONTENT_TYPE),
                (b"grpc-status", b"%d" % code),
                (b"grpc-message", message.encode()),
                *overload,
                *extra,
            ]
            self._send_headers(headers, True)
        else:
            payload = body.encode()
            headers = [(b":status", b"%d" % status), (b"content-length", b"%d" % len(payload))]
            if payload:
                headers.append((b"content-type", b"text/plain"))
            headers += overload
            headers += extra
            with_body = bool(payload) and not self.head_request
            if self._send_headers(headers, not with_body) and with_body:
                self.bytes_sent += len(payload)
                with contextlib.suppress(H2Error):  # the client reset it: abort() follows
                    self.downstream.h2.send_data(self.stream_id, payload, end_stream=True)
                self.downstream.flush()

    def _send_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> bool:
        try:
            self.downstream.h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        except H2Error:
            return False  # the stream is gone (the client reset it): abort() follows
        self.downstream.flush()
        return True

    def _reset_downstream(self) -> None:
        downstream = self.downstream
        downstream.h2.reset_stream(self.stream_id, ErrorCode.INTERNAL_ERROR)
        downstream.flush()
        if downstream.streams.get(self.stream_id) is self:
            del downstream.streams[self.stream_id]
        self.request_done = True  # nothing more is read for it
        downstream.exchange_done(self)
