"""The HTTP/1.1 data path: a downstream server protocol on httptools and the router that
forwards each request to an upstream cluster.

Theory of operation. `HttpConnection` is one client connection. httptools parses bytes into
callbacks; each request becomes an `Exchange`, queued in arrival order (pipelining). Only the
head of the queue is active: it is routed, sent upstream, and its response written; when it
finishes the next one starts. Bodies stream both ways with backpressure: request bytes go to
the upstream connection as they arrive (reading pauses while the upstream's write buffer is
full, or while too much waits unsent), response bytes go to the client as they arrive (the
upstream's reading pauses while the client's write buffer is full). Up to `buffer_bytes` of a
request body are kept so that a retry can resend it; beyond that the request is not retried.

The active exchange runs one small task for the decisions that wait (fault delay, connecting,
the per-try wait for response headers, retries); body bytes never pass through it. Once the
response headers are committed to the client, the task is done and callbacks carry the rest.

Framing errors from the parser (Content-Length with Transfer-Encoding, duplicate
Content-Length, obs-fold, bad chunk sizes, bare LF) answer 400 and close; headers over the
limit answer 431, headers that arrive too slowly 408. Other connections never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import random
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import httptools

from istio.proxy.config import (
    DirectResponse,
    HeaderToAdd,
    HttpManager,
    Listener,
    MixerFilter,
    Redirect,
    RetryPolicy,
    Route,
    RouteAction,
    VirtualHost,
)
from istio.proxy.tracing import B3_HEADERS, Span, child_span, propagate, start_span
from istio.proxy.upstream import (
    ClusterRuntime,
    ConnectFailure,
    HostState,
    Overflow,
    UpstreamConnection,
)
from istio.proxy.writes import CorkedWrites

if TYPE_CHECKING:
    from istio.mixerclient.client import CheckAnswer
    from istio.proxy.context import Context
    from istio.proxy.mixer import RequestRecord
    from istio.proxy.stats import HttpStats
    from istio.proxy.tls import PeerIdentity
    from istio.proxy.upstream_h2 import UpstreamStream

log = logging.getLogger(__name__)

Address = tuple[str, int]

STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
    for status in http.HTTPStatus
}
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PRI = b"PRI * HTTP/2.0\r\n"  # how HTTP/2's preface starts; no HTTP/1.1 method is PRI
SO_ORIGINAL_DST = 80


def request_id(getrandbits: Any = random.getrandbits) -> str:
    """A fresh x-request-id: 122 random bits in UUID version 4 form, as Envoy's, without
    uuid.uuid4()'s os.urandom system call (the ids need to be unique, not secret)."""
    digits = "%032x" % (getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48)  # the version nibble, the variant bits
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48  # version 4, variant RFC 4122


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Unknown\r\n".encode()


def original_destination(sock: socket.socket | None) -> Address | None:
    """Where an iptables REDIRECT sent the connection, or None when it was not redirected."""
    if sock is None or sock.family != socket.AF_INET:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    destination = (socket.inet_ntoa(packed), port)
    local = sock.getsockname()
    return None if destination == (local[0], local[1]) else destination


def find_manager(
    context: Context, listener: Listener | None, port: int
) -> tuple[HttpManager | None, str]:
    """The connection manager for a request: its listener's (as the current snapshot has
    it), or on 15001 without one the listener for the port of the request's authority."""
    if listener is not None:
        current = context.snapshot.listeners.get(listener.name)
        chain = (current or listener).chain
        return (chain if isinstance(chain, HttpManager) else None), listener.name
    found = context.snapshot.listener_for_port(port)
    if found is None or not isinstance(found.chain, HttpManager):
        return None, ""
    return found.chain, found.name


