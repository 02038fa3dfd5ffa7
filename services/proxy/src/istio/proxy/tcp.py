"""The tcp_proxy filter: bytes spliced between a client and one upstream host.

Theory of operation. The downstream connection (`TcpConnection`) stops reading while the
upstream is being connected, then each direction is a plain copy from one transport to the
other: when a side's write buffer passes its high-water mark (asyncio's `pause_writing`), the
other side stops reading until it drains (`resume_writing`), so a slow reader holds back a
fast writer and the proxy buffers at most a write buffer and a read per direction. A FIN
from one side is passed on as a FIN (half-close) and the other direction carries on; when
both sides have finished, or either closes outright, both are closed once their buffered
bytes are written. With an idle timeout (Envoy's default 1h; 0: none), a connection that
carries no byte either way for that long is closed (`idle_timeout`). Connections to a
cluster without a host (BlackHoleCluster) are closed at once (`downstream_cx_no_route`); a
cluster at max_connections refuses more (`upstream_cx_overflow`).

On an inbound listener with Mixer (Pilot's `istio.mixer` metadata), the connection is checked
before its upstream is connected, still not reading, and reported when it closes, with the
bytes each way (`istio.proxy.mixer.TcpMixer`); a denial closes it before any byte goes on.

On MongoDB and Redis ports a sniffer (`istio.proxy.mongo`, `istio.proxy.redis`, sans-io)
reads a copy of each direction's bytes for protocol stats after they are forwarded; nothing
it does or fails to do touches the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, Protocol, cast

from istio.proxy.config import MixerFilter, Sniffer, TcpProxy
from istio.proxy.context import Context
from istio.proxy.mongo import MongoSniffer
from istio.proxy.redis import RedisSniffer
from istio.proxy.stats import ClusterStats, TcpStats
from istio.proxy.tls import ALPN_TCP, PeerIdentity, remember_session
from istio.proxy.upstream import Address, ClusterRuntime, ConnectFailure, HostState

if TYPE_CHECKING:
    from istio.proxy.mixer import TcpMixer


class ProtocolSniffer(Protocol):
    def request(self, data: bytes, now: float) -> None: ...

    def response(self, data: bytes, now: float) -> None: ...


def _sniffer(context: Context, config: TcpProxy) -> ProtocolSniffer | None:
    if config.sniffer is Sniffer.MONGO:
        stats = context.stats.protocol_stats("mongo", config.sniffer_prefix)
        return MongoSniffer(stats, config.commands)
    if config.sniffer is Sniffer.REDIS:
        return RedisSniffer(context.stats.protocol_stats("redis", config.sniffer_prefix))
    return None


def _no_delay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Upstream(asyncio.Protocol):
    """The upstream side: everything it hears goes to its `TcpConnection`."""

    __slots__ = ("session", "transport")

    def __init__(self, session: TcpConnection) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        self.session.from_upstream(data)

    def eof_received(self) -> bool:
        self.session.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.upstream_lost()

    def pause_writing(self) -> None:
        self.session.upstream_full(True)

    def resume_writing(self) -> None:
        self.session.upstream_full(False)


class TcpConnection(asyncio.Protocol):
    """The downstream side; it connects the upstream side once accepted."""

    def __init__(
        self,
        context: Context,
        config: TcpProxy,
        original_dst: Address | None,
        registry: set[asyncio.Protocol] | None = None,
    ) -> None:
        self.context = context
        self.config = config
        self.original_dst = original_dst
        self.registry = registry
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.stats: TcpStats = context.stats.tcp_stats(config.stat_prefix)
        self.cluster_stats: ClusterStats | None = None
        self.runtime: ClusterRuntime | None = None
        self.host: HostState | None = None
        self.sniffer: ProtocolSniffer | None = None
        self.downstream_eof = False
        self.upstream_eof_seen = False
        self.connecting = True
        self.upstream_paused = False  # the upstream's write buffer is full
        self.downstream_paused = False  # the downstream's write buffer is full
        self.closed = False
        self.last_activity = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        # The verified client of an mTLS connection (set by the listener); None: plaintext.
        self.peer_identity: PeerIdentity | None = None
        self.session_pending = False  # mTLS upstream: its session is kept at its first reply
        # The listener's Mixer (set by the listener before connection_made); None: no Mixer.
        self.mixer: MixerFilter | None = None
        self.mixer_session: TcpMixer | None = None
        self.received = 0  # bytes from the client, for Mixer's Report
        self.sent = 0  # bytes to the client

    # the downstream transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        _no_delay(transport)
        if self.registry is not None:
            self.registry.add(self)
        stats = self.stats
        stats.cx_total += 1
        stats.cx_active += 1
        # Nothing is read until the upstream is connected (and Mixer has allowed it).
        transport.pause_reading()
        if self.mixer is not None:
            from istio.proxy.mixer import TcpMixer  # only where a listener has Mixer

            peer = transport.get_extra_info("peername")
            self.mixer_session = TcpMixer(self.context, self.mixer, peer, self.peer_identity)
            self.task = self.loop.create_task(self._check(self.mixer_session, transport))
            return
        self._open(transport)

    async def _check(self, session: TcpMixer, transport: asyncio.Transport) -> None:
        answer = await session.check()
        if self.closed:
            return
        self.task = None
        if not answer.ok:
            self.close()
            return
        self._open(transport)

    def _open(self, transport: asyncio.Transport) -> None:
        """Pick the upstream host (or close at once without one) and start connecting."""
        stats = self.stats
        runtime = self.context.clusters.clusters.get(self.config.cluster)
        host = runtime.pick(self.original_dst) if runtime is not None else None
        if runtime is None or host is None:
            stats.cx_no_route += 1
            transport.close()
            return
        cluster_stats = runtime.stats
        if runtime.connections >= runtime.config.breakers.max_connections:
            cluster_stats.cx_overflow += 1
            transport.close()
            return
        self.runtime = runtime
        self.host = host
        self.cluster_stats = cluster_stats
        runtime.connections += 1
        host.active += 1
        cluster_stats.cx_total += 1
        cluster_stats.cx_active += 1
        self.task = self.loop.create_task(self._connect(runtime, host))

    async def _connect(self, runtime: ClusterRuntime, host: HostState) -> None:
        try:
            async with asyncio.timeout(runtime.config.connect_timeout or None):
                upstream, _ = await runtime.open(lambda: _Upstream(self), host, ALPN_TCP)
        except (ConnectFailure, TimeoutError):
            if self.cluster_stats is not None:
                self.cluster_stats.cx_connect_fail += 1
            runtime.record(host, 503)
            self._release()
            if self.transport is not None:
                self.transport.close()
            return
        runtime.record(host, 200)
        self.connecting = False
        if self.closed or self.transport is None or self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        self.session_pending = runtime.config.mtls is not None
        self.sniffer = _sniffer(self.context, self.config)
        self.last_activity = self.loop.time()
        pending, self.pending = self.pending, []
        for data in pending:
            upstream.write(data)
            if self.sniffer is not None:
                self._sniff(True, data, self.last_activity)
        if self.downstream_eof:
            self._write_eof(upstream)
        elif not self.upstream_paused:
            self._resume(self.transport)
        timeout = self.config.idle_timeout
        if timeout > 0:
            self.idle_timer = self.loop.call_at(self.last_activity + timeout, self._idle)

    def data_received(self, data: bytes) -> None:
        size = len(data)
        self.received += size
        self.stats.cx_rx_bytes_total += size
        cluster_stats = self.cluster_stats
        if cluster_stats is not None:
            cluster_stats.cx_tx_bytes_total += size
        upstream = self.upstream
        if upstream is None:
            self.pending.append(data)
            return
        upstream.write(data)
        now = self.last_activity = self.loop.time()
        if self.sniffer is not None:
            self._sniff(True, data, now)

    def eof_received(self) -> bool:
        self.downstream_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.upstream_eof_seen:
                self.close()
            else:
                self._write_eof(upstream)
        return True  # keep the other direction open

    def pause_writing(self) -> None:
        self.downstream_paused = True
        if self.upstream is not None:
            self.stats.upstream_paused_reading_total += 1
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.downstream_paused = False
        if self.upstream is not None and not self.upstream_eof_seen:
            self._resume(self.upstream)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.registry is not None:
            self.registry.discard(self)
        self.close()

    # the upstream transport (through _Upstream)

    def from_upstream(self, data: bytes) -> None:
        if self.session_pending:
            self.session_pending = False
            if self.upstream is not None:
                remember_session(self.upstream)
        size = len(data)
        self.sent += size
        self.stats.cx_tx_bytes_total += size
        if self.cluster_stats is not None:
            self.cluster_stats.cx_rx_bytes_total += size
        if self.transport is not None:
            self.transport.write(data)
        now = self.last_activity = self.loop.time()
        if self.sniffer is not None:
            self._sniff(False, data, now)

    def upstream_eof(self) -> None:
        self.upstream_eof_seen = True
        if self.downstream_eof:
            self.close()
        elif self.transport is not None:
            self._write_eof(self.transport)

    def upstream_lost(self) -> None:
        self.close()

    def upstream_full(self, full: bool) -> None:
        self.upstream_paused = full
        transport = self.transport
        if transport is None:
            return
        if full:
            self.stats.downstream_paused_reading_total += 1
            transport.pause_reading()
        elif not self.connecting and not self.downstream_eof:
            self._resume(transport)

    # both

    def _sniff(self, request: bool, data: bytes, now: float) -> None:
        sniffer = self.sniffer
        assert sniffer is not None
        try:
            if request:
                sniffer.request(data, now)
            else:
                sniffer.response(data, now)
        except Exception:  # a sniffer's bug must never cost the connection
            self.sniffer = None
            stats = self.context.stats.protocol_stats(
                cast(Sniffer, self.config.sniffer).value, self.config.sniffer_prefix
            )
            stats.count("decoding_error")

    def _idle(self) -> None:
        self.idle_timer = None
        if self.closed:
            return
        deadline = self.last_activity + self.config.idle_timeout
        if self.loop.time() < deadline:
            self.idle_timer = self.loop.call_at(deadline, self._idle)
            return
        self.stats.idle_timeout += 1
        self.close()

    def close(self) -> None:
        """Close both sides, each after its buffered bytes are written."""
        if self.closed:
            return
        self.closed = True
        self.stats.cx_active -= 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None:
            self.upstream.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            self._release()
        elif self.upstream is not None:
            self._release()
        self.sniffer = None
        if self.mixer_session is not None:
            self.mixer_session.report(received=self.received, sent=self.sent)
            self.mixer_session = None

    def _release(self) -> None:
        runtime, host = self.runtime, self.host
        if runtime is None or host is None:
            return
        self.runtime = self.host = None
        runtime.connections -= 1
        host.active -= 1
        if self.cluster_stats is not None:
            self.cluster_stats.cx_active -= 1

    @staticmethod
    def _write_eof(transport: asyncio.Transport) -> None:
        if transport.can_write_eof() and not transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
        else:
            transport.close()

    @staticmethod
    def _resume(transport: asyncio.Transport) -> None:
        with contextlib.suppress(RuntimeError):
            transport.resume_reading()

    def drain(self) -> None:
        """TCP connections carry on until either side closes."""
