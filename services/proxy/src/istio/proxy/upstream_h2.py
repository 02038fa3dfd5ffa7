"""HTTP/2 to upstreams: clusters with http2_protocol_options (ports named http2 or grpc) get
multiplexed connections, one stream per request, over istio.http2's codec (h2c with prior
knowledge, or ALPN h2 inside mutual TLS).

Theory of operation. Each host keeps a short list of `H2Upstream` connections (`HostState.h2`).
A request takes a stream on the first connection with room for one (under the peer's
SETTINGS_MAX_CONCURRENT_STREAMS, no GOAWAY seen); when none has room a new connection is
opened, shared by every request that asked for one while it was connecting. The request's
`Exchange` holds an `UpstreamStream`, which offers what the exchange uses of an HTTP/1.1
`UpstreamConnection` (`write` body bytes, `end_body`, `cork`, `pause_reading`, `close`) and
hands the stream's events to the same `UpstreamHandler` callbacks, plus `on_response_trailers`.

Flow control both ways. Response bytes are acknowledged to the server only as the exchange
lets them through: while its client is slow (`pause_reading`), credit is withheld and the
server stops at the stream's window, other streams unaffected. Request bytes the server has
no window for wait in the codec; past `PAUSE_PENDING` the exchange is told to stop reading its
client until WINDOW_UPDATEs drain them.

A GOAWAY from the server lets streams up to its last-stream-id finish; later ones were never
processed and fail as refused (retried like Envoy's refused-stream). The connection closes
once its last stream is done.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, cast

from istio.http2 import (
    ConnectionTerminated,
    Data,
    ErrorCode,
    H2Connection,
    HeadersReceived,
    Settings,
    StreamReset,
    TooManyStreamsError,
    Trailers,
    WindowUpdated,
    error_name,
)
from istio.proxy.writes import CorkedFrames

if TYPE_CHECKING:
    from istio.proxy.upstream import ClusterRuntime, HostState, UpstreamHandler

# Request bytes waiting for the server's window beyond which the client's reading pauses.
PAUSE_PENDING = 256 * 1024
# Our windows: 1 MiB per stream, 4 MiB per connection (Envoy's defaults are larger still;
# these bound what one slow client can make this proxy hold per upstream stream).
SETTINGS = Settings(
    initial_window_size=1 << 20,
    connection_window=4 << 20,
    max_concurrent_streams=100,
)


class H2Upstream(CorkedFrames, asyncio.Protocol):
    """One HTTP/2 connection to an upstream host."""

    def __init__(self, cluster: ClusterRuntime, host: HostState) -> None:
        self.cluster = cluster
        self.host = host
        self.h2 = H2Connection(client=True, settings=SETTINGS)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, UpstreamStream] = {}
        self.closed = False
        self.counted = False
        self.corked = False
        self.requests = 0  # streams this connection has carried
        self.write_paused = False
        self.draining = False  # its host left the cluster: no new streams, close when idle
        self.send_scheduled = False
        self.loop = asyncio.get_running_loop()  # made by the loop's protocol factory

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h2.initiate()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cluster.h2_closed(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.reset_by_peer("upstream connection closed")

    def data_received(self, data: bytes) -> None:
        corked = self.cork()
        try:
            for event in self.h2.receive(data):
                self._event(event)
        finally:
            if corked:
                self.uncork()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.write_paused_changed()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.write_paused_changed()

    # the codec's events

    def _event(self, event: object) -> None:
        if isinstance(event, Data):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.received_data(event.data, event.flow_length, event.end_stream)
            else:
                self.h2.acknowledge(event.stream_id, event.flow_length)
        elif isinstance(event, HeadersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.received_headers(event.headers, event.end_stream)
        elif isinstance(event, Trailers):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.received_trailers(event.headers)
        elif isinstance(event, StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                code = event.error_code
                stream.reset_by_peer(
                    "upstream refused stream"
                    if code == ErrorCode.REFUSED_STREAM
                    else f"upstream reset: {error_name(code)}"
                )
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for stream in list(self.streams.values()):
                    stream.write_paused_changed()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.write_paused_changed()
        elif isinstance(event, ConnectionTerminated):
            self._terminated(event)

    def _terminated(self, event: ConnectionTerminated) -> None:
        if not event.remote:  # the server broke the protocol: every stream fails
            self.flush()
            self.close()
            return
        # GOAWAY: streams above last_stream_id were never processed (retriable)
        for stream_id in [i for i in self.streams if i > event.last_stream_id]:
            self.streams.pop(stream_id).reset_by_peer("upstream refused stream")
        if not self.streams:
            self.close()

    # streams

    def available(self) -> bool:
        limit = self.cluster.config.max_requests_per_connection
        return (
            not self.closed
            and not self.draining
            and self.h2.open_stream_allowed()
            and not (limit and self.requests >= limit)
        )

    def stream(self) -> UpstreamStream:
        self.requests += 1
        return UpstreamStream(self)

    def stream_done(self, stream: UpstreamStream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if not self.streams and not self.available() and not self.closed:
            self.close()  # drained after GOAWAY or its request limit

    def drain(self) -> None:
        self.draining = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            if not self.h2.closed:
                self.h2.close()
            self.corked = False
            out = self.h2.data_to_send()
            if out:
                self.transport.write(out)
            self.transport.close()
        self.cluster.h2_closed(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.reset_by_peer("upstream connection closed")


class UpstreamStream:
    """One request on an `H2Upstream`: what an exchange holds as its `upstream`."""

    __slots__ = (
        "closed",
        "connection",
        "handler",
        "head_request",
        "local_ended",
        "paused_writes",
        "reading_paused",
        "remote_ended",
        "requests",
        "stream_id",
        "unacknowledged",
    )

    def __init__(self, connection: H2Upstream) -> None:
        self.connection = connection
        self.stream_id = 0
        self.handler: UpstreamHandler | None = None
        self.closed = False
        # A reused connection found broken is retried once for free (as HTTP/1.1 keep-alive).
        self.requests = connection.requests - 1
        self.reading_paused = False
        self.unacknowledged = 0  # response bytes held back from the server's credit
        self.paused_writes = False  # the exchange was told to stop reading its client
        self.head_request = False
        self.local_ended = False
        self.remote_ended = False

    # what the exchange calls

    def open(
        self,
        handler: UpstreamHandler,
        headers: list[tuple[bytes, bytes]],
        *,
        head_request: bool,
        end: bool,
    ) -> None:
        connection = self.connection
        self.handler = handler
        self.head_request = head_request
        try:
            self.stream_id = connection.h2.send_request(headers, end_stream=end)
        except TooManyStreamsError:
            # a GOAWAY or SETTINGS arrived since this stream was handed out: never sent
            asyncio.get_running_loop().call_soon(self.reset_by_peer, "upstream refused stream")
            return
        self.local_ended = end
        connection.streams[self.stream_id] = self
        connection.flush()

    def write(self, data: bytes) -> None:
        """Request body bytes (never chunk-framed here: HTTP/2 frames them)."""
        if self.closed or not self.stream_id or not data:
            return
        connection = self.connection
        connection.h2.send_data(self.stream_id, data)
        connection.flush()
        self.write_paused_changed()

    def end_body(self, chunked: bool = False) -> None:
        if self.closed or not self.stream_id or self.local_ended:
            return
        self.local_ended = True
        self.connection.h2.end_stream(self.stream_id)
        self.connection.flush()

    def cork(self) -> bool:
        return self.connection.cork()

    def uncork(self) -> None:
        self.connection.uncork()

    def pause_reading(self, paused: bool) -> None:
        """While paused, what the server sends is not acknowledged: its window stops it."""
        if paused == self.reading_paused or self.closed:
            return
        self.reading_paused = paused
        if not paused and self.unacknowledged:
            held, self.unacknowledged = self.unacknowledged, 0
            self.connection.h2.acknowledge(self.stream_id, held)
            self.connection.flush()

    def detach(self) -> None:
        self.handler = None

    def close(self) -> None:
        """The exchange is done with this stream: a stream still open is reset (CANCEL)."""
        if self.closed:
            return
        self.closed = True
        self.handler = None
        connection = self.connection
        if self.stream_id and not (self.local_ended and self.remote_ended):
            connection.h2.reset_stream(self.stream_id, ErrorCode.CANCEL)
            connection.flush()
        connection.stream_done(self)

    # what the connection reports

    def received_headers(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        handler = self.handler
        if handler is None:
            return
        status = 0
        length: int | None = None
        regular = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)
                continue
            if name == b"content-length":
                length = int(value)
            regular.append((name, value))
        no_body = end_stream or self.head_request or status in (204, 304)
        if end_stream:
            length = 0
        handler.on_response_headers(status, regular, length, length is None and not no_body)
        if end_stream:
            self._ended()

    def received_data(self, data: bytes, flow_length: int, end_stream: bool) -> None:
        handler = self.handler
        if handler is None:
            self.connection.h2.acknowledge(self.stream_id, flow_length)
            return
        if self.reading_paused:
            self.unacknowledged += flow_length
        else:
            self.connection.h2.acknowledge(self.stream_id, flow_length)
        if data:
            handler.on_response_body(data)
        if end_stream:
            self._ended()

    def received_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        handler = self.handler
        if handler is not None:
            on_trailers = getattr(handler, "on_response_trailers", None)
            if on_trailers is not None:
                on_trailers(headers)
        self._ended()

    def _ended(self) -> None:
        self.remote_ended = True
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.on_response_end()

    def reset_by_peer(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        handler, self.handler = self.handler, None
        self.connection.stream_done(self)
        if handler is not None:
            handler.on_upstream_reset(reason)

    def write_paused_changed(self) -> None:
        """Tell the exchange to stop (or resume) reading its client by what waits here."""
        handler = self.handler
        if handler is None or not self.stream_id:
            return
        paused = (
            self.connection.write_paused
            or self.connection.h2.pending(self.stream_id) > PAUSE_PENDING
        )
        if paused != self.paused_writes:
            self.paused_writes = paused
            handler.on_upstream_write_paused(paused)