def split_authority(authority: str, default_port: int = 80) -> Address:
    """`host:port` (`[v6]:port`) to (host, port); no port: `default_port`."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:]
        return host, int(port) if rest.startswith(":") and port.isdigit() else default_port
    host, colon, port = authority.rpartition(":")
    if colon and port.isdigit():
        return host, int(port)
    return authority, default_port


class ProtocolError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HttpConnection(CorkedWrites, asyncio.Protocol):
    """One downstream connection. `listener` fixes its HTTP connection manager; without one
    (the 15001 listener, not redirected) each request finds the listener for the port of its
    authority, which is also how absolute-form (explicit proxy) requests are served."""

    def __init__(
        self,
        context: Context,
        listener: Listener | None,
        *,
        original_dst: Address | None = None,
        on_close: set[HttpConnection] | None = None,
    ) -> None:
        self.context = context
        self.listener = listener
        self.original_dst = original_dst
        self.registry = on_close
        self.transport: asyncio.Transport | None = None
        # made by the loop's protocol factory. Kept: asyncio.get_running_loop() costs a
        # getpid() system call on every use (CPython's fork check)
        self.loop = asyncio.get_running_loop()
        self.pending: list[bytes] | None = None  # writes held back while corked
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None  # the request being parsed
        self.header_bytes = 0
        self.header_timer: asyncio.TimerHandle | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.read_pauses: set[str] = set()
        self.write_paused = False
        self.closed = False
        self.draining = False
        self.broken = False
        self.stats: HttpStats | None = None
        # After a 101: the exchange whose tunnel carries this connection's bytes, raw.
        self.tunnel: Exchange | None = None
        self.fresh = True  # nothing read yet: the first bytes tell HTTP/2 from HTTP/1.1
        self.sniffed = b""
        # The verified client of an mTLS connection (source.user, connection.mtls for Mixer),
        # set by the listener before connection_made; None: plaintext.
        self.peer_identity: PeerIdentity | None = None
        # On a listener with TLS: the x-forwarded-client-cert requests get (b"" without a
        # verified client: none); whatever the client sent is dropped. None: passed through.
        self.xfcc: bytes | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        if self.listener is not None and self.listener.tls is not None:
            identity = self.peer_identity
            self.xfcc = (
                identity.xfcc().encode() if identity is not None and identity.spiffe_id else b""
            )
        if self.registry is not None:
            self.registry.add(self)
        chain = self.listener.chain if self.listener is not None else None
        if isinstance(chain, HttpManager):
            self.stats = self.context.stats.http_stats(chain.stat_prefix)
            self.stats.cx_total += 1
            self.stats.cx_active += 1
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending = None
        if self.registry is not None:
            self.registry.discard(self)
        if self.stats is not None:
            self.stats.cx_active -= 1
        for timer in (self.header_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        for exchange in self.queue:
            exchange.abort("downstream connection closed")
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_from_downstream(data)
            return
        if self.closed or self.broken:
            return
        if self.fresh and self._sniff(data):
            return
        corked = self.cork()
        # request body bytes for the active exchange's upstream: one write per read, too
        upstream = self.queue[0].upstream if self.queue else None
        upstream_corked = upstream is not None and upstream.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, ProtocolError):
                self._protocol_error(cause.status, str(cause))
            else:
                log.exception("request callback failed", exc_info=cause)
                self._protocol_error(500, "internal error")
        except httptools.HttpParserUpgrade as error:
            # An Upgrade (or CONNECT) request: what follows it on this connection is not
            # HTTP. Reading stops until the exchange opens its tunnel or answers and closes;
            # bytes that came along are kept for the tunnel.
            self.broken = True
            self._pause("upgrade")
            if self.queue:
                upgrading = self.queue[-1]
                upgrading.keep_alive = False
                upgrading.upgrade_early = [data[error.args[0] :]] if len(error.args) else []
        except httptools.HttpParserError as error:
            self._protocol_error(400, str(error))
        finally:
            if upstream_corked:
                assert upstream is not None
                upstream.uncork()
            if corked:
                self.uncork()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue:
            self.queue[0].downstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            self.queue[0].downstream_write_paused(False)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.current = Exchange(self)
        self.header_bytes = 0
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.header_timer = self.loop.call_later(
            self.context.limits.header_timeout, self._header_timeout
        )

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        current = self.current
        if current is None or current.headers_done:
            return  # chunked trailers: not forwarded
        self._count_header_bytes(len(name) + len(value) + 4)
        # Two Host headers make the authority ambiguous (RFC 9112 §3.2): refuse, as h11 does.
        if (
            len(name) == 4
            and name.lower() == b"host"
            and any(len(n) == 4 and n.lower() == b"host" for n, _ in current.headers)
        ):
            raise ProtocolError(400, "more than one Host header")
        current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        current = self.current
        assert current is not None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        current.headers_complete(
            self.parser.get_method(),
            self.parser.get_http_version(),
            self.parser.should_keep_alive(),
        )
        self.queue.append(current)
        if len(self.queue) == 1:
            current.start()
        elif len(self.queue) >= self.context.limits.max_pipelined:
            self._pause("pipeline")

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current.request_body(body)

    def on_message_complete(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.request_end()

    # flow control and lifecycle

    def _count_header_bytes(self, count: int) -> None:
        self.header_bytes += count
        if self.header_bytes > self.context.limits.max_header_bytes:
            raise ProtocolError(431, "request headers too large")

    def _pause(self, reason: str) -> None:
        if not self.read_pauses and self.transport is not None:
            self.transport.pause_reading()
        self.read_pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self.read_pauses:
            self.read_pauses.discard(reason)
            if not self.read_pauses and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def set_read_paused(self, reason: str, paused: bool) -> None:
        if paused:
            self._pause(reason)
        else:
            self._resume(reason)

    def _arm_idle(self) -> None:
        if self.idle_timer is None and not self.closed:
            self.idle_timer = self.loop.call_later(self.context.limits.idle_timeout, self.close)

    def _header_timeout(self) -> None:
        self.header_timer = None
        self._protocol_error(408, "request headers not received in time")

    def _protocol_error(self, status: int, reason: str) -> None:
        """A request broke the protocol: answer it in turn with `status`, then close."""
        self.broken = True
        self._pause("broken")
        current, self.current = self.current, None
        if current is not None and current in self.queue:
            current.broken(status, reason)
            return
        exchange = current or Exchange(self)
        exchange.error = (status, reason)
        exchange.keep_alive = False
        self.queue.append(exchange)
        if len(self.queue) == 1:
            exchange.start()

    def exchange_done(self, exchange: Exchange) -> None:
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if not exchange.keep_alive or self.draining or self.closed:
            self.close()
            return
        self._resume("pipeline")
        if self.queue:
            self.queue[0].start()
        elif self.current is None:
            self._arm_idle()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.uncork()
            self.closed = True
            self.transport.close()

    def reset(self) -> None:
        self.pending = None
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def drain(self) -> None:
        """The listener is going away: finish what is in flight, then close."""
        self.draining = True
        if not self.queue and self.current is None:
            self.close()

    def manager(self, port: int) -> tuple[HttpManager | None, str]:
        return find_manager(self.context, self.listener, port)

    # HTTP/2: a connection whose first bytes are the preface becomes an H2Downstream

    def _sniff(self, data: bytes) -> bool:
        """True when `data` (with what came before) is, or may still be, HTTP/2's preface;
        the connection has been handed over (or waits for more bytes) then."""
        self.fresh = False
        seen = self.sniffed + data
        if not seen.startswith(_PRI[: len(seen)]):
            if self.sniffed:  # held back while undecided: HTTP/1.1 after all
                self.sniffed = b""
                self.data_received(seen)
                return True
            return False
        if len(seen) < len(_PRI):
            self.fresh = True
            self.sniffed = seen
            return True
        self.sniffed = b""
        from istio.proxy.downstream_h2 import H2Downstream  # loaded by the first h2 client

        transport = self.transport
        assert transport is not None
        h2 = H2Downstream(
            self.context,
            self.listener,
            original_dst=self.original_dst,
            registry=cast("set[asyncio.Protocol] | None", self.registry),
            peer_identity=self.peer_identity,
            xfcc=self.xfcc,
            stats=self.stats,
        )
        # this connection object retires without closing the socket
        self.closed = True
        if self.registry is not None:
            self.registry.discard(self)
        for timer in (self.header_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        transport.set_protocol(h2)
        h2.connection_made(transport)
        h2.data_received(seen)
        return True


class Exchange:
    """One request on a downstream connection, and its response. Implements
    istio.proxy.upstream.UpstreamHandler for the upstream connection it is attached to."""

    __slots__ = (
        "active_request",
        "attempt_waiter",
        "authority",
        "body",
        "body_bytes",
        "bytes_received",
        "bytes_sent",
        "chunked",
        "cluster",
        "cluster_name",
        "committed",
        "conn",
        "error",
        "expect_continue",
        "finished",
        "flags",
        "grpc_deadline",
        "head_request",
        "headers",
        "headers_done",
        "host",
        "keep_alive",
        "length",
        "listener_name",
        "manager",
        "method",
        "mirrored",
        "mixer_report",
        "path",
        "replayable",
        "request_done",
        "request_id",
        "response_body",
        "response_chunked",
        "response_done",
        "response_head",
        "response_reset",
        "response_status",
        "response_trailers",
        "route",
        "sent_index",
        "span",
        "started",
        "status",
        "table_headers",
        "target",
        "task",
        "timed_out",
        "timer",
        "tunneled",
        "upgrade_early",
        "upstream",
        "upstream_address",
        "upstream_host",
        "version",
        "virtual_host",
    )

    def __init__(self, conn: HttpConnection) -> None:
        self.conn = conn
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.method = b"GET"
        self.version = "1.1"
        self.keep_alive = True
        self.length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.body: list[bytes] = []
        self.body_bytes = 0  # bytes held in `body`
        self.sent_index = 0  # body[:sent_index] went to the current upstream
        self.replayable = True
        self.request_done = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self.error: tuple[int, str] | None = None
        self.started = 0.0
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.upstream: UpstreamConnection | UpstreamStream | None = None
        self.upstream_host: HostState | None = None
        self.upstream_address = ""
        self.cluster: ClusterRuntime | None = None
        self.cluster_name = ""
        self.attempt_waiter: asyncio.Future[str] | None = None
        self.response_status = 0
        self.response_head: list[tuple[bytes, bytes]] = []
        self.response_chunked = False  # the client gets chunked framing
        self.response_body: list[bytes] = []
        self.response_trailers: list[tuple[bytes, bytes]] = []
        self.response_done = False
        self.response_reset = False
        self.virtual_host: VirtualHost | None = None
        self.table_headers: tuple[HeaderToAdd, ...] = ()
        self.committed = False
        self.finished = False
        self.status = 0
        self.flags = "-"
        self.route: Route | None = None
        self.mirrored = False
        self.request_id = ""
        self.span: Span | None = None
        self.upgrade_early: list[bytes] | None = None  # set: an Upgrade request (its bytes)
        self.tunneled = False
        # (Mixer filter, RequestRecord, Check bag or None): what the Report is made of
        self.mixer_report: tuple[Any, tuple[Any, ...], dict[str, Any] | None] | None = None
        self.head_request = False
        self.authority = ""
        self.path = ""
        self.manager: HttpManager | None = None
        self.listener_name = ""
        self.active_request = False
        self.host: HostState | None = None
        self.grpc_deadline = False  # the route timer is the caller's grpc-timeout

    # request side, from the parser

    def headers_complete(self, method: bytes, version: str, keep_alive: bool) -> None:
        self.headers_done = True
        self.method = method
        self.head_request = method == b"HEAD"
        self.version = version
        self.keep_alive = keep_alive
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"content-length":
                self.length = int(value)
            elif lower == b"transfer-encoding":
                self.chunked = True
            elif lower == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = True
        if self.length is None and not self.chunked:
            self.length = 0

    def request_body(self, data: bytes) -> None:
        self.bytes_received += len(data)
        upstream = self.upstream
        if upstream is not None:
            upstream.write(self._frame(data))
            if self.replayable:
                self.body.append(data)
                self.body_bytes += len(data)
                self.sent_index += 1
                if self.body_bytes > self.conn.context.limits.buffer_bytes:
                    self.replayable = False  # too big to resend: keep nothing
                    self.body.clear()
                    self.body_bytes = 0
                    self.sent_index = 0
            return
        self._keep(data)
        if self.body_bytes > self.conn.context.limits.buffer_bytes:
            self._pause_request("buffer", True)

    def _keep(self, data: bytes) -> None:
        self.body.append(data)
        self.body_bytes += len(data)
        if self.replayable and self.body_bytes > self.conn.context.limits.buffer_bytes:
            # too big to resend: drop what was sent, keep only what still has to go
            self.replayable = False
            sent = self.sent_index
            self.body_bytes -= sum(len(chunk) for chunk in self.body[:sent])
            del self.body[:sent]
            self.sent_index = 0

    def _frame(self, data: bytes) -> bytes:
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def request_end(self) -> None:
        self.request_done = True
        if self.upstream is not None:
            self.upstream.end_body(self.chunked)
        self._maybe_mirror()

    def broken(self, status: int, reason: str) -> None:
        """The parser refused this request's body: answer `status` if nothing went to the
        client yet, else reset; the connection closes either way."""
        self.keep_alive = False
        if self.conn.queue and self.conn.queue[0] is self and self.task is not None:
            self._drop_upstream()
            if self.task is not None:
                self.task.cancel()
            self.local_reply(status, reason, flags="DPE")
        else:
            self.error = (status, reason)

    def abort(self, reason: str) -> None:
        """The client went away."""
        if self.finished:
            return
        if self.tunneled:
            self._close_tunnel()
            return
        self.finished = True
        if self.task is not None:
            self.task.cancel()
        self._drop_upstream()
        if self.timer is not None:
            self.timer.cancel()
        self._release_request()
        if self.started:
            self.status = self.status or 0
            self.flags = "DC"
            self._log()

    # routing and forwarding

    def start(self) -> None:
        self.started = time.monotonic()
        if self.error is not None:
            status, reason = self.error
            self.keep_alive = False
            self.local_reply(status, reason, flags="DPE")
            return
        self.task = self.conn.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._forward()
        except asyncio.CancelledError:
            if self.timed_out and not self.finished:
                self._drop_upstream()
                self.local_reply(504, "upstream request timeout", flags="UT")
        except Exception:
            log.exception("proxying a request failed")
            self._drop_upstream()
            self.local_reply(500, "internal error")

    def _authority_and_path(self) -> tuple[str, str]:
        target = self.target
        if target.startswith(b"/"):
            authority = ""
            path = target.decode("latin-1")
        elif b"://" in target:  # absolute form: an explicit proxy request
            rest = target.split(b"://", 1)[1]
            host, slash, path_bytes = rest.partition(b"/")
            authority = host.decode("latin-1")
            path = "/" + path_bytes.decode("latin-1") if slash else "/"
        else:
            authority, path = "", target.decode("latin-1")
        if not authority:
            for name, value in self.headers:
                if name.lower() == b"host":
                    authority = value.decode("latin-1")
                    break
        return authority, path

    def _routing_headers(self) -> dict[str, str]:
        """The request's headers as header matchers see them: lowercase names, repeated
        headers joined with commas, and the pseudo-headers."""
        headers: dict[str, str] = {}
        for name, value in self.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        headers[":method"] = self.method.decode("latin-1")
        headers[":authority"] = self.authority
        headers[":path"] = self.path
        headers[":scheme"] = "http"
        return headers

    def _grpc_timeout(self) -> float | None:
        """The caller's gRPC deadline: gRPC rides HTTP/2 only, so an HTTP/1.1 request has
        none (HTTP/2 streams read it while parsing their headers, not here)."""
        return None

    def _grpc_status(self) -> int | None:
        """A trailers-only gRPC response's status (in its headers), else None."""
        for name, value in self.response_head:
            if name.lower() == b"grpc-status" and value.isdigit():
                return int(value)
        return None

    async def _forward(self) -> None:
        conn = self.conn
        context = conn.context
        self.authority, self.path = self._authority_and_path()
        if self.method == b"CONNECT":
            await self._connect_tunnel()
            return
        port = split_authority(self.authority)[1] if self.authority else 80
        manager, self.listener_name = conn.manager(port)
        self.manager = manager
        if manager is None:
            self.local_reply(404, f"no listener for port {port}", flags="NR")
            return
        if conn.stats is None:  # the 15001 listener: stats of the manager the request found
            stats = context.stats.http_stats(manager.stat_prefix)
            stats.cx_total += 1
            stats.cx_active += 1
            conn.stats = stats
        for name, value in self.headers:
            if name.lower() == b"x-request-id":
                self.request_id = value.decode("latin-1")
        if not self.request_id and manager.generate_request_id:
            self.request_id = request_id()
        if manager.tracing is not None:  # before Mixer: its Check is a child span, denials traced
            listener = conn.listener
            outbound = listener is None or not listener.inbound
            self.span = start_span(manager.tracing, self.headers, outbound=outbound)
        # The listener's current config, as `manager` reads it: a connection accepted before
        # an LDS update (a QuotaSpec bound since) checks by the new one.
        mixer = None
        if conn.listener is not None:
            mixer = (context.snapshot.listeners.get(conn.listener.name) or conn.listener).mixer
        if mixer is not None:
            allowed = self._mixer_check(mixer)
            if allowed is None:
                allowed = await self._mixer_ask(mixer)
            if not allowed:
                return
        table = manager.routes
        if table is None and manager.rds is not None:
            table = context.snapshot.routes.get(manager.rds)
        selected = None
        if table is not None:
            headers = self._routing_headers() if table.header_matching else _NO_HEADERS
            selected = table.select(self.authority, self.path, headers)
        if selected is None or table is None:
            self.local_reply(404, "", flags="NR")
            return
        self.virtual_host, route = selected
        self.table_headers = table.headers_to_add
        self.route = route
        action = route.action
        if isinstance(action, Redirect):
            self._redirect(action)
            return
        if isinstance(action, DirectResponse):
            self.local_reply(action.status, action.body)
            return
        if self.upgrade_early is not None and not self._upgrade_allowed(action):
            # Envoy's answer to an upgrade its route does not enable (upgrade_failed)
            self.local_reply(403, "upgrade failed", flags="UPE")
            return
        fault = route.fault if manager.fault_filter else None
        if fault is not None:
            if fault.delay_ppm and random.randrange(1_000_000) < fault.delay_ppm:
                self.flags = "DI"
                await asyncio.sleep(fault.delay)
            if fault.abort_ppm and random.randrange(1_000_000) < fault.abort_ppm:
                self.local_reply(fault.abort_status, "fault filter abort", flags="FI")
                return
        timeout = action.timeout
        deadline = self._grpc_timeout()
        if deadline is not None and (not timeout or deadline < timeout):
            timeout = deadline  # the caller gives up then: so does this proxy
            self.grpc_deadline = True
        if timeout:
            self.timer = conn.loop.call_later(timeout, self._route_timeout)
        self.cluster_name = action.pick_cluster(action.next_draw())
        cluster = context.clusters.clusters.get(self.cluster_name)
        if cluster is None:
            self.local_reply(503, f"cluster {self.cluster_name} not found", flags="NC")
            return
        if cluster.config.http2 and self.upgrade_early is not None:
            # an HTTP/2 server takes no Upgrade; Envoy answers the same way (upgrade_failed)
            self.local_reply(403, "upgrade failed: the upstream speaks HTTP/2", flags="UPE")
            return
        self.cluster = cluster
        if self.expect_continue and not self.request_done:
            conn.write(CONTINUE)
        self._maybe_mirror()
        await self._attempts(cluster, action)

    async def _attempts(self, cluster: ClusterRuntime, action: RouteAction) -> None:
        retry = action.retry
        retries_left = retry.num_retries if retry is not None else 0
        per_try = retry.per_try_timeout if retry is not None else 0.0
        breakers = cluster.config.breakers
        original = self._original_destination()
        http2 = cluster.config.http2
        if http2:
            self.chunked = False  # HTTP/2 frames the body itself
        head: bytes | list[tuple[bytes, bytes]] = (
            self._request_headers(action) if http2 else self._request_head(action)
        )
        free_retry = True  # a reused keep-alive connection found dead is retried once, free
        # Streams an HTTP/2 server refused (REFUSED_STREAM, or beyond its GOAWAY) were never
        # processed: resent free, on another connection, a few times.
        refusals_left = 3
        backoff = 0
        while True:
            host = cluster.pick(original)
            if host is None:
                self.local_reply(503, "no healthy upstream", flags="UH")
                return
            if not self.active_request:
                if cluster.active_requests >= breakers.max_requests:
                    cluster.stats.rq_overflow += 1
                    self.local_reply(503, "upstream overflow", flags="UO", overloaded=True)
                    return
                cluster.active_requests += 1
                cluster.stats.rq_active += 1
                self.active_request = True
            try:
                upstream: UpstreamConnection | UpstreamStream = await (
                    cluster.acquire_stream(host) if http2 else cluster.acquire(host)
                )
            except Overflow:
                self.local_reply(503, "upstream overflow", flags="UO", overloaded=True)
                return
            except ConnectFailure as error:
                cluster.record(host, 503)
                outcome, reason = "connect-failure", str(error)
            else:
                reused = upstream.requests > 0
                self._attach(upstream, host, head)
                outcome = reason = await self._await_headers(per_try)
                if outcome == "refused-stream" and refusals_left and self.replayable:
                    refusals_left -= 1
                    self._drop_upstream()
                    continue
                if outcome == "reset" and reused and free_retry and self.replayable:
                    free_retry = False
                    self._drop_upstream()
                    continue
                cluster.record(host, self.response_status if outcome == "headers" else 503)
            can_retry = (
                retries_left > 0
                and self.replayable
                and _retriable(retry, outcome, self.response_status, self._grpc_status())
            )
            if can_retry and cluster.active_retries >= breakers.max_retries:
                cluster.stats.rq_retry_overflow += 1
                can_retry = False
            if not can_retry:
                break
            self._drop_upstream()
            retries_left -= 1
            backoff += 1
            cluster.stats.rq_retry += 1
            cluster.active_retries += 1
            try:
                await asyncio.sleep(random.uniform(0, 0.025 * (1 << min(backoff, 4))))
            finally:
                cluster.active_retries -= 1
        if outcome == "headers":
            self._commit()
            return
        self._drop_upstream()
        if outcome == "timeout":
            cluster.stats.rq_timeout += 1
            self.local_reply(504, "upstream request timeout", flags="UT")
        elif outcome == "connect-failure":
            self.local_reply(
                503,
                f"upstream connect error or disconnect/reset before headers: {reason}",
                flags="UF",
            )
        elif outcome == "protocol-error":
            self.local_reply(502, "upstream protocol error", flags="UPE")
        elif outcome == "refused-stream":
            self.local_reply(503, "upstream refused the stream", flags="UC")
        else:
            self.local_reply(
                503, "upstream connect error or disconnect/reset before headers", flags="UC"
            )

    def _original_destination(self) -> Address | None:
        if self.conn.original_dst is not None:
            return self.conn.original_dst
        if not self.authority:
            return None
        host, port = split_authority(self.authority)
        return self.conn.context.resolver.resolve(host), port

    def _request_fields(
        self, action: RouteAction
    ) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bool]:
        """What goes upstream, for either HTTP version: the path (rewritten), the authority,
        the end-to-end headers with what the route adds, and whether the client accepts
        trailers (`te: trailers`, which HTTP/2 keeps and HTTP/1.1 drops as hop-by-hop)."""
        route = self.route
        assert route is not None
        path = self.path
        if action.prefix_rewrite is not None:
            match = route.match
            if match.path_kind.value == "prefix":
                path = action.prefix_rewrite + path[len(match.path) :]
            else:
                query = path.partition("?")[2]
                path = action.prefix_rewrite + ("?" + query if query else "")
        authority = action.host_rewrite or self.authority
        connection_tokens = {
            token.strip().lower()
            for name, value in self.headers
            if name.lower() == b"connection"
            for token in value.split(b",")
        }
        removed = {name.encode() for name in route.headers_to_remove}
        fields: list[tuple[bytes, bytes]] = []
        xfcc = self.conn.xfcc
        if xfcc is not None:  # Envoy's SANITIZE_SET: only this proxy says who the client is
            removed.add(b"x-forwarded-client-cert")
            if xfcc:
                fields.append((b"x-forwarded-client-cert", xfcc))
        # Source attributes are from one sidecar to the next one's Mixer: never the app's to
        # send (nor a gateway's client's), never the app's to see.
        removed.add(b"x-istio-attributes")
        listener = self.conn.listener
        if (listener is None or not listener.inbound) and self.conn.context.istio_attributes:
            fields.append((b"x-istio-attributes", self.conn.context.istio_attributes))
        has_request_id = has_proto = te_trailers = False
        forwarded_for = b""
        span = self.span
        if span is not None:  # the span's B3 headers replace the caller's
            removed |= B3_HEADERS
            fields += propagate(span, ())
        for name, value in self.headers:
            lower = name.lower()
            if lower == b"te":
                te_trailers = te_trailers or b"trailers" in value.lower()
                continue
            if (
                lower in HOP_BY_HOP
                or lower in connection_tokens
                or lower in removed
                or lower in (b"host", b"content-length")
            ):
                continue
            if lower == b"expect" and self.expect_continue:
                continue
            if lower == b"x-request-id":
                has_request_id = True
            elif lower == b"x-forwarded-proto":
                has_proto = True
            elif lower == b"x-forwarded-for" and self.manager and self.manager.use_remote_address:
                forwarded_for = value + b", "
                continue
            fields.append((name, value))
        if not has_request_id and self.request_id:
            fields.append((b"x-request-id", self.request_id.encode()))
        if not has_proto:  # https where this proxy terminated TLS (an ingress TLS port)
            transport = self.conn.transport if self.conn.xfcc is not None else None
            tls = transport is not None and transport.get_extra_info("ssl_object") is not None
            fields.append((b"x-forwarded-proto", b"https" if tls else b"http"))
        if self.manager is not None and self.manager.use_remote_address and self.conn.peer:
            fields.append((b"x-forwarded-for", forwarded_for + self.conn.peer.encode()))
        host_headers = self.virtual_host.headers_to_add if self.virtual_host else ()
        fields += [
            (added.name.encode("latin-1"), added.value.encode("latin-1"))
            for added in (*route.headers_to_add, *host_headers, *self.table_headers)
        ]
        return path.encode("latin-1"), authority.encode("latin-1"), fields, te_trailers

    def _request_head(self, action: RouteAction, *, mirror_length: int = -1) -> bytes:
        """The HTTP/1.1 request head (`mirror_length`: a mirror's whole buffered body)."""
        path, authority, fields, _ = self._request_fields(action)
        lines = [b"%b %b HTTP/1.1\r\nhost: %b\r\n" % (self.method, path, authority)]
        lines += [b"%b: %b\r\n" % field for field in fields]
        if self.upgrade_early is not None:
            lines.append(b"connection: upgrade\r\nupgrade: %b\r\n" % self._upgrade_type())
        if mirror_length >= 0:
            if mirror_length or self.method not in (b"GET", b"HEAD"):
                lines.append(b"content-length: %d\r\n" % mirror_length)
        elif self.chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif self.length:
            lines.append(b"content-length: %d\r\n" % self.length)
        lines.append(b"\r\n")
        return b"".join(lines)

    def _request_headers(self, action: RouteAction) -> list[tuple[bytes, bytes]]:
        """The HTTP/2 request's header list: pseudo-headers first, names in lowercase."""
        path, authority, fields, te_trailers = self._request_fields(action)
        headers = [
            (b":method", self.method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path),
        ]
        headers += [(name.lower(), value) for name, value in fields]
        if te_trailers:
            headers.append((b"te", b"trailers"))
        if self.length:
            headers.append((b"content-length", b"%d" % self.length))
        return headers

    def _attach(
        self,
        upstream: UpstreamConnection | UpstreamStream,
        host: HostState,
        head: bytes | list[tuple[bytes, bytes]],
    ) -> None:
        self.upstream = upstream
        self.upstream_host = host
        self.upstream_address = f"{host.address[0]}:{host.address[1]}"
        host.active += 1
        self.response_status = 0
        self.response_head = []
        self.response_body = []
        self.response_trailers = []
        self.response_done = False
        self.attempt_waiter = self.conn.loop.create_future()
        if isinstance(upstream, UpstreamConnection):
            assert isinstance(head, bytes)
            parts = [head, *(self._frame(chunk) for chunk in self.body)]
            if self.request_done and self.chunked:
                parts.append(b"0\r\n\r\n")
            upstream.attach(self, b"".join(parts), head_request=self.head_request)
        else:
            assert isinstance(head, list)
            corked = upstream.cork()  # the HEADERS and the DATA held so far: one write
            try:
                upstream.open(
                    self,
                    head,
                    head_request=self.head_request,
                    end=self.request_done and not self.body,
                )
                for chunk in self.body:
                    upstream.write(chunk)
                if self.request_done and self.body:
                    upstream.end_body()
            finally:
                if corked:
                    upstream.uncork()
        if self.replayable:
            self.sent_index = len(self.body)
        else:
            self.body.clear()
            self.body_bytes = 0
            self.sent_index = 0
        self._pause_request("buffer", False)

    async def _await_headers(self, per_try: float) -> str:
        waiter = self.attempt_waiter
        assert waiter is not None
        if not per_try:
            return await waiter
        try:
            async with asyncio.timeout(per_try):
                return await asyncio.shield(waiter)
        except TimeoutError:
            return "timeout"

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if self.upstream_host is not None:
            self.upstream_host.active -= 1
            self.upstream_host = None
        if upstream is not None:
            upstream.detach()
            upstream.close()
            upstream.pause_reading(False)

    def _route_timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.cluster is not None:
            self.cluster.stats.rq_timeout += 1
        if not self.committed:
            if self.task is not None and not self.task.done():
                self.task.cancel()
            else:
                self._drop_upstream()
                self.local_reply(504, "upstream request timeout", flags="UT")
        else:
            self._drop_upstream()
            self.flags = "UT"
            self._complete(reset=True)

    # UpstreamHandler: what the upstream connection reports

    def on_response_headers(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None, chunked: bool
    ) -> None:
        self.response_status = status
        self.response_head = headers
        self.response_chunked = chunked or (length is None)
        waiter = self.attempt_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result("headers")

    def on_response_body(self, data: bytes) -> None:
        if not self.committed:
            self.response_body.append(data)
            return
        self.bytes_sent += len(data)
        if self.response_chunked:
            self.conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.conn.write(data)

    def on_response_end(self) -> None:
        self.response_done = True
        if self.committed:
            self._end_response()

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """An HTTP/2 upstream's trailers (gRPC's status): they follow the body."""
        self.response_trailers = trailers

    def on_upstream_reset(self, reason: str) -> None:
        if self.tunneled:
            self._close_tunnel()
            return
        waiter = self.attempt_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(
                "protocol-error"
                if "protocol" in reason
                else "refused-stream"
                if "refused" in reason
                else "reset"
            )
            return
        if not self.committed:
            self.response_reset = True  # after the headers, before they went to the client
            return
        if not self.finished:
            # mid-body: the client cannot be told, so its connection is reset (Envoy's UR)
            self.upstream = None
            if self.upstream_host is not None:
                self.upstream_host.active -= 1
                self.upstream_host = None
            self.flags = "UR"
            self._complete(reset=True)

    def on_upstream_write_paused(self, paused: bool) -> None:
        self._pause_request("upstream", paused)

    def _pause_request(self, reason: str, paused: bool) -> None:
        """Stop (or resume) taking request bytes from the client."""
        self.conn.set_read_paused(reason, paused)

    def cork(self) -> bool:
        return self.conn.cork()

    def uncork(self) -> None:
        self.conn.uncork()

    def downstream_write_paused(self, paused: bool) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading(paused)

    # the response to the client

    def _commit(self) -> None:
        """Write the upstream's response head to the client, then what body came with it."""
        if self.response_status == 101 and self.upgrade_early is not None:
            self._open_tunnel()
            return
        self.committed = True
        self.status = self.response_status
        no_body = self.head_request or self.status in (204, 304)
        lines = [status_line(self.status)]
        connection_tokens = {
            token.strip().lower()
            for name, value in self.response_head
            if name.lower() == b"connection"
            for token in value.split(b",")
        }
        for name, value in self.response_head:
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in connection_tokens:
                continue
            lines.append(b"%b: %b\r\n" % (name, value))
        if no_body:
            self.response_chunked = False
        elif self.response_chunked:
            if self.version == "1.1":
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.response_chunked = False
                self.keep_alive = False  # HTTP/1.0 without a length: the close ends it
        if not self.request_done:
            self.keep_alive = False
        if self.conn.draining or not self.keep_alive:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        elif self.version == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        conn = self.conn
        # the head, the body that came with it and its end go out in one write
        corked = conn.cork()
        try:
            conn.write(b"".join(lines))
            if conn.write_paused and self.upstream is not None:
                self.upstream.pause_reading(True)
            body, self.response_body = self.response_body, []
            for chunk in body:
                self.on_response_body(chunk)
            if self.response_done:
                self._end_response()
            elif self.response_reset:
                self.flags = "UR"
                self._complete(reset=True)
        finally:
            if corked:
                conn.uncork()

    def _end_response(self) -> None:
        self._finish_body()
        upstream, self.upstream = self.upstream, None
        if self.upstream_host is not None:
            self.upstream_host.active -= 1
            self.upstream_host = None
        if upstream is not None and self.cluster is not None:
            reusable = self.request_done and self.sent_index == len(self.body)
            if reusable and isinstance(upstream, UpstreamConnection):
                self.cluster.release(upstream)
            else:  # an HTTP/2 stream that ended both ways closes without a reset
                upstream.close()
        self._complete()

    def _finish_body(self) -> None:
        """The response's end to the client: the last chunk (with the upstream's trailers,
        when there were any), or nothing when the length framed it."""
        if not self.response_chunked:
            return
        trailers = self.response_trailers
        if trailers:
            self.conn.write(b"0\r\n%b\r\n" % b"".join(b"%b: %b\r\n" % t for t in trailers))
        else:
            self.conn.write(b"0\r\n\r\n")

    def _redirect(self, redirect: Redirect) -> None:
        host = redirect.host or self.authority
        if redirect.port:
            host = f"{split_authority(host)[0]}:{redirect.port}"
        path = self.path
        if redirect.path:
            path = redirect.path
        elif redirect.prefix_rewrite and self.route is not None:
            path = redirect.prefix_rewrite + path[len(self.route.match.path) :]
        if redirect.strip_query:
            path = path.partition("?")[0]
        location = f"{redirect.scheme or 'http'}://{host}{path}"
        self.local_reply(redirect.status, "", extra=((b"location", location.encode("latin-1")),))

    def local_reply(
        self,
        status: int,
        body: str,
        *,
        flags: str = "-",
        overloaded: bool = False,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        if self.finished:
            return
        self.flags = flags
        if self.committed:
            self._complete(reset=True)
            return
        self.committed = True
        self.status = status
        self._write_local_reply(status, body, overloaded, extra)
        self._complete()

    def _write_local_reply(
        self,
        status: int,
        body: str,
        overloaded: bool,
        extra: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        """The reply's bytes to the client (HTTP/1.1 here; HTTP/2 streams write frames)."""
        payload = body.encode()
        if not self.request_done:
            self.keep_alive = False
        lines = [status_line(status), b"content-length: %d\r\n" % len(payload)]
        if payload:
            lines.append(b"content-type: text/plain\r\n")
        if overloaded:
            lines.append(b"x-envoy-overloaded: true\r\n")
        lines += [b"%b: %b\r\n" % header for header in extra]
        if not self.keep_alive or self.conn.draining:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        elif self.version == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        if not self.head_request:
            lines.append(payload)
        self.bytes_sent += len(payload)
        self.conn.write(b"".join(lines))

    def _complete(self, *, reset: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._release_request()
        elapsed_ms = (time.monotonic() - self.started) * 1000
        conn = self.conn
        if conn.stats is not None:
            conn.stats.completed(self.status, elapsed_ms)
        if self.cluster is not None and self.status:
            self.cluster.stats.completed(self.status, elapsed_ms)
        if self.span is not None:
            self._finish_span()
        if self.mixer_report is not None:
            self._mixer_report()
        self._log()
        if (
            self.task is not None
            and not self.task.done()
            and asyncio.current_task(conn.loop) is not self.task
        ):
            self.task.cancel()
        if reset:
            self._drop_upstream()
            self._reset_downstream()
            return
        conn.exchange_done(self)

    def _reset_downstream(self) -> None:
        """A response that cannot be finished: the client must see it broken."""
        self.conn.reset()

    def _release_request(self) -> None:
        if self.active_request and self.cluster is not None:
            self.active_request = False
            self.cluster.active_requests -= 1
            self.cluster.stats.rq_active -= 1

    def _mixer_check(self, mixer: MixerFilter) -> bool | None:
        """Mixer's Check for this inbound request, from the client's cache: True (go on),
        False (denied, and answered), None (Mixer must be asked: `_mixer_ask`). No coroutine
        on this path: it is the Check of nearly every request."""
        mixer_filter = _mixer_module()
        conn = self.conn
        identity = conn.peer_identity
        record: RequestRecord = (
            self.method.decode("latin-1"),
            self.path,
            self.authority,
            self.headers,
            self.request_id,
            conn.peer,
            identity.spiffe_id if identity is not None else "",
            identity is not None,
            time.time_ns(),
        )
        mixers = mixer_filter.mixers(conn.context)  # (made here at first: Report needs it too)
        if not mixer.check:
            self.mixer_report = (mixer, record, None)
            return True
        bag = mixer_filter.request_attributes(mixer, record)
        self.mixer_report = (mixer, record, bag)
        if mixer.quotas or (self.span is not None and self.span.sampled):
            return None  # quotas to charge, or a span to show the call: asked in `_mixer_ask`
        answer = mixers.client(mixer.address).check_cached(bag)
        return None if answer is None else self._mixer_answered(answer)

    async def _mixer_ask(self, mixer: MixerFilter) -> bool:
        """Mixer's Check when the cache cannot answer alone (or a span shows it)."""
        mixer_filter = _mixer_module()
        assert self.mixer_report is not None
        bag = self.mixer_report[2]
        assert bag is not None
        quotas = mixer_filter.charged_quotas(mixer, bag) if mixer.quotas else None
        traced = self.span is not None and self.span.sampled
        started_us = time.time_ns() // 1000 if traced else 0
        client = mixer_filter.mixers(self.conn.context).client(mixer.address)
        answer = await client.check(bag, quotas)
        if traced:
            self._mixer_span(mixer.address, answer.status_code, answer.cached, started_us)
        return self._mixer_answered(answer)

    def _mixer_answered(self, answer: CheckAnswer) -> bool:
        """Whether Mixer's answer lets the request go on; a denial is answered here."""
        if answer.ok:
            return True
        self.local_reply(
            _mixer_module().denial_status(answer),
            f"{answer.message or 'denied by Mixer'}\n",
            flags="UAEX",
        )
        return False

    def _mixer_span(self, address: str, code: int, cached: bool, started_us: int) -> None:
        """The Check call as a child of the request's span (cached answers too: they show
        the call that was saved)."""
        span, manager = self.span, self.manager
        if span is None or manager is None or manager.tracing is None:
            return
        child = child_span(span, "mixer check", start_us=started_us)
        child.tags = {
            "component": "proxy",
            "peer.service": "istio-mixer",
            "mixer.address": address,
            "mixer.status_code": str(code),
            "mixer.cached": "true" if cached else "false",
        }
        if code:
            child.tags["error"] = "true"
        self.conn.context.tracer.finish(manager.tracing, child)

    def _mixer_report(self) -> None:
        assert self.mixer_report is not None
        mixer, record, bag = self.mixer_report
        self.mixer_report = None
        self.conn.context.mixers.report_request(
            mixer,
            record,
            bag,
            status=self.status,
            request_bytes=self.bytes_received,
            response_bytes=self.bytes_sent,
            duration=time.monotonic() - self.started,
            time_ns=time.time_ns(),
        )

    def _finish_span(self) -> None:
        span, manager = self.span, self.manager
        if span is None or manager is None or manager.tracing is None or not span.sampled:
            return
        span.name = f"{self.authority}{self.path.partition('?')[0]}"[:256]
        tags = {
            "http.method": self.method.decode("latin-1"),
            "http.url": f"http://{self.authority}{self.path}"[:256],
            "http.protocol": f"HTTP/{self.version}",
            "http.status_code": str(self.status),
            "upstream_cluster": self.cluster_name or "-",
            "response_flags": self.flags or "-",
            "request_size": str(self.bytes_received),
            "response_size": str(self.bytes_sent),
            "component": "proxy",
        }
        if self.request_id:
            tags["guid:x-request-id"] = self.request_id
        if self.status >= 500 or not self.status:
            tags["error"] = "true"
        span.tags = tags
        self.conn.context.tracer.finish(manager.tracing, span)

    def _log(self) -> None:
        access_log = self.conn.context.access_log
        if access_log is None:
            return
        access_log.write(
            {
                "start_time": time.time() - (time.monotonic() - self.started),
                "method": self.method.decode("latin-1"),
                "path": self.path,
                "protocol": f"HTTP/{self.version}",
                "response_code": self.status,
                "response_flags": self.flags,
                "bytes_received": self.bytes_received,
                "bytes_sent": self.bytes_sent,
                "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
                "upstream_cluster": self.cluster_name or None,
                "upstream_host": self.upstream_address or None,
                "authority": self.authority,
                "request_id": self.request_id or None,
                "listener": self.listener_name,
                "downstream_remote_address": self.conn.peer,
            }
        )

    # upgrades (WebSocket): after a 101, both connections carry raw bytes

    def _upgrade_type(self) -> bytes:
        for name, value in self.headers:
            if name.lower() == b"upgrade":
                return value
        return b""

    def _upgrade_allowed(self, action: RouteAction) -> bool:
        return action.websocket and self._upgrade_type().strip().lower() == b"websocket"

    def _open_tunnel(self, head: bytes | None = None) -> None:
        """The response that opens a tunnel (a 101, or `head` for CONNECT), then raw bytes."""
        upstream = self.upstream
        conn = self.conn
        self.committed = True
        self.status = self.response_status
        if not isinstance(upstream, UpstreamConnection) or upstream.closed or conn.closed:
            self.flags = "UC"
            self._complete(reset=True)
            return
        if self.timer is not None:  # the route timeout ends with the upgrade
            self.timer.cancel()
            self.timer = None
        if head is None:
            lines = [status_line(101)]
            upgrade = b""
            for name, value in self.response_head:
                lower = name.lower()
                if lower == b"upgrade":
                    upgrade = value
                elif lower not in HOP_BY_HOP:
                    lines.append(b"%b: %b\r\n" % (name, value))
            lines.append(b"connection: upgrade\r\nupgrade: %b\r\n\r\n" % upgrade)
            head = b"".join(lines)
        self.tunneled = True
        conn.tunnel = self
        conn.write(head)
        for chunk in upstream.tunnel_open(self):
            self.tunnel_from_upstream(chunk)
        for chunk in self.upgrade_early or ():
            self.tunnel_from_downstream(chunk)
        self.upgrade_early = []
        conn.broken = False
        conn.set_read_paused("upgrade", False)

    async def _connect_tunnel(self) -> None:
        """CONNECT host:port, as an explicit proxy: allowed when the listener for that port
        has a route for that authority (a mesh service or an EgressRule's host), tunnelled
        as TCP (inside mutual TLS to a sidecar) to the host the route's cluster picks."""
        conn = self.conn
        self.authority = self.target.decode("latin-1")
        self.path = ""
        host_name, port = split_authority(self.authority, 443)
        if not host_name or self.upgrade_early is None:
            self.local_reply(400, "CONNECT needs an authority-form target host:port")
            return
        manager, self.listener_name = conn.manager(port)
        self.manager = manager
        table = None
        if manager is not None:
            table = manager.routes
            if table is None and manager.rds is not None:
                table = conn.context.snapshot.routes.get(manager.rds)
        selected = table.select(self.authority, "/", _NO_HEADERS) if table is not None else None
        action = selected[1].action if selected is not None else None
        if not isinstance(action, RouteAction):
            self.local_reply(404, "", flags="NR")
            return
        self.virtual_host, self.route = selected if selected is not None else (None, None)
        self.cluster_name = action.pick_cluster(action.next_draw())
        cluster = conn.context.clusters.clusters.get(self.cluster_name)
        if cluster is None:
            self.local_reply(503, f"cluster {self.cluster_name} not found", flags="NC")
            return
        self.cluster = cluster
        original = (conn.context.resolver.resolve(host_name), port)
        host = cluster.pick(original)
        if host is None:
            self.local_reply(503, "no healthy upstream", flags="UH")
            return
        try:
            upstream = await cluster.connect_tunnel(host)
        except ConnectFailure as error:
            self.local_reply(503, f"upstream connect error: {error}", flags="UF")
            return
        if self.finished or conn.closed:
            upstream.close()
            return
        self.upstream = upstream
        self.upstream_host = host
        self.upstream_address = f"{host.address[0]}:{host.address[1]}"
        host.active += 1
        upstream.handler = self  # write pauses and its close reach this exchange
        upstream.upgraded = []
        self.response_head = []
        self.response_status = 200
        self._open_tunnel(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def tunnel_from_downstream(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and data:
            self.bytes_received += len(data)
            upstream.write(data)

    def tunnel_from_upstream(self, data: bytes) -> None:
        if data:
            self.bytes_sent += len(data)
            self.conn.write(data)

    def _close_tunnel(self) -> None:
        """Either side closed: the other is closed after what it was sent, and the exchange
        is logged with its bytes."""
        if self.finished:
            return
        self.tunneled = False
        self.conn.tunnel = None
        upstream, self.upstream = self.upstream, None
        if self.upstream_host is not None:
            self.upstream_host.active -= 1
            self.upstream_host = None
        if upstream is not None:
            upstream.detach()
            upstream.close()
        self.keep_alive = False
        self._complete()

    # mirroring

    def _maybe_mirror(self) -> None:
        route = self.route
        if (
            self.mirrored
            or route is None
            or not isinstance(route.action, RouteAction)
            or not route.action.mirrors
            or not self.request_done
            or not self.replayable
        ):
            return
        self.mirrored = True
        body = b"".join(self.body)
        head = self._request_head(route.action, mirror_length=len(body))
        authority = (route.action.host_rewrite or self.authority).encode("latin-1")
        host, _, port = authority.partition(b":")
        shadow = host + b"-shadow" + (b":" + port if port else b"")
        head = head.replace(
            b"\r\nhost: " + authority + b"\r\n", b"\r\nhost: " + shadow + b"\r\n", 1
        )
        for name in route.action.mirrors:
            cluster = self.conn.context.clusters.clusters.get(name)
            if cluster is not None and not cluster.config.http2:
                _spawn(Mirror(cluster).send(head + body, self.head_request))


def _mixer_module() -> Any:
    """istio.proxy.mixer, imported by the first request on a listener with Mixer (a mesh without
    Mixer never loads it); after that a dict lookup per request, not an import statement."""
    module = sys.modules.get("istio.proxy.mixer")
    if module is None:
        import istio.proxy.mixer as module
    return module


def _retriable(
    retry: RetryPolicy | None, outcome: str, status: int, grpc_status: int | None = None
) -> bool:
    if retry is None:
        return False
    if outcome == "headers":
        if grpc_status is not None and grpc_status in retry.grpc_statuses:
            return True
        return retry.retries_status(status)
    if outcome == "connect-failure":
        return retry.on_connect_failure or retry.on_5xx or retry.on_gateway_error
    if outcome == "refused-stream":  # never processed by the server: always safe to resend
        return retry.on_refused_stream or retry.on_reset or retry.on_5xx
    if outcome in ("reset", "protocol-error"):
        return retry.on_reset or retry.on_5xx or retry.on_gateway_error
    if outcome == "timeout":
        return retry.on_5xx or retry.on_gateway_error
    return False


# gRPC status codes (grpc/status.h) and Envoy's mapping of HTTP statuses to them, for the
# replies this proxy makes itself to gRPC requests (Grpc::Utility::httpToGrpcStatus).
GRPC_OK, GRPC_DEADLINE_EXCEEDED, GRPC_UNKNOWN = 0, 4, 2
HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


def grpc_timeout(value: bytes) -> float | None:
    """A grpc-timeout header (up to 8 digits and a unit: H M S m u n) in seconds."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


_NO_HEADERS: dict[str, str] = {}  # for route tables without header matchers: never read
_background: set[asyncio.Task[None]] = set()


def _spawn(coroutine: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)


class Mirror:
    """A fire-and-forget copy of a request (request_mirror_policies): the response is read
    and dropped, failures are ignored."""

    def __init__(self, cluster: ClusterRuntime) -> None:
        self.cluster = cluster
        self.upstream: UpstreamConnection | None = None
        self.done = asyncio.get_running_loop().create_future()

    async def send(self, request: bytes, head_request: bool) -> None:
        host = self.cluster.pick()
        if host is None:
            return
        try:
            upstream = await self.cluster.acquire(host)
        except (Overflow, ConnectFailure):
            return
        self.upstream = upstream
        upstream.attach(self, request, head_request=head_request)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await self.done

    def on_response_headers(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None, chunked: bool
    ) -> None:
        pass

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_end(self) -> None:
        if self.upstream is not None:
            self.cluster.release(self.upstream)
        if not self.done.done():
            self.done.set_result(None)

    def on_upstream_reset(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_upstream_write_paused(self, paused: bool) -> None:
        pass

    def cork(self) -> bool:
        return False

    def uncork(self) -> None:
        pass
